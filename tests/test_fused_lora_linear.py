"""The fused op against reference.py (forward and every gradient) and finite differences."""

import itertools

import mlx.core as mx
import numpy as np
import pytest
from mlx_fused_lora import dropout_mask, fused_lora_linear
from mlx_fused_lora.ops import reference

# Relative (to the reference's largest magnitude) error allowed per compute dtype:
# float32 math throughout, so only the output's final rounding differs.
TOL = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}


def make_inputs(shape, n, r, dtype, adapter_dtype=None, bias=True, seed=0):
    """Random inputs scaled so that the base and LoRA terms are of similar size."""
    mx.random.seed(seed)
    k = shape[-1]
    adapter_dtype = adapter_dtype or dtype
    x = mx.random.normal(shape).astype(dtype)
    w = (mx.random.normal((n, k)) / k**0.5).astype(dtype)
    b = mx.random.normal((n,)).astype(dtype) if bias else None
    a = (mx.random.normal((k, r)) / k**0.5).astype(adapter_dtype)
    bb = (mx.random.normal((r, n)) / r**0.5).astype(adapter_dtype)
    return x, w, b, a, bb


def rel_err(actual, expected):
    actual = np.array(actual.astype(mx.float32))
    expected = np.array(expected.astype(mx.float32))
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-6))


def both(fn_args, p, key, scale):
    """Loss closures over (x, bias, lora_a, lora_b) for the fused op and the reference."""
    x, w, b, a, bb = fn_args
    mask = dropout_mask(key, x.shape, p) if p > 0 else None
    # A fixed random cotangent, so every output element's gradient is exercised.
    ct = mx.random.normal((*x.shape[:-1], w.shape[0]), key=mx.random.key(99))

    def fused(x, b, a, bb):
        y = fused_lora_linear(x, w, b, a, bb, scale=scale, dropout=p, key=key)
        return (y.astype(mx.float32) * ct).sum()

    def ref(x, b, a, bb):
        return (reference.lora_linear(x, w, b, a, bb, scale, mask).astype(mx.float32) * ct).sum()

    return fused, ref


SHAPES = [
    # (x shape, N, r)
    ((1, 64), 48, 8),  # M = 1 (decode)
    ((37, 53), 29, 5),  # odd everything
    ((64, 96), 80, 1),  # r = 1
    ((33, 128), 72, 64),  # r = 64
    ((2, 5, 24), 40, 4),  # 3-D x
    ((3, 1, 7, 16), 9, 3),  # 4-D x, tiny dims
    ((300, 257), 131, 16),  # several tiles, odd K
]


@pytest.mark.parametrize("shape,n,r", SHAPES)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_forward_and_grads_match_reference(shape, n, r, dtype, p):
    args = make_inputs(shape, n, r, dtype)
    key = mx.random.key(7)
    scale = 1.7
    x, w, b, a, bb = args
    y = fused_lora_linear(x, w, b, a, bb, scale=scale, dropout=p, key=key)
    mask = dropout_mask(key, x.shape, p) if p > 0 else None
    y_ref = reference.lora_linear(x, w, b, a, bb, scale, mask)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < TOL[dtype]

    fused, ref = both(args, p, key, scale)
    g = mx.grad(fused, argnums=(0, 1, 2, 3))(x, b, a, bb)
    g_ref = mx.grad(ref, argnums=(0, 1, 2, 3))(x, b, a, bb)
    for name, gi, gr, src in zip(("x", "bias", "lora_a", "lora_b"), g, g_ref, (x, b, a, bb), strict=False):
        assert gi.dtype == src.dtype, name
        assert rel_err(gi, gr) < TOL[dtype], name


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_float32_adapters_with_bf16_x(p):
    """mlx-lm keeps adapters in float32; the output stays bf16 and matches the reference."""
    args = make_inputs((2, 19, 96), 64, 8, mx.bfloat16, adapter_dtype=mx.float32)
    x, w, b, a, bb = args
    key = mx.random.key(3)
    y = fused_lora_linear(x, w, b, a, bb, scale=2.0, dropout=p, key=key)
    assert y.dtype == mx.bfloat16
    mask = dropout_mask(key, x.shape, p) if p > 0 else None
    assert rel_err(y, reference.lora_linear(x, w, b, a, bb, 2.0, mask)) < TOL[mx.bfloat16]
    fused, ref = both(args, p, key, 2.0)
    g = mx.grad(fused, argnums=(0, 2, 3))(x, b, a, bb)
    g_ref = mx.grad(ref, argnums=(0, 2, 3))(x, b, a, bb)
    assert [t.dtype for t in g] == [mx.bfloat16, mx.float32, mx.float32]
    for gi, gr in zip(g, g_ref, strict=False):
        assert rel_err(gi, gr) < TOL[mx.bfloat16]


def test_non_contiguous_x():
    x, w, b, a, bb = make_inputs((40, 24), 16, 4, mx.float32)
    xt = mx.random.normal((24, 40)).T  # a transposed view: strided, not row-contiguous
    key = mx.random.key(1)
    for p in (0.0, 0.3):
        mask = dropout_mask(key, xt.shape, p) if p > 0 else None
        y = fused_lora_linear(xt, w, b, a, bb, scale=0.5, dropout=p, key=key)
        assert rel_err(y, reference.lora_linear(xt, w, b, a, bb, 0.5, mask)) < TOL[mx.float32]
        g = mx.grad(lambda x, p=p: fused_lora_linear(x, w, b, a, bb, scale=0.5, dropout=p, key=key).sum())(xt)
        g_ref = mx.grad(lambda x, mask=mask: reference.lora_linear(x, w, b, a, bb, 0.5, mask).sum())(xt)
        assert rel_err(g, g_ref) < TOL[mx.float32]


def test_no_bias_and_empty_batch():
    x, w, _, a, bb = make_inputs((5, 12), 7, 2, mx.float32, bias=False)
    y = fused_lora_linear(x, w, None, a, bb, scale=1.0)
    assert rel_err(y, reference.lora_linear(x, w, None, a, bb, 1.0)) < TOL[mx.float32]
    empty = fused_lora_linear(mx.zeros((0, 12)), w, None, a, bb, scale=1.0)
    assert empty.shape == (0, 7)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_grads_against_finite_differences(p):
    """Directional derivatives of the fused op against central differences."""
    x, w, b, a, bb = make_inputs((6, 10), 8, 3, mx.float32)
    key = mx.random.key(11)
    ct = mx.random.normal((6, 8), key=mx.random.key(5))

    def loss(x, b, a, bb):
        return (fused_lora_linear(x, w, b, a, bb, scale=1.3, dropout=p, key=key) * ct).sum()

    grads = mx.grad(loss, argnums=(0, 1, 2, 3))(x, b, a, bb)
    primals = [x, b, a, bb]
    eps = 1e-2
    for i, g in enumerate(grads):
        v = mx.random.normal(primals[i].shape, key=mx.random.key(20 + i))
        plus = list(primals)
        minus = list(primals)
        plus[i] = primals[i] + eps * v
        minus[i] = primals[i] - eps * v
        fd = (loss(*plus) - loss(*minus)).item() / (2 * eps)
        analytic = (g * v).sum().item()
        assert abs(fd - analytic) <= 2e-3 * max(1.0, abs(analytic)), (i, fd, analytic)


def test_grad_of_any_subset_and_weight_grad_when_asked():
    x, w, b, a, bb = make_inputs((9, 14), 11, 4, mx.float32)
    key = mx.random.key(2)
    mask = dropout_mask(key, x.shape, 0.1)

    def fused(*args):
        return fused_lora_linear(*args, scale=0.7, dropout=0.1, key=key).sum()

    def ref(*args):
        return reference.lora_linear(*args, 0.7, mask).sum()

    primals = (x, w, b, a, bb)
    for size in (1, 2, 3):
        for argnums in itertools.combinations(range(5), size):
            g = mx.grad(fused, argnums=argnums)(*primals)
            g_ref = mx.grad(ref, argnums=argnums)(*primals)
            for gi, gr in zip(g, g_ref, strict=False):
                assert rel_err(gi, gr) < TOL[mx.float32], argnums


def test_compiled_matches_eager_and_takes_new_keys():
    """Under mx.compile the key is an input: a new key changes the mask, no retrace needed."""
    x, w, b, a, bb = make_inputs((16, 32), 24, 4, mx.float32)

    def f(x, a, bb, key):
        return fused_lora_linear(x, w, b, a, bb, scale=2.0, dropout=0.3, key=key)

    cf = mx.compile(f)
    for seed in (0, 1):
        key = mx.random.key(seed)
        assert rel_err(cf(x, a, bb, key), f(x, a, bb, key)) < 1e-6
    assert not mx.array_equal(cf(x, a, bb, mx.random.key(0)), cf(x, a, bb, mx.random.key(1)))
    g = mx.compile(mx.grad(lambda x, a, bb, key: f(x, a, bb, key).sum(), argnums=(0, 1, 2)))
    g_eager = mx.grad(lambda x, a, bb, key: f(x, a, bb, key).sum(), argnums=(0, 1, 2))
    for gi, ge in zip(g(x, a, bb, mx.random.key(4)), g_eager(x, a, bb, mx.random.key(4)), strict=False):
        assert rel_err(gi, ge) < 1e-6


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_jvp_matches_reference(p):
    x, w, b, a, bb = make_inputs((2, 7, 12), 10, 3, mx.float32)
    key = mx.random.key(8)
    mask = dropout_mask(key, x.shape, p) if p > 0 else None
    primals = [x, w, b, a, bb]
    tangents = [mx.random.normal(t.shape, key=mx.random.key(30 + i)) for i, t in enumerate(primals)]
    _, (ty,) = mx.jvp(lambda *args: fused_lora_linear(*args, scale=0.9, dropout=p, key=key), primals, tangents)
    _, (ty_ref,) = mx.jvp(lambda *args: reference.lora_linear(*args, 0.9, mask), primals, tangents)
    assert rel_err(ty, ty_ref) < TOL[mx.float32]
    # with respect to x alone (MLX hands the other tangents over as None)
    _, (tx,) = mx.jvp(lambda x: fused_lora_linear(x, w, b, a, bb, scale=0.9, dropout=p, key=key), [x], tangents[:1])
    _, (tx_ref,) = mx.jvp(lambda x: reference.lora_linear(x, w, b, a, bb, 0.9, mask), [x], tangents[:1])
    assert rel_err(tx, tx_ref) < TOL[mx.float32]
