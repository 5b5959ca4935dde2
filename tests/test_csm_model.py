"""CSM model: RoPE, frames/masks, padding, teacher-forced logits vs cached generation."""

import time

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_fused_lora.csm import CSM, CSMConfig, RopeScaling, generate, sample_top_k
from mlx_fused_lora.csm.model import RotaryEmbedding, llama3_rope_frequencies


def random_frames(config, B, T, seed=0, text_every=3):
    """Frames [B, T, K+1] mixing text frames (text column only) and audio frames."""
    rng = np.random.default_rng(seed)
    K = config.audio_num_codebooks
    tokens = np.zeros((B, T, K + 1), np.int32)
    tokens[..., :K] = rng.integers(0, config.audio_vocab_size, (B, T, K))
    tokens[..., K] = rng.integers(0, config.text_vocab_size, (B, T))
    mask = np.zeros((B, T, K + 1), np.float32)
    is_text = (np.arange(T) % text_every) == 0
    mask[:, is_text, K] = 1
    mask[:, ~is_text, :K] = 1
    return mx.array(tokens), mx.array(mask)


@pytest.fixture(scope="module")
def tiny():
    mx.random.seed(1234)
    model = CSM(CSMConfig.tiny())
    mx.eval(model.parameters())
    return model


def test_llama3_frequencies_follow_the_scaling_rule_and_hf_parametrisation():
    head_dim, base = 64, 500_000.0
    inv = np.array(llama3_rope_frequencies(head_dim, base, RopeScaling()))
    plain = base ** (-np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / plain
    high, low = 8192 / 4, 8192 / 1
    keep, scaled = wavelen < high, wavelen > low
    mid = ~(keep | scaled)
    assert keep.any() and scaled.any() and mid.any()  # all three branches exercised
    np.testing.assert_allclose(inv[keep], plain[keep], rtol=1e-6)
    np.testing.assert_allclose(inv[scaled], plain[scaled] / 32, rtol=1e-6)
    s = (8192 / wavelen[mid] - 1) / 3
    np.testing.assert_allclose(inv[mid], (1 - s) * plain[mid] / 32 + s * plain[mid], rtol=1e-6)
    # Transformers writes the same scaling as (low 0.125, high 0.5, original 1024).
    hf = np.array(llama3_rope_frequencies(head_dim, base, RopeScaling(32.0, 0.125, 0.5, 1024)))
    np.testing.assert_allclose(hf, inv, rtol=1e-6)


def test_rope_is_interleaved_with_offset():
    scaling = RopeScaling()
    hd = 16
    x = mx.random.normal((2, 3, 5, hd), key=mx.random.key(0))
    out = np.array(RotaryEmbedding(hd, 500_000.0, scaling)(x, offset=7))
    inv = np.array(llama3_rope_frequencies(hd, 500_000.0, scaling))
    theta = np.arange(7, 12)[:, None] * inv[None, :]
    xe, xo = np.array(x)[..., 0::2], np.array(x)[..., 1::2]
    ref = np.empty_like(np.array(x))
    ref[..., 0::2] = xe * np.cos(theta) - xo * np.sin(theta)
    ref[..., 1::2] = xe * np.sin(theta) + xo * np.cos(theta)
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_frames_embed_as_masked_sum(tiny):
    cfg = tiny.config
    tokens, mask = random_frames(cfg, 2, 4)
    got = np.array(tiny.embed_frames(tokens, mask))
    K, V = cfg.audio_num_codebooks, cfg.audio_vocab_size
    audio = np.array(tiny.audio_embeddings.weight)
    text = np.array(tiny.text_embeddings.weight)
    t, m = np.array(tokens), np.array(mask)
    ref = np.zeros_like(got)
    for b in range(2):
        for i in range(4):
            for k in range(K):
                ref[b, i] += m[b, i, k] * audio[t[b, i, k] + k * V]
            ref[b, i] += m[b, i, K] * text[t[b, i, K]]
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_bad_frame_shapes_raise(tiny):
    tokens, mask = random_frames(tiny.config, 1, 3)
    with pytest.raises(ValueError, match="tokens must be"):
        tiny(tokens[..., :-1], mask[..., :-1])
    with pytest.raises(ValueError, match="mask shape"):
        tiny(tokens, mask[:, :2])
    h = tiny(tokens, mask)
    with pytest.raises(ValueError, match="codes shape"):
        tiny.codebook_logits(h, tokens[..., :3])


def test_backbone_is_causal(tiny):
    tokens, mask = random_frames(tiny.config, 1, 6)
    h = tiny(tokens, mask)
    # Another token in each column's vocabulary (+1 could step past its end: an out-of-range
    # lookup reads garbage, possibly NaN, which 0-weight attention then spreads backwards).
    cfg = tiny.config
    vocab = mx.array([cfg.audio_vocab_size] * cfg.audio_num_codebooks + [cfg.text_vocab_size])
    changed = tokens.at[:, 4:, :].add(1) % vocab
    h2 = tiny(changed, mask)
    np.testing.assert_array_equal(np.array(h[:, :4]), np.array(h2[:, :4]))
    assert not np.allclose(np.array(h[:, 4:]), np.array(h2[:, 4:]))


def test_padded_batch_matches_unpadded_rows(tiny):
    cfg = tiny.config
    K1 = cfg.frame_width
    long_t, long_m = random_frames(cfg, 1, 6, seed=1)
    short_t, short_m = random_frames(cfg, 1, 4, seed=2)
    pad_t = mx.zeros((1, 2, K1), mx.int32)
    pad_m = mx.zeros((1, 2, K1))
    right = (mx.concatenate([short_t, pad_t], 1), mx.concatenate([short_m, pad_m], 1))
    left = (mx.concatenate([pad_t, short_t], 1), mx.concatenate([pad_m, short_m], 1))
    batch_t = mx.concatenate([long_t, right[0], left[0]], 0)
    batch_m = mx.concatenate([long_m, right[1], left[1]], 0)
    h = np.array(tiny(batch_t, batch_m))
    h_long = np.array(tiny(long_t, long_m))[0]
    h_short = np.array(tiny(short_t, short_m))[0]
    np.testing.assert_allclose(h[0], h_long, atol=1e-5)
    np.testing.assert_allclose(h[1, :4], h_short, atol=1e-5)
    np.testing.assert_allclose(h[2, 2:], h_short, atol=1e-5)  # left padding: RoPE is relative
    assert np.isfinite(h).all()


def test_codebook_logits_layout(tiny):
    cfg = tiny.config
    K, V = cfg.audio_num_codebooks, cfg.audio_vocab_size
    tokens, mask = random_frames(cfg, 2, 5)
    h = tiny(tokens, mask)
    codes = tokens[..., :K]
    logits = tiny.codebook_logits(h, codes)
    assert logits.shape == (2, 5, K, V)
    np.testing.assert_allclose(np.array(logits[:, :, 0]), np.array(tiny.codebook0_head(h)), atol=1e-6)
    # codebook k sees codes[..., :k] only
    k = 3
    changed = codes.at[..., k].add(1)
    logits2 = tiny.codebook_logits(h, changed)
    np.testing.assert_array_equal(np.array(logits[:, :, : k + 1]), np.array(logits2[:, :, : k + 1]))
    assert not np.allclose(np.array(logits[:, :, k + 1]), np.array(logits2[:, :, k + 1]))


def test_cached_backbone_matches_full_forward(tiny):
    tokens, mask = random_frames(tiny.config, 2, 7, seed=3)
    full = np.array(tiny(tokens, mask))
    cache = tiny.backbone.make_cache()
    parts = [tiny(tokens[:, :3], mask[:, :3], cache)]
    for t in range(3, 7):
        parts.append(tiny(tokens[:, t : t + 1], mask[:, t : t + 1], cache))
    np.testing.assert_allclose(np.array(mx.concatenate(parts, 1)), full, atol=1e-5)


def test_teacher_forced_logits_match_cached_generation(tiny):
    """Generation (backbone KV cache, per-frame decoder cache) forced to known codes
    reproduces the logits of one teacher-forced pass over the whole sequence."""
    cfg = tiny.config
    K = cfg.audio_num_codebooks
    B, P, N = 2, 4, 3
    prompt_t, prompt_m = random_frames(cfg, B, P, seed=4)
    rng = np.random.default_rng(5)
    forced = rng.integers(1, cfg.audio_vocab_size, (B, N, K)).astype(np.int32)
    recorded = []

    def forcing_sampler(logits, codebook):
        j = len(recorded) // K  # the sampler is called K times per frame, codebook 0 first
        recorded.append((j, codebook, np.array(logits)))
        return mx.array(forced[:, j, codebook])

    codes = generate(tiny, prompt_t, prompt_m, N, sampler=forcing_sampler)
    np.testing.assert_array_equal(np.array(codes), forced)

    audio_frames = np.concatenate([forced, np.zeros((B, N, 1), np.int32)], -1)
    audio_mask = np.concatenate([np.ones((B, N, K)), np.zeros((B, N, 1))], -1).astype(np.float32)
    all_t = mx.concatenate([prompt_t, mx.array(audio_frames)], 1)
    all_m = mx.concatenate([prompt_m, mx.array(audio_mask)], 1)
    h = tiny(all_t, all_m)
    # h at position P-1+j predicts generated frame j
    teacher = np.array(tiny.codebook_logits(h[:, P - 1 : P - 1 + N], mx.array(forced)))
    assert len(recorded) == N * K
    for j, k, logits in recorded:
        np.testing.assert_allclose(logits, teacher[:, j, k], atol=1e-4, rtol=1e-4)


def test_generation_stops_on_all_zero_frame(tiny):
    cfg = tiny.config
    K = cfg.audio_num_codebooks
    prompt_t, prompt_m = random_frames(cfg, 2, 3)
    calls = {"n": 0}

    def sampler(logits, codebook):
        frame = calls["n"] // K
        calls["n"] += 1
        # row 0 emits the all-zero frame at frame 1, row 1 at frame 3
        row0 = 0 if frame >= 1 else 5
        row1 = 0 if frame >= 3 else 7
        return mx.array([row0, row1], dtype=mx.int32)

    tiny.train()
    codes = np.array(generate(tiny, prompt_t, prompt_m, 10, sampler=sampler))
    assert tiny.training  # generation runs in eval mode and restores the caller's mode
    tiny.eval()
    assert codes.shape == (2, 3, K)
    assert (codes[0, 0] == 5).all() and (codes[0, 1:] == 0).all()
    assert (codes[1] == 7).all()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(tiny, prompt_t, prompt_m, cfg.backbone.max_seq_len)


@pytest.mark.parametrize("column,value", [(0, -1), (3, "audio"), (-1, "text")])
def test_generation_refuses_tokens_outside_the_vocabularies(tiny, column, value):
    """MLX does not check an embedding lookup: a prompt token past its table (masked or
    not) would read the memory after it, garbage that made whole rows NaN at times."""
    cfg = tiny.config
    tokens, mask = random_frames(cfg, 2, 3)
    vocab = cfg.text_vocab_size if value == "text" else cfg.audio_vocab_size
    bad = vocab if isinstance(value, str) else value
    tokens = np.array(tokens)
    tokens[1, 2, column] = bad
    kind = "text" if column == -1 else "audio"
    with pytest.raises(ValueError, match=rf"`tokens` .*\({kind}\) must lie in \[0, {vocab}\).*got {bad}"):
        generate(tiny, mx.array(tokens), mask, 2)
    tokens[1, 2, column] = vocab - 1 if bad >= 0 else 0  # the last valid token is fine
    assert generate(tiny, mx.array(tokens), mask, 1, temperature=0).shape[0] == 2


def test_sampling_is_top_k_and_seeded(tiny):
    logits = mx.array([[0.0, 5.0, 4.0, -1.0, 3.0]] * 64)
    picks = np.array(sample_top_k(logits, 2, 1.0, mx.random.key(0)))
    assert set(picks.tolist()) <= {1, 2} and len(set(picks.tolist())) == 2
    assert (np.array(sample_top_k(logits, 1, 1.0, mx.random.key(1))) == 1).all()
    assert (np.array(sample_top_k(logits, 3, 0.0, mx.random.key(1))) == 1).all()  # greedy
    tokens, mask = random_frames(tiny.config, 1, 3)
    a = generate(tiny, tokens, mask, 2, top_k=5, temperature=1.0, seed=7)
    b = generate(tiny, tokens, mask, 2, top_k=5, temperature=1.0, seed=7)
    np.testing.assert_array_equal(np.array(a), np.array(b))


def _count(model):
    return sum(v.size for _, v in tree_flatten(model.parameters()))


# Llama-3.2-1B (the backbone's flavour) has 1,235,814,400 parameters with its
# 128256 x 2048 token embedding, which CSM keeps as `text_embeddings`.
LLAMA_3_2_1B = 1_235_814_400
CSM_1B = 1_552_791_552


def test_full_size_parameter_count():
    model = CSM(CSMConfig.csm_1b())  # lazy: nothing is materialized by counting shapes
    backbone = _count(model.backbone) + model.text_embeddings.weight.size
    assert backbone == LLAMA_3_2_1B
    per_dec_layer = 2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 8192 + 2 * 1024
    assert _count(model.decoder) == 4 * per_dec_layer + 1024
    assert model.audio_embeddings.weight.shape == (2051 * 32, 2048)
    assert model.audio_head.shape == (31, 1024, 2051)
    assert _count(model) == CSM_1B


@pytest.mark.slow
def test_full_size_bf16_forward_on_random_weights():
    start = time.perf_counter()
    mx.random.seed(0)
    model = CSM(CSMConfig.csm_1b())
    model.set_dtype(mx.bfloat16)  # before evaluation: only bf16 weights are ever held
    mx.eval(model.parameters())
    tokens, mask = random_frames(model.config, 1, 4)
    h = model(tokens, mask)
    logits = model.codebook_logits(h[:, -1:], tokens[:, -1:, :32])
    mx.eval(h, logits)
    assert h.dtype == mx.bfloat16 and h.shape == (1, 4, 2048)
    assert logits.shape == (1, 1, 32, 2051)
    assert np.isfinite(np.array(logits.astype(mx.float32))).all()
    print(f"full-size bf16 forward incl. init: {time.perf_counter() - start:.1f}s")
