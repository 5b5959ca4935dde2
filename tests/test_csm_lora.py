"""apply_lora / merge_lora on a tiny CSM with FusedLoRALinear."""

import math
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_fused_lora.csm import CSM, CSMConfig, apply_lora, merge_lora
from mlx_fused_lora.layers import FusedLoRALinear, lora_dropout_p, lora_layers

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fresh(seed=3):
    mx.random.seed(seed)
    m = CSM(CSMConfig.tiny())
    mx.eval(m.parameters())
    return m


def frames(cfg, seed=0):
    K = cfg.audio_num_codebooks
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.audio_vocab_size, (2, 5, K + 1)).astype(np.int32)
    mask = np.ones((2, 5, K + 1), np.float32)
    mask[..., K] = 0
    return mx.array(tokens), mx.array(mask)


def outputs(m, tokens, mask):
    K = m.config.audio_num_codebooks
    h = m(tokens, mask)
    return np.array(m.codebook_logits(h[:, :-1], tokens[:, 1:, :K]))


def randomize_lora_b(m, std=0.05, seed=11):
    key = mx.random.key(seed)
    for _, layer in lora_layers(m):
        key, sub = mx.random.split(key)
        layer.lora_b = std * mx.random.normal(layer.lora_b.shape, key=sub)
    mx.eval(m.parameters())


def test_targets_both_stacks_and_freezes_the_rest():
    m = fresh()
    report = apply_lora(m, ALL + ["codebook0_head", "projection"], r=4, alpha=8.0)
    nb, nd = m.config.backbone.num_layers, m.config.decoder.num_layers
    assert len(report.modules) == 7 * (nb + nd) + 2
    for stack in ("backbone", "decoder"):
        layer = getattr(m, stack).layers[0]
        assert isinstance(layer.self_attn.q_proj, FusedLoRALinear)
        assert isinstance(layer.mlp.down_proj, FusedLoRALinear)
        assert isinstance(layer.self_attn.q_proj.linear, nn.Linear)
    assert isinstance(m.codebook0_head, FusedLoRALinear) and isinstance(m.projection, FusedLoRALinear)
    trainable = dict(tree_flatten(m.trainable_parameters()))
    assert trainable and all(k.endswith((".lora_a", ".lora_b")) for k in trainable)
    assert "backbone.layers.0.self_attn.q_proj.lora_a" in trainable
    assert "decoder.layers.0.self_attn.q_proj.lora_a" in trainable  # prefixes keep stacks apart
    assert report.trainable == sum(v.size for v in trainable.values())
    assert report.total == sum(v.size for _, v in tree_flatten(m.parameters()))
    assert math.isclose(report.percent, 100 * report.trainable / report.total)
    assert "trainable" in str(report)
    q = m.backbone.layers[0].self_attn.q_proj
    assert q.lora_a.shape == (64, 4) and q.lora_b.shape == (4, 64) and q.scale == 2.0


def test_scale_dropout_and_rslora():
    m = fresh()
    apply_lora(m, ["v_proj"], r=4, alpha=8.0, dropout=0.1, use_rslora=True)
    v = m.decoder.layers[1].self_attn.v_proj
    assert v.scale == 8.0 / 2.0 and lora_dropout_p(v) == pytest.approx(0.1)
    assert m.lora_settings.use_rslora and m.lora_settings.scale == 4.0


def test_target_layers_and_vocabulary():
    m = fresh()
    report = apply_lora(m, ["output_proj", "w1"], target_layers=[1], r=2, alpha=2)
    assert sorted(report.modules) == [
        "backbone.layers.1.mlp.gate_proj",
        "backbone.layers.1.self_attn.o_proj",
        "decoder.layers.1.mlp.gate_proj",
        "decoder.layers.1.self_attn.o_proj",
    ]
    m = fresh()
    report = apply_lora(m, "q_proj", target_layers={"backbone": [0], "decoder": None}, r=2, alpha=2)
    assert sorted(report.modules) == [
        "backbone.layers.0.self_attn.q_proj",
        "decoder.layers.0.self_attn.q_proj",
        "decoder.layers.1.self_attn.q_proj",
    ]
    with pytest.raises(ValueError, match="unknown LoRA target 'qkv'"):
        apply_lora(fresh(), ["qkv"])
    with pytest.raises(ValueError, match=r"target_layers \[9\]"):
        apply_lora(fresh(), ["q_proj"], target_layers=[9])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(m, ["q_proj"], target_layers=[0])


def test_zero_init_adapter_leaves_outputs_unchanged():
    m = fresh()
    tokens, mask = frames(m.config)
    before = outputs(m, tokens, mask)
    apply_lora(m, ALL, r=4, alpha=8)
    np.testing.assert_allclose(outputs(m, tokens, mask), before, atol=1e-5)


def test_merge_matches_adapted_model_fp32():
    m = fresh()
    tokens, mask = frames(m.config)
    base = outputs(m, tokens, mask)
    apply_lora(m, ALL + ["codebook0_head", "projection"], r=4, alpha=8)
    randomize_lora_b(m)
    m.eval()
    adapted = outputs(m, tokens, mask)
    assert not np.allclose(adapted, base, atol=1e-3)  # the adapters do something
    merged = merge_lora(m)
    assert merged is m and not lora_layers(m)
    assert isinstance(m.backbone.layers[0].self_attn.q_proj, nn.Linear)
    assert not any(k.endswith(("lora_a", "lora_b")) for k, _ in tree_flatten(m.parameters()))
    got = outputs(m, tokens, mask)
    np.testing.assert_allclose(got, adapted, rtol=1e-5, atol=1e-5 * np.abs(adapted).max())


def test_merge_folds_in_float32_and_casts_once():
    lin = nn.Linear(16, 8)
    lin.set_dtype(mx.bfloat16)
    layer = FusedLoRALinear.from_base(lin, r=4, scale=0.5)
    layer.lora_b = 0.01 * mx.random.normal((4, 8), key=mx.random.key(2))
    holder = nn.Module()
    holder.proj = layer
    expect = (
        lin.weight.astype(mx.float32) + 0.5 * (layer.lora_b.astype(mx.float32).T @ layer.lora_a.astype(mx.float32).T)
    ).astype(mx.bfloat16)
    merge_lora(holder)
    assert isinstance(holder.proj, nn.Linear) and holder.proj.weight.dtype == mx.bfloat16
    assert mx.array_equal(holder.proj.weight, expect).item()


def quantized_holder(lora_std):
    lin = nn.Linear(64, 32, bias=True)
    qlin = nn.QuantizedLinear.from_linear(lin, group_size=32, bits=4)
    layer = FusedLoRALinear.from_base(qlin, r=4, scale=1.0)
    layer.lora_b = lora_std * mx.random.normal((4, 32), key=mx.random.key(5))
    holder = nn.Module()
    holder.proj = layer
    return holder, layer


def test_merge_requantizes_quantized_bases():
    holder, layer = quantized_holder(lora_std=1.0)
    x = mx.random.normal((3, 64), key=mx.random.key(6))
    adapted = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a large delta must not warn
        merge_lora(holder)
    assert isinstance(holder.proj, nn.QuantizedLinear)
    assert holder.proj.bits == 4 and holder.proj.group_size == 32 and "bias" in holder.proj
    # re-quantization error only: small next to the adapter's contribution
    err = np.abs(np.array(holder.proj(x) - adapted)).max()
    assert err < 0.1 * np.abs(np.array(adapted)).max()


def test_merge_warns_when_delta_is_below_the_quantization_step():
    holder, _ = quantized_holder(lora_std=1e-6)
    with pytest.warns(UserWarning, match="proj.*below the 4-bit quantization step"):
        merge_lora(holder)
    assert isinstance(holder.proj, nn.QuantizedLinear)


def test_only_adapters_get_gradients():
    m = fresh()
    apply_lora(m, ["q_proj", "v_proj"], r=2, alpha=4)
    randomize_lora_b(m)
    tokens, mask = frames(m.config)
    K = m.config.audio_num_codebooks

    def loss(model):
        h = model(tokens, mask)
        return model.codebook_logits(h[:, :-1], tokens[:, 1:, :K]).square().mean()

    _, grads = nn.value_and_grad(m, loss)(m)
    flat = dict(tree_flatten(grads))
    assert flat and all(k.endswith((".lora_a", ".lora_b")) for k in flat)
    assert any(np.abs(np.array(v)).max() > 0 for v in flat.values())
