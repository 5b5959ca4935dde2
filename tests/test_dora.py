"""FusedDoRALinear against mlx-lm's DoRALinear, and DoRA's row norms without the N x K weight.

mlx-lm's layer is the reference (it is plain MLX autodiff over the adapted weight it
forms); dropout is compared by giving mlx-lm's layer our mask (`dropout_mask` under the
key the fused layer draws) in place of its ``nn.Dropout``.
"""

import mlx.core as mx
import mlx.nn as nn
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

pytest.importorskip("mlx_lm")

from mlx_fused_lora.layers.fused_dora_linear import FusedDoRALinear  # noqa: E402
from mlx_fused_lora.layers.fused_lora_linear import draw_dropout_key  # noqa: E402
from mlx_fused_lora.ops import dropout_mask  # noqa: E402
from mlx_fused_lora.ops.dora_norms import adapted_row_norms, base_row_sq_norms  # noqa: E402
from mlx_lm.tuner.dora import DoRALinear  # noqa: E402

BASES = ["dense", "q4", "q8"]


def make_base(kind, input_dims=128, output_dims=96, bias=True, dtype=mx.float32):
    linear = nn.Linear(input_dims, output_dims, bias=bias)
    linear.set_dtype(dtype)
    if kind == "dense":
        return linear
    return nn.QuantizedLinear.from_linear(linear, group_size=64, bits=int(kind[1:]))


def dense(linear):
    """The base's weight in float32 (a quantized one dequantized with float32 scales: exact)."""
    if not isinstance(linear, nn.QuantizedLinear):
        return linear.weight.astype(mx.float32)
    f32 = mx.float32
    q = dict(group_size=linear.group_size, bits=linear.bits)
    return mx.dequantize(linear.weight, linear.scales.astype(f32), linear.biases.astype(f32), **q)


class FixedMask(nn.Module):
    """Stands in for mlx-lm's nn.Dropout: multiplies by a given mask."""

    def __init__(self, mask):
        super().__init__()
        self._mask = mask

    def __call__(self, x):
        return x * self._mask.astype(x.dtype)


def paired(kind, r=8, scale=2.0, dropout=0.0, bias=True, dtype=mx.float32):
    """mlx-lm's DoRALinear and ours over one base, with the same non-trivial adapters."""
    base = make_base(kind, bias=bias, dtype=dtype)
    ref = DoRALinear.from_base(base, r=r, dropout=dropout, scale=scale)
    ours = FusedDoRALinear.from_base(base, r=r, dropout=dropout, scale=scale)
    ref.lora_b = 0.1 * mx.random.normal(ref.lora_b.shape)
    ref.m = ref.m * (1.0 + 0.2 * mx.random.uniform(shape=ref.m.shape))
    ours.update({"lora_a": ref.lora_a, "lora_b": ref.lora_b, "m": ref.m})
    for layer in (ref, ours):
        layer.freeze()
        layer.unfreeze(keys=["lora_a", "lora_b", "m"], recurse=False)
    mx.eval(ref.parameters(), ours.parameters())
    return ref, ours


def grads(layer, x, seed):
    """(y, d loss / dx, {param: grad}) with the random state at `seed` before the call."""

    def loss(params, x):
        layer.update(params)
        mx.random.seed(seed)
        y = layer(x)
        return (y.astype(mx.float32) * mx.cos(mx.arange(y.size).reshape(y.shape))).sum(), y

    params = layer.trainable_parameters()
    (_, y), (gp, gx) = mx.value_and_grad(loss, argnums=(0, 1))(params, x)
    return y, gx, dict(tree_flatten(gp))


def assert_close(a, b, rtol, atol, what):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    err = mx.abs(a - b).max().item()
    bound = atol + rtol * mx.abs(b).max().item()
    assert err <= bound, f"{what}: max |diff| {err:.3g} > {bound:.3g}"


# -- the row norms --


def explicit_norms(weight, lora_a, lora_b, scale):
    return mx.linalg.norm(weight.astype(mx.float32) + scale * (lora_b.T @ lora_a.T), axis=1)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 200),  # above 64 rows the expansion, up to 64 the direct norms
    k=st.integers(1, 90),
    r=st.integers(1, 9),
    block_rows=st.integers(1, 80),
    scale=st.floats(-4, 4),
    seed=st.integers(0, 2**16),
)
def test_row_norms_match_the_adapted_weight_dense(n, k, r, block_rows, scale, seed):
    mx.random.seed(seed)
    w = mx.random.normal((n, k))
    a, b = mx.random.normal((k, r)), mx.random.normal((r, n))
    got = adapted_row_norms(w, a, b, scale, base_row_sq_norms(w, block_rows=block_rows))
    assert got.shape == (n,) and got.dtype == mx.float32
    assert_close(got, explicit_norms(w, a, b, scale), 1e-5, 1e-5, "row norms")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_row_norms_match_the_adapted_weight_quantized(bits, dtype):
    mx.random.seed(1)
    base = make_base(f"q{bits}", input_dims=256, output_dims=200, dtype=dtype)
    a, b = 0.1 * mx.random.normal((256, 4)), 0.1 * mx.random.normal((4, 200))
    q = dict(scales=base.scales, biases=base.biases, group_size=64, bits=bits, mode="affine")
    sq = base_row_sq_norms(base.weight, block_rows=16, **q)
    got = adapted_row_norms(base.weight, a, b, 3.0, sq, **q)
    assert_close(got, explicit_norms(dense(base), a, b, 3.0), 1e-5, 1e-5, "quantized row norms")


def test_row_norms_mxfp4():
    mx.random.seed(12)
    base = nn.QuantizedLinear.from_linear(nn.Linear(128, 136), group_size=32, bits=4, mode="mxfp4")
    a, b = 0.1 * mx.random.normal((128, 4)), 0.1 * mx.random.normal((4, 136))
    q = dict(scales=base.scales, biases=None, group_size=32, bits=4, mode="mxfp4")
    got = adapted_row_norms(base.weight, a, b, 2.0, base_row_sq_norms(base.weight, **q), **q)
    w = mx.dequantize(base.weight, base.scales, group_size=32, bits=4, mode="mxfp4")
    assert_close(got, explicit_norms(w, a, b, 2.0), 1e-5, 1e-5, "mxfp4 row norms")
    layer = FusedDoRALinear.from_base(base, r=4)
    assert_close(layer.m, mx.linalg.norm(w.astype(mx.float32), axis=1), 1e-5, 1e-6, "mxfp4 m")
    assert layer(mx.random.normal((3, 128))).shape == (3, 136)


def test_row_norms_bf16_dense_are_the_float32_adapted_weights():
    mx.random.seed(2)
    w = mx.random.normal((160, 128)).astype(mx.bfloat16)
    a, b = 0.1 * mx.random.normal((128, 8)), 0.1 * mx.random.normal((8, 160))
    got = adapted_row_norms(w, a, b, 2.0, base_row_sq_norms(w))
    assert_close(got, explicit_norms(w, a, b, 2.0), 1e-5, 0.0, "bf16 row norms")


# -- the layer against mlx-lm's --


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", BASES)
def test_same_parameters_and_init_as_mlx_lm(kind, bias):
    base = make_base(kind, bias=bias)
    mx.random.seed(3)
    ref = DoRALinear.from_base(base, r=4, scale=5.0)
    mx.random.seed(3)
    ours = FusedDoRALinear.from_base(base, r=4, scale=5.0)
    assert mx.array_equal(ours.lora_a, ref.lora_a).item(), "one seed, the same initial lora_a"
    shapes = {k: (v.shape, v.dtype) for k, v in tree_flatten(ours.parameters())}
    assert shapes == {k: (v.shape, v.dtype) for k, v in tree_flatten(ref.parameters())}
    assert_close(ours.m, ref.m, 1e-6, 1e-6, "m at init")
    assert ours.linear is base and ours.scale == 5.0
    # The cached base norms are state, not parameters: never saved, never trained.
    assert "_base_sq_norms" not in dict(tree_flatten(ours.parameters()))
    plain = FusedDoRALinear(32, 16, r=2, bias=bias)
    assert plain.m.shape == (16,) and ("bias" in plain.linear) == bias


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", BASES)
def test_outputs_and_grads_match_mlx_lm(kind, bias, dropout):
    mx.random.seed(4)
    ref, ours = paired(kind, bias=bias, dropout=dropout)
    x = mx.random.normal((3, 5, 128))
    seed = 11
    if dropout > 0:
        mx.random.seed(seed)
        ref.dropout = FixedMask(dropout_mask(draw_dropout_key(), x.shape, dropout))
    y_ref, gx_ref, gp_ref = grads(ref, x, seed)
    y, gx, gp = grads(ours, x, seed)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert_close(y, y_ref, 1e-5, 1e-5, "y")
    assert_close(gx, gx_ref, 1e-5, 1e-5, "dx")
    assert set(gp) == set(gp_ref) == {"lora_a", "lora_b", "m"}
    for name in gp:
        assert_close(gp[name], gp_ref[name], 1e-4, 1e-5, f"d{name}")


def test_dropout_only_in_training():
    mx.random.seed(5)
    ref, ours = paired("dense", dropout=0.5)
    x = mx.random.normal((4, 128))
    ours.eval()
    ref.eval()
    assert_close(ours(x), ref(x), 1e-5, 1e-5, "eval mode: no dropout")
    ours.train()
    assert not mx.allclose(ours(x), ours(x)).item(), "a fresh mask per training call"


@pytest.mark.parametrize("kind", ["dense", "q4"])
def test_bf16_activations_match_mlx_lm(kind):
    mx.random.seed(6)
    ref, ours = paired(kind, dtype=mx.bfloat16)
    x = mx.random.normal((6, 128)).astype(mx.bfloat16)
    y_ref, gx_ref, gp_ref = grads(ref, x, 0)
    y, gx, gp = grads(ours, x, 0)
    assert y.dtype == mx.bfloat16 and gx.dtype == mx.bfloat16
    assert_close(y, y_ref, 2e-2, 1e-2, "bf16 y")
    assert_close(gx, gx_ref, 2e-2, 1e-2, "bf16 dx")
    for name in gp:
        assert gp[name].dtype == gp_ref[name].dtype
        assert_close(gp[name], gp_ref[name], 2e-2, 1e-2, f"bf16 d{name}")


def test_gradient_of_m_by_finite_differences():
    mx.random.seed(7)
    _, ours = paired("q4", bias=True)
    x = mx.random.normal((4, 128))

    def loss(m):
        ours.m = m
        return mx.sum(mx.sin(ours(x)))

    m0 = ours.m
    g = mx.grad(loss)(m0)
    eps = 1e-2
    for i in (0, 17, 95):
        e = mx.zeros_like(m0).at[i].add(eps)
        fd = (loss(m0 + e) - loss(m0 - e)) / (2 * eps)
        assert abs(fd.item() - g[i].item()) <= 1e-2 * max(1.0, abs(fd.item())), (i, fd.item(), g[i].item())


def test_norm_is_a_constant_for_the_gradient():
    """As in mlx-lm, no gradient flows into lora_a/lora_b through the norm."""
    mx.random.seed(8)
    _, ours = paired("dense")

    def through_norm(a):
        ours.lora_a = a
        return ours.adapted_norms().sum()

    assert mx.all(mx.grad(through_norm)(ours.lora_a) == 0).item()


def test_set_linear_recomputes_base_norms():
    mx.random.seed(9)
    layer = FusedDoRALinear(64, 32, r=4)
    new_base = make_base("q4", input_dims=64, output_dims=32)
    layer.set_linear(new_base)
    assert_close(layer.m, mx.linalg.norm(dense(new_base), axis=1), 1e-5, 1e-6, "m after set_linear")
    assert_close(layer.adapted_norms(), layer.m, 1e-5, 1e-6, "lora_b = 0: adapted norm is the base's")


def test_compiled_training_step_matches_eager():
    """The cached norms travel through mx.compile as state (as in mlx-lm's trainer)."""
    mx.random.seed(10)
    _, ours = paired("q4", dropout=0.1)
    x = mx.random.normal((4, 128))
    loss_and_grad = nn.value_and_grad(ours, lambda x: (ours(x) ** 2).sum())
    state = [ours.state, mx.random.state]
    compiled = mx.compile(loss_and_grad, inputs=state, outputs=state)
    mx.random.seed(3)
    eager = loss_and_grad(x)
    mx.random.seed(3)
    traced = compiled(x)
    assert_close(traced[0], eager[0], 1e-5, 1e-5, "compiled loss")
    for (k, a), (_, b) in zip(tree_flatten(traced[1]), tree_flatten(eager[1]), strict=True):
        assert_close(a, b, 1e-5, 1e-5, f"compiled d{k}")


# -- fuse --


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", BASES)
def test_fuse_matches_mlx_lm_and_the_layer(kind, bias):
    mx.random.seed(13)
    ref, ours = paired(kind, bias=bias, scale=4.0)
    ours.eval()
    x = mx.random.normal((5, 128))
    exact = ours.fuse(dequantize=True)
    assert type(exact) is nn.Linear and ("bias" in exact) == bias
    assert_close(exact.weight, ref.fuse(dequantize=True).weight, 1e-5, 1e-6, "fused weight vs mlx-lm")
    assert_close(exact(x), ours(x), 1e-5, 1e-5, "fuse(dequantize=True) output vs the layer")
    # Each fused row has the learned magnitude as its norm.
    assert_close(mx.linalg.norm(exact.weight.astype(mx.float32), axis=1), ours.m, 1e-5, 1e-6, "row norms = m")
    if kind != "dense":
        requantized = ours.fuse()
        assert isinstance(requantized, nn.QuantizedLinear) and requantized.bits == int(kind[1:])
        expected = nn.QuantizedLinear.from_linear(exact, ours.linear.group_size, requantized.bits)
        assert mx.array_equal(requantized.weight, expected.weight).item()
        assert mx.array_equal(requantized.scales, expected.scales).item()


def test_fuse_bf16_keeps_the_base_dtype():
    mx.random.seed(14)
    _, ours = paired("dense", dtype=mx.bfloat16)
    assert ours.fuse().weight.dtype == mx.bfloat16


def test_fuse_warns_when_the_change_is_below_the_step():
    mx.random.seed(15)
    _, ours = paired("q4", scale=1e-5)
    ours.m = mx.sqrt(ours._base_sq_norms)  # m at its initial value: the fold changes ~nothing
    with pytest.warns(UserWarning, match="quantization step"):
        ours.fuse()
