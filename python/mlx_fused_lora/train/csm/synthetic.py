"""Synthetic fine-tuning inputs written as real files: a random CSM, a voice dataset, a
tokenizer and a random Mimi, made to fit each other; for the example, the demo and tests.

- `write_random_csm`: a CSM with random weights in `save_csm`'s layout (``config.json`` +
  ``model.safetensors``), what ``finetune --model-path`` loads. The default config is
  CSM-1B's token layout (32 codebooks, a 2051-entry audio vocabulary) at a tiny width, with
  the byte tokenizer's text vocabulary, so it fits `write_synthetic_dataset`'s defaults.
- `write_synthetic_dataset`: ``audio/<stem>.npy`` (Mimi-shaped codes ``[codebooks,
  frames]``) or ``audio/<stem>.wav`` (tones, one per word), ``transcripts/<stem>.txt`` and
  ``alignments/<stem>.json`` (word timings), read back through the trainer's data path like
  real recordings. The codes follow a per-file arithmetic pattern (codebook ``k`` at frame
  ``t`` is ``(offset + k * stride_k + t * stride_t) mod (V - 1) + 1``), so a model can learn
  them and the loss visibly falls.
- `write_random_mimi`: a tiny random Mimi (the released one's strides: 24 kHz, 12.5
  frames/s, 2048 codes per codebook) as one ``.safetensors`` file `MimiCodec` reads; needs
  the ``[audio]`` extra (mlx-audio). It turns WAVs into codes and generated codes into WAV.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..tiny_tokenizer import WORDS
from .audio import FRAME_RATE, write_wav
from .tokenizer import ByteTokenizer

__all__ = [
    "small_csm_config",
    "write_synthetic_dataset",
    "write_random_csm",
    "write_random_mimi",
    "random_mimi",
    "tiny_mimi_config",
]

WAV_RATE = 16_000  # synthetic WAVs are not at Mimi's 24 kHz, so the data path resamples them


def small_csm_config(width: int = 128, layers: int = 2, text_vocab_size: int = ByteTokenizer.vocab_size):
    """CSM-1B's token layout (32 codebooks, audio vocabulary 2051) at a small width: a
    ``layers`` x ``width`` backbone and a 2-layer decoder of half the width."""
    from ...csm import CSMConfig, LlamaFlavor

    backbone = LlamaFlavor(
        num_layers=layers, num_heads=8, num_kv_heads=4, embed_dim=width, intermediate_dim=2 * width, max_seq_len=512
    )
    decoder = LlamaFlavor(
        num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=width // 2, intermediate_dim=width, max_seq_len=64
    )
    return CSMConfig(backbone, decoder, text_vocab_size, audio_vocab_size=2051, audio_num_codebooks=32)


def _tones(words: list[tuple[str, float, float]], seconds: float, rate: int) -> np.ndarray:
    """A tone per word over its timing (pitch from the word), silence between words."""
    audio = np.zeros(int(round(seconds * rate)), np.float32)
    for word, start, end in words:
        lo, hi = int(start * rate), min(int(end * rate), len(audio))
        if hi <= lo:
            continue
        pitch = 180.0 + 20.0 * (sum(map(ord, word)) % 20)
        t = np.arange(hi - lo) / rate
        fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms ramps: no clicks
        audio[lo:hi] = 0.4 * fade * np.sin(2 * np.pi * pitch * t)
    return audio


def write_synthetic_dataset(
    root: str | Path,
    num_files: int = 8,
    num_codebooks: int = 32,
    audio_vocab_size: int = 2051,
    frames: tuple[int, int] = (24, 40),
    words_per_file: tuple[int, int] = (3, 6),
    alignments: bool = True,
    seed: int = 0,
    audio_format: str = "codes",
    speakers: int = 1,
) -> Path:
    """Write the dataset under ``root``; returns ``root / "audio"``.

    ``speakers`` > 1: file ``i``'s transcript begins with the speaker tag ``[i % speakers]``
    (`data.speaker_and_text`), for runs with one adapter per speaker.

    ``audio_format``: ``"codes"`` (``.npy``, no codec needed), ``"wav"`` (16 kHz tones
    following the word timings; training them needs a Mimi) or ``"mixed"`` (even files WAV,
    odd files codes: one of each kind with two files).
    """
    if audio_format not in ("codes", "wav", "mixed"):
        raise ValueError(f"audio_format must be 'codes', 'wav' or 'mixed', got {audio_format!r}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    for d in ("audio", "transcripts", "alignments") if alignments else ("audio", "transcripts"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(num_files):
        n = int(rng.integers(frames[0], frames[1] + 1))
        offset, stride_k, stride_t = (int(v) for v in rng.integers(0, 50, size=3))
        k = np.arange(num_codebooks)[:, None]
        t = np.arange(n)[None, :]
        codes = (offset + k * (stride_k + 1) + t * (stride_t % 7 + 1)) % (audio_vocab_size - 1) + 1
        stem = f"clip_{i:03d}"
        n_words = int(rng.integers(words_per_file[0], words_per_file[1] + 1))
        words = [str(w) for w in rng.choice(WORDS, size=n_words)]
        tag = f"[{i % speakers}]" if speakers > 1 else ""
        (root / "transcripts" / f"{stem}.txt").write_text(tag + " ".join(words) + "\n")
        seconds = n / FRAME_RATE
        # two halves separated by a pause, so the file becomes two turns
        edges = np.linspace(0.0, max(seconds - 1.0, 0.5), n_words + 1)
        timing = []
        for j, w in enumerate(words):
            start, end = float(edges[j]), float(edges[j + 1]) - 0.02
            if j >= n_words // 2:
                start = min(start + 1.0, seconds)
                end = min(end + 1.0, seconds)
            timing.append({"word": w, "start": round(start, 3), "end": round(max(end, start), 3)})
        if alignments:
            words_json = ",\n".join("  " + json.dumps(w) for w in timing)  # a word a line
            (root / "alignments" / f"{stem}.json").write_text('{"words": [\n' + words_json + "\n]}\n")
        if audio_format == "wav" or (audio_format == "mixed" and i % 2 == 0):
            spans = [(w["word"], w["start"], w["end"]) for w in timing]
            write_wav(root / "audio" / f"{stem}.wav", _tones(spans, seconds, WAV_RATE), WAV_RATE)
        else:
            np.save(root / "audio" / f"{stem}.npy", codes.astype(np.int32))
    return root / "audio"


def write_random_csm(path: str | Path, config=None, seed: int = 0) -> Path:
    """Save a CSM with random weights (`save_csm`'s layout) to directory ``path``.

    ``config`` defaults to `small_csm_config()`, which fits `write_synthetic_dataset`'s
    defaults and the byte tokenizer."""
    import mlx.core as mx

    from ...csm import CSM, save_csm

    mx.random.seed(seed)
    model = CSM(config or small_csm_config())
    mx.eval(model.parameters())
    save_csm(model, path)
    return Path(path)


def tiny_mimi_config(num_codebooks: int = 32, bins: int = 2048):
    """The released Mimi's structure (same strides: 24 kHz, 12.5 frames/s, 2048 codes per
    codebook by default) at a tiny width: mlx-audio's ``MimiConfig``."""
    from mlx_audio.codec.models.mimi.mimi import MimiConfig
    from mlx_audio.codec.models.mimi.modules import SeanetConfig, TransformerConfig

    seanet = SeanetConfig(
        dimension=16,
        channels=1,
        causal=True,
        nfilters=2,
        nresidual_layers=1,
        ratios=[8, 6, 5, 4],
        ksize=7,
        residual_ksize=3,
        last_ksize=3,
        dilation_base=2,
        pad_mode="constant",
        true_skip=True,
        compress=2,
    )
    transformer = TransformerConfig(
        d_model=16,
        num_heads=2,
        num_layers=1,
        causal=True,
        norm_first=True,
        bias_ff=False,
        bias_attn=False,
        layer_scale=0.01,
        positional_embedding="rope",
        use_conv_bias=True,
        gating=False,
        norm="layer_norm",
        context=250,
        max_period=10000,
        max_seq_len=8192,
        kv_repeat=1,
        dim_feedforward=32,
        conv_layout=True,
        use_conv_block=False,
        cross_attention=False,
        conv_kernel_size=3,
    )
    return MimiConfig(
        channels=1,
        sample_rate=24000,
        frame_rate=FRAME_RATE,
        renormalize=True,
        seanet=seanet,
        transformer=transformer,
        quantizer_nq=num_codebooks,
        quantizer_bins=bins,
        quantizer_dim=8,
    )


def random_mimi(num_codebooks: int = 32, bins: int = 2048, seed: int = 0):
    """A tiny random Mimi (mlx-audio's ``Mimi``, `tiny_mimi_config`'s structure) whose
    frames get varied codes, ready to encode and decode in memory."""
    try:
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_audio.codec.models.mimi.mimi import Mimi
        from mlx_audio.codec.models.mimi.modules.quantization import EuclideanCodebook
    except ImportError as e:
        raise ImportError(f"a random Mimi needs mlx-audio: pip install 'mlx-fused-lora[audio]' [{e}]") from None

    mx.random.seed(seed)
    model = Mimi(tiny_mimi_config(num_codebooks, bins))
    # mlx-audio's conv init (uniform, +-1/fan_in) shrinks the signal ~1e6-fold through the
    # encoder and a fresh codebook is all zeros, so every frame would get one code: draw
    # convolutions with unit gain and codebooks at the latents' scale instead
    convs = [
        (k, mx.random.normal(v.shape) / math.sqrt(math.prod(v.shape[1:])))
        for k, v in tree_flatten(model.parameters())
        if k.endswith("weight") and v.ndim == 3
    ]
    model.load_weights(convs, strict=False)
    for m in model.modules():
        if isinstance(m, EuclideanCodebook):
            m.embedding_sum = mx.random.normal(m.embedding_sum.shape)
            m.cluster_usage = mx.ones(m.cluster_usage.shape)
        if hasattr(m, "update_in_place"):  # derived arrays (codebook lookup, expanded conv weights)
            m.update_in_place()
    mx.eval(model.parameters())
    return model


def write_random_mimi(path: str | Path, num_codebooks: int = 32, bins: int = 2048, seed: int = 0) -> Path:
    """A tiny random Mimi (`random_mimi`) saved with `save_mimi` (its config in the file's metadata)."""
    from .audio import save_mimi

    return save_mimi(random_mimi(num_codebooks, bins, seed), path)
