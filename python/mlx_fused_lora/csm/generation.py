"""Frame-by-frame generation with a backbone KV cache (Sesame's `generate_frame` loop).

Per frame: the backbone state of the last frame gives codebook 0 through
``codebook0_head``; the decoder, with a fresh cache each frame, runs over
``projection(h_last)`` and ``projection(emb_0(c0))`` (positions 0 and 1) and then one
codebook embedding per step, its state at position ``k`` giving codebook ``k`` through
``audio_head[k - 1]``. The sampled frame goes back into the backbone as an audio frame
(all codebook columns present, text column absent). A row stops when it samples an
all-zero frame; generation stops when every row has.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from ..adapters.manager import using_adapters
from ..adapters.mixed import mixed_batch
from .model import CSM

__all__ = ["sample_top_k", "generate_frame", "generate", "check_prompt_tokens"]

# (logits [B, audio_vocab], codebook index) -> sampled codes [B] (int32)
Sampler = Callable[[mx.array, int], mx.array]


def sample_top_k(logits: mx.array, top_k: int, temperature: float, key: mx.array) -> mx.array:
    """Sample ``[B]`` codes from ``logits [B, V]`` restricted to the top ``k``, at ``temperature``.

    ``temperature == 0`` is greedy (argmax).
    """
    if temperature <= 0:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    logits = logits.astype(mx.float32) / temperature
    k = min(top_k, logits.shape[-1])
    kth = mx.sort(logits, axis=-1)[..., -k][..., None]
    logits = mx.where(logits < kth, -mx.inf, logits)
    return mx.random.categorical(logits, axis=-1, key=key).astype(mx.int32)


def default_sampler(top_k: int, temperature: float, seed: int | None) -> Sampler:
    key = [mx.random.key(seed if seed is not None else int(mx.random.randint(0, 2**31 - 1, ())))]

    def sample(logits: mx.array, codebook: int) -> mx.array:
        key[0], sub = mx.random.split(key[0])
        return sample_top_k(logits, top_k, temperature, sub)

    return sample


def generate_frame(model: CSM, h_last: mx.array, sampler: Sampler) -> mx.array:
    """Codes ``[B, K]`` of one frame from the backbone state ``h_last [B, D_backbone]``."""
    K = model.config.audio_num_codebooks
    c = sampler(model.codebook0_head(h_last), 0)
    codes = [c]
    cache = model.decoder.make_cache()
    x = mx.stack([h_last, model.embed_audio(0, c).astype(h_last.dtype)], axis=1)
    d = model.decoder(model.projection(x), "causal", cache)
    for k in range(1, K):
        c = sampler(model.decoder_logits(d[:, -1], k), k)
        codes.append(c)
        if k < K - 1:
            x = model.embed_audio(k, c)[:, None].astype(h_last.dtype)
            d = model.decoder(model.projection(x), None, cache)
    return mx.stack(codes, axis=1)


def generate(
    model: CSM,
    tokens: mx.array,
    mask: mx.array,
    max_frames: int,
    *,
    temperature: float = 0.9,
    top_k: int = 50,
    seed: int | None = None,
    sampler: Sampler | None = None,
    adapters=None,
) -> mx.array:
    """Generate up to ``max_frames`` audio frames after the prompt ``tokens``/``mask``.

    ``tokens``, ``mask``: ``[B, T, K + 1]`` prompt frames (padding frames allowed; their
    mask is all zero). ``sampler(logits [B, V], codebook) -> [B]`` replaces top-k sampling
    (e.g. greedy, or teacher forcing in tests). ``adapters``: the named adapters to speak
    with for this call, e.g. one speaker adapter per voice on one loaded base: a name, or
    ``{name: weight}`` (several stacked, `adapters.set_adapter`), for every row; ``[]`` the
    base model; a list of B entries, one per row (a name, or None for the base model):
    several voices in one batch, each row on its own adapter (`adapters.mixed_batch`, one
    op call per layer); None: those the model runs.

    Returns codes ``[B, N, K]`` (int32), ``N <= max_frames``. A row that samples an
    all-zero frame is finished: its later frames are zero. Generation ends early when
    every row is finished; that last all-zero step is not returned. The model runs in
    eval mode (no LoRA dropout) and is put back in its previous mode afterwards.
    """
    T = tokens.shape[1]
    limit = model.config.backbone.max_seq_len
    if T + max_frames > limit:
        raise ValueError(f"prompt of {T} frames + max_frames {max_frames} exceeds the backbone's max_seq_len {limit}")
    check_prompt_tokens(model.config, tokens)
    if sampler is None:
        sampler = default_sampler(top_k, temperature, seed)
    per_row = isinstance(adapters, (list, tuple)) and len(adapters) > 0
    if per_row and len(adapters) != tokens.shape[0]:
        raise ValueError(
            f"generate: a list of adapters names one per row: {tokens.shape[0]} rows, got {len(adapters)} "
            f"entries {list(adapters)}; to stack adapters on every row give {{name: weight}}"
        )
    was_training = model.training
    model.eval()  # no LoRA dropout while sampling; the caller's mode is restored below
    try:
        with mixed_batch(model, list(adapters)) if per_row else using_adapters(model, adapters):
            return _generate(model, tokens, mask, max_frames, sampler)
    finally:
        model.train(was_training)


def check_prompt_tokens(config, tokens: mx.array) -> None:
    """A prompt's tokens must index their embedding tables, masked ones too: MLX does not
    check an embedding lookup, so a token past its table reads the memory after it (and a
    masked garbage row still turns the frame's sum into NaN when it holds inf or NaN).
    One synchronization per call, as each generated frame makes one."""
    K = config.audio_num_codebooks
    if tokens.ndim != 3 or tokens.shape[-1] != K + 1 or tokens.size == 0:
        return  # the model's own shape check names the problem
    columns = (
        ("audio", tokens[..., :K], config.audio_vocab_size),
        ("text", tokens[..., K], config.text_vocab_size),
    )
    bounds = [(mx.min(part), mx.max(part)) for _, part, _ in columns]
    mx.eval(bounds)
    for (kind, _, vocab), (low, high) in zip(columns, bounds, strict=True):
        low, high = low.item(), high.item()
        if low < 0 or high >= vocab:
            column = f"columns 0..{K - 1}" if kind == "audio" else f"column {K}"
            raise ValueError(
                f"generate: `tokens` {column} ({kind}) must lie in [0, {vocab}), the model's {kind} vocabulary; "
                f"got {low if low < 0 else high}"
            )


def _generate(model: CSM, tokens, mask, max_frames: int, sampler: Sampler) -> mx.array:
    K = model.config.audio_num_codebooks
    B = tokens.shape[0]
    cache = model.backbone.make_cache()
    h = model(tokens, mask, cache)[:, -1]
    finished = mx.zeros((B,), dtype=mx.bool_)
    frames = []
    frame_mask = mx.concatenate([mx.ones((B, 1, K), dtype=mask.dtype), mx.zeros((B, 1, 1), dtype=mask.dtype)], axis=-1)
    for _ in range(max_frames):
        codes = generate_frame(model, h, sampler)
        finished = finished | mx.all(codes == 0, axis=-1)
        codes = mx.where(finished[:, None], 0, codes)
        mx.eval(codes, finished)
        if finished.all().item():
            break
        frames.append(codes)
        frame = mx.concatenate([codes, mx.zeros((B, 1), dtype=codes.dtype)], axis=-1)
        h = model(frame[:, None].astype(tokens.dtype), frame_mask, cache)[:, -1]
    if not frames:
        return mx.zeros((B, 0, K), dtype=mx.int32)
    return mx.stack(frames, axis=1)
