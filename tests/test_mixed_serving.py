"""Serving with an adapter per row: each row of a CSM batch (``generate(..., adapters=[...])``)
and each prompt of an mlx-lm batch (``lm_generate.batch_generate``) equals generating it alone
with its adapter, greedy; nothing is downloaded."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_fused_lora.adapters import add_adapter, mixed_batch, using_adapters
from mlx_fused_lora.csm import CSM, CSMConfig, apply_lora, generate
from mlx_fused_lora.layers import lora_layers, named
from mlx_fused_lora.layers.mixed import mixed_routings


def randomize(model, seed=0):
    key = mx.random.key(seed)
    for _, layer in lora_layers(model):
        for h in named.holders(layer).values():
            key, sub = mx.random.split(key)
            h.lora_b = 0.5 * mx.random.normal(h.lora_b.shape, key=sub)
    mx.eval(model.parameters())


def voices_csm():
    """A tiny CSM with "default" (q, v), "alice" (q, codebook0_head, projection) and "bob" (DoRA, v)."""
    mx.random.seed(3)
    model = CSM(CSMConfig.tiny())
    apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8.0)
    add_adapter(model, "alice", {"rank": 2, "scale": 4.0, "keys": ["q_proj", "codebook0_head", "projection"]})
    add_adapter(model, "bob", {"rank": 3, "scale": 2.0, "keys": ["v_proj"], "use_dora": True})
    randomize(model)
    return model


def test_csm_rows_each_speak_with_their_adapter():
    model = voices_csm()
    cfg = model.config
    rows = 4
    tokens = mx.array(
        np.random.default_rng(0).integers(0, cfg.audio_vocab_size, (rows, 3, cfg.audio_num_codebooks + 1))
    )
    mask = mx.concatenate([mx.ones((rows, 3, cfg.audio_num_codebooks)), mx.zeros((rows, 3, 1))], axis=-1)
    tokens = tokens.astype(mx.int32)
    voices = ["alice", "bob", None, "default"]
    greedy = dict(temperature=0.0, max_frames=4)
    batch = generate(model, tokens, mask, adapters=voices, **greedy)
    alone = [
        generate(model, tokens[i : i + 1], mask[i : i + 1], adapters=v or [], **greedy) for i, v in enumerate(voices)
    ]
    for i, codes in enumerate(alone):
        n = codes.shape[1]
        assert mx.array_equal(batch[i : i + 1, :n], codes).item(), f"row {i} ({voices[i]})"
        assert not batch[i, n:].any().item()  # finished alone: zeros in the batch
    assert len({tuple(np.array(c).ravel()[:16]) for c in alone}) == rows  # four voices, four outputs
    assert model.training is True and mixed_routings(model) == []  # put back as it was
    with pytest.raises(ValueError, match="a list of adapters names one per row: 4 rows, got 2"):
        generate(model, tokens, mask, adapters=["alice", "bob"], **greedy)


def test_csm_training_loss_routes_the_decoder_per_frame():
    """codebook_logits runs the decoder on B * T sequences: the ids follow them."""
    model = voices_csm()
    cfg = model.config
    h = mx.random.normal((2, 3, cfg.backbone.embed_dim), key=mx.random.key(1))
    codes = mx.random.randint(0, cfg.audio_vocab_size, (2, 3, cfg.audio_num_codebooks), key=mx.random.key(2))
    with mixed_batch(model, ["alice", "bob"]):
        both = model.codebook_logits(h, codes)
        with pytest.raises(ValueError, match="must be one per sequence"):
            with mixed_batch(model, mx.zeros((2, 3), dtype=mx.int32)):
                model.codebook_logits(h, codes)
    for i, v in enumerate(["alice", "bob"]):
        with using_adapters(model, v):
            np.testing.assert_allclose(both[i], model.codebook_logits(h[i : i + 1], codes[i : i + 1])[0], atol=2e-5)


def test_mlx_lm_prompts_each_on_their_adapter(tmp_path):
    pytest.importorskip("mlx_lm")
    from mlx_fused_lora.lm_generate import batch_generate
    from mlx_fused_lora.train.lm_example import write_lm_example
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tokenizer = load(str(write_lm_example(tmp_path / "llm").model))
    for name, rank in (("alice", 4), ("bob", 2)):
        add_adapter(model, name, {"rank": rank, "scale": 4.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]})
    randomize(model)
    prompts = ["what comes after", "hello what", "comes", "what"]  # different lengths: left padding
    voices = ["alice", None, "bob", "alice"]
    outs = batch_generate(model, tokenizer, prompts, voices, max_tokens=6)
    for prompt, voice, out in zip(prompts, voices, outs, strict=True):
        with using_adapters(model, voice or []):
            steps = generate_step(mx.array(tokenizer.encode(prompt)), model, max_tokens=6)
            alone = [int(t) for t, _ in steps]
        cut = next((i for i, t in enumerate(alone) if t in tokenizer.eos_token_ids), len(alone))
        assert out == alone[:cut], (prompt, voice)  # up to its end of sequence
    assert len({tuple(o) for o in outs}) == 4 and sum(map(len, outs)) > 12
    with pytest.raises(ValueError, match="4 prompts but 3 adapters"):
        batch_generate(model, tokenizer, prompts, voices[:3])
