"""The layers share one from_base and one fold: the drift bugs of issue 9 stay fixed."""

import sys
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_fused_lora.csm import merge_lora
from mlx_fused_lora.layers import FusedLoRALinear, PlainLoRALinear, fold_lora, plain_layer_class
from mlx_fused_lora.layers import tree as lora_tree

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "mlx_fused_lora"
LAYER_CLASSES = [FusedLoRALinear, PlainLoRALinear]


@pytest.mark.parametrize("cls", LAYER_CLASSES)
def test_from_base_on_a_quantized_linear_unpacks_the_input_dims(cls):
    base = nn.QuantizedLinear(64, 32, bits=4)
    layer = cls.from_base(base)
    assert layer.linear is base
    assert layer.lora_a.shape == (64, 8) and layer.lora_b.shape == (8, 32)
    layer.eval()
    assert layer(mx.random.normal((3, 64), key=mx.random.key(0))).shape == (3, 32)


def with_adapter(cls, base, std=0.05, seed=1):
    layer = cls.from_base(base, r=4, scale=1.5)
    layer.lora_b = std * mx.random.normal(layer.lora_b.shape, key=mx.random.key(seed))
    return layer


def twins(base, std=0.05):
    """A fused and a plain layer over the same base with the same adapter."""
    fused = with_adapter(FusedLoRALinear, base, std)
    plain = with_adapter(PlainLoRALinear, base, std)
    plain.lora_a = fused.lora_a
    return fused, plain


def holder_of(layer):
    holder = nn.Module()
    holder.proj = layer
    return holder


def test_plain_layer_fuses_without_mlx_lm(monkeypatch):
    for name in [m for m in sys.modules if m == "mlx_lm" or m.startswith("mlx_lm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlx_lm", None)  # import mlx_lm now raises ImportError
    assert plain_layer_class() is PlainLoRALinear
    mx.random.seed(2)
    fused, plain = twins(nn.Linear(48, 40, bias=True))
    plain.eval()
    x = mx.random.normal((5, 48), key=mx.random.key(3))
    merged = plain.fuse()
    assert isinstance(merged, nn.Linear) and "bias" in merged
    assert mx.array_equal(merged.weight, fused.fuse().weight).item()
    np.testing.assert_allclose(np.array(merged(x)), np.array(plain(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_fuse_and_merge_lora_are_one_fold(dtype):
    mx.random.seed(4)
    base = nn.Linear(32, 24, bias=True)
    base.set_dtype(dtype)
    fused, plain = twins(base)
    expect = (
        base.weight.astype(mx.float32) + 1.5 * (fused.lora_b.astype(mx.float32).T @ fused.lora_a.astype(mx.float32).T)
    ).astype(dtype)
    by_layer = fused.fuse().weight
    holder = merge_lora(holder_of(plain))
    assert by_layer.dtype == holder.proj.weight.dtype == dtype
    assert mx.array_equal(by_layer, expect).item()
    assert mx.array_equal(holder.proj.weight, expect).item()
    assert mx.array_equal(plain.fuse().weight, expect).item()


def test_merge_lora_and_fuse_call_the_one_fold(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("name"))
        return fold_lora(*args, **kwargs)

    monkeypatch.setattr(lora_tree, "fold_lora", spy)
    merge_lora(holder_of(with_adapter(FusedLoRALinear, nn.Linear(16, 8))))
    assert calls == ["proj"]
    assert FusedLoRALinear.fuse is PlainLoRALinear.fuse  # one inherited method, not two copies


def quantized_base(bias=True):
    return nn.QuantizedLinear.from_linear(nn.Linear(64, 32, bias=bias), group_size=32, bits=4)


@pytest.mark.parametrize("cls", LAYER_CLASSES)
def test_fuse_warns_like_merge_when_the_delta_is_below_the_step(cls):
    base = quantized_base()
    layer = with_adapter(cls, base, std=1e-6)
    with pytest.warns(UserWarning, match="below the 4-bit quantization step"):
        requantized = layer.fuse()
    assert isinstance(requantized, nn.QuantizedLinear) and requantized.bits == 4 and requantized.group_size == 32
    with pytest.warns(UserWarning, match="proj.*below the 4-bit quantization step"):
        merge_lora(holder_of(with_adapter(cls, base, std=1e-6)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # folding into a dequantized base loses nothing: no warning
        dense = layer.fuse(dequantize=True)
    assert isinstance(dense, nn.Linear) and "bias" in dense
    w = mx.dequantize(base.weight, base.scales, base.biases, group_size=32, bits=4)
    expect = (w.astype(mx.float32) + 1.5 * (layer.lora_b.T @ layer.lora_a.T)).astype(w.dtype)
    assert mx.array_equal(dense.weight, expect).item()


@pytest.mark.parametrize("cls", LAYER_CLASSES)
def test_a_large_delta_requantizes_without_a_warning(cls):
    layer = with_adapter(cls, quantized_base(), std=1.0)
    layer.eval()
    x = mx.random.normal((3, 64), key=mx.random.key(6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = layer.fuse()
    adapted = np.array(layer(x))
    assert np.abs(np.array(merged(x)) - adapted).max() < 0.1 * np.abs(adapted).max()


@pytest.mark.parametrize("sub", ["layers", "adapters", "csm"])
def test_small_modules_each_naming_its_job(sub):
    files = sorted((PACKAGE / sub).glob("*.py")) + ([PACKAGE / "lm_lora.py"] if sub == "layers" else [])
    for path in files:
        text = path.read_text()
        assert text.count("\n") <= 400, f"{path.name}: {text.count(chr(10))} lines"
        assert text.startswith('"""') and len(text.split("\n", 1)[0]) > 10, f"{path.name}: no first-line docstring"


class ScaledLoRA(FusedLoRALinear):
    """A layer with a fold of its own (as DoRA's magnitude needs): merge must use it."""

    def fuse(self, dequantize=False):
        base = super().fuse(dequantize=dequantize)
        base.weight = 2 * base.weight
        return base


def test_merge_uses_a_layers_own_fold_and_mlx_lm_layers_the_shared_one():
    layer = with_adapter(ScaledLoRA, nn.Linear(16, 8))
    holder = merge_lora(holder_of(layer))
    assert mx.array_equal(holder.proj.weight, layer.fuse().weight).item()
    lora = pytest.importorskip("mlx_lm.tuner.lora")
    theirs = lora.LoRALinear.from_base(nn.Linear(16, 8), r=4, scale=1.5)
    theirs.lora_b = mx.random.normal(theirs.lora_b.shape, key=mx.random.key(8))
    ours = FusedLoRALinear.from_base(theirs.linear, r=4, scale=1.5)
    ours.lora_a, ours.lora_b = theirs.lora_a, theirs.lora_b
    holder = merge_lora(holder_of(theirs))
    assert mx.array_equal(holder.proj.weight, ours.fuse().weight).item()
