"""FusedLoRALinear as a drop-in for mlx-lm's LoRALinear, and training with it."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_fused_lora import FusedLoRALinear
from mlx_lm.tuner.lora import LoRALinear


def shapes(module):
    return {k: tuple(v.shape) for k, v in tree_flatten(module.parameters())}


def paired(input_dims=48, output_dims=40, r=8, bias=True, dropout=0.0, scale=3.0):
    """An mlx-lm LoRALinear and a FusedLoRALinear holding identical parameters."""
    ref = LoRALinear(input_dims, output_dims, r=r, dropout=dropout, scale=scale, bias=bias)
    ref.lora_b = mx.random.normal(ref.lora_b.shape) * 0.1  # non-zero, so the LoRA path counts
    fused = FusedLoRALinear(input_dims, output_dims, r=r, dropout=dropout, scale=scale, bias=bias)
    # load_weights, not update: mlx-lm's tree also holds its parameterless nn.Dropout
    fused.load_weights(tree_flatten(ref.parameters()))
    return ref, fused


@pytest.mark.parametrize("bias", [False, True])
def test_same_parameters_names_shapes_and_init(bias):
    mx.random.seed(0)
    ref = LoRALinear(300, 200, r=16, bias=bias)
    fused = FusedLoRALinear(300, 200, r=16, bias=bias)
    assert shapes(fused) == shapes(ref)
    assert fused.scale == ref.scale == 20.0
    a = np.array(fused.lora_a)
    bound = 1 / np.sqrt(300)
    assert a.min() >= -bound and a.max() <= bound and a.std() > 0.9 * bound / np.sqrt(3)
    assert not np.any(np.array(fused.lora_b))


@pytest.mark.parametrize("bias", [False, True])
def test_outputs_and_grads_match_mlx_lm_at_p0(bias):
    mx.random.seed(1)
    ref, fused = paired(bias=bias)
    x = mx.random.normal((3, 5, 48))
    assert np.allclose(fused(x), ref(x), rtol=1e-5, atol=1e-5)

    def loss(model, x):
        return (model(x) ** 2).sum()

    for model in (ref, fused):
        model.freeze()
        model.unfreeze(keys=["lora_a", "lora_b"])
    _, g_ref = nn.value_and_grad(ref, loss)(ref, x)
    _, g = nn.value_and_grad(fused, loss)(fused, x)
    g_ref, g = dict(tree_flatten(g_ref)), dict(tree_flatten(g))
    assert g.keys() == g_ref.keys() == {"lora_a", "lora_b"}
    for k in g:
        assert np.allclose(g[k], g_ref[k], rtol=1e-4, atol=1e-4), k
    dx = mx.grad(lambda x: loss(fused, x))(x)
    dx_ref = mx.grad(lambda x: loss(ref, x))(x)
    assert np.allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)


def test_from_base_and_fuse_match_mlx_lm():
    mx.random.seed(2)
    base = nn.Linear(32, 24, bias=True)
    ref = LoRALinear.from_base(base, r=4, scale=2.0)
    fused = FusedLoRALinear.from_base(base, r=4, scale=2.0)
    assert fused.linear is base and shapes(fused) == shapes(ref)
    fused.lora_b = mx.random.normal(fused.lora_b.shape)
    ref.load_weights(tree_flatten(fused.parameters()))
    x = mx.random.normal((7, 32))
    merged, merged_ref = fused.fuse(), ref.fuse()
    assert isinstance(merged, nn.Linear)
    assert np.allclose(merged.weight, merged_ref.weight, atol=1e-6)
    assert np.allclose(merged(x), fused(x), atol=1e-5)


def test_quantized_base():
    mx.random.seed(3)
    qbase = nn.QuantizedLinear.from_linear(nn.Linear(64, 32), group_size=32, bits=4)
    ref = LoRALinear.from_base(qbase, r=4, scale=2.0)
    fused = FusedLoRALinear.from_base(qbase, r=4, scale=2.0)
    assert fused.lora_a.shape == (64, 4)
    fused.lora_b = mx.random.normal(fused.lora_b.shape) * 0.1
    ref.load_weights(tree_flatten(fused.parameters()))
    x = mx.random.normal((5, 64))
    assert np.allclose(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    assert isinstance(fused.fuse(), nn.QuantizedLinear)
    assert isinstance(fused.fuse(dequantize=True), nn.Linear)


def test_dropout_only_in_training_and_fresh_mask_per_call():
    mx.random.seed(4)
    ref, fused = paired(dropout=0.5, bias=False)
    x = mx.random.normal((4, 48))
    fused.train()
    y1, y2 = fused(x), fused(x)
    assert not mx.array_equal(y1, y2)  # a new key per call
    fused.eval()
    ref.eval()
    assert mx.array_equal(fused(x), fused(x))
    assert np.allclose(fused(x), ref(x), rtol=1e-5, atol=1e-5)


def test_bf16_activations_float32_adapters_keep_dtype():
    mx.random.seed(5)
    layer = FusedLoRALinear(64, 32, r=4)
    layer.linear.set_dtype(mx.bfloat16)
    y = layer(mx.random.normal((3, 64)).astype(mx.bfloat16))
    assert y.dtype == mx.bfloat16 and layer.lora_a.dtype == mx.float32


class TinyMLP(nn.Module):
    def __init__(self, dims=32, r=4, dropout=0.1):
        super().__init__()
        self.up = FusedLoRALinear(dims, 4 * dims, r=r, dropout=dropout, scale=2.0, bias=True)
        self.down = FusedLoRALinear(4 * dims, dims, r=r, dropout=dropout, scale=2.0)

    def __call__(self, x):
        return self.down(nn.gelu(self.up(x)))


def test_compiled_training_step_loss_falls():
    """A compiled step threading mx.random.state (as mlx-lm does) trains the adapters."""
    mx.random.seed(6)
    model = TinyMLP()
    model.freeze()
    for layer in (model.up, model.down):
        layer.unfreeze(keys=["lora_a", "lora_b"])
    x = mx.random.normal((64, 32))
    target = mx.random.normal((64, 32))
    opt = optim.Adam(learning_rate=1e-2)

    def loss_fn(model, x, t):
        return ((model(x) - t) ** 2).mean()

    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, t):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, t)
        opt.update(model, grads)
        return loss

    frozen_before = np.array(model.up.linear.weight)
    model.train()
    losses = [step(x, target).item() for _ in range(40)]
    model.eval()
    assert losses[-1] < 0.8 * losses[0], losses
    assert np.array_equal(np.array(model.up.linear.weight), frozen_before)
    assert np.any(np.array(model.up.lora_b))
