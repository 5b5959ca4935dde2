"""Issue 12's op defects, one test each: no crash for any shape, non-finite values
as plain MLX gives them, scalars checked in float32, errors that name the argument."""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_fused_lora import dropout_mask, fused_lora_linear
from mlx_fused_lora.ops import reference

DTYPES = [mx.float32, mx.float16, mx.bfloat16]


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_issue_repro_half_precision_backward_with_n_zero_does_not_crash(dtype):
    """Was SIGFPE (a division by zero in the tile size): the interpreter died."""
    x = mx.ones((4, 8), dtype)
    w = mx.ones((0, 8), dtype)
    a, b = mx.ones((8, 2)), mx.ones((2, 0))
    gx = mx.grad(lambda x: fused_lora_linear(x, w, None, a, b, scale=1.0).astype(mx.float32).sum())(x)
    assert gx.shape == (4, 8) and gx.dtype == dtype
    assert mx.array_equal(gx, mx.zeros((4, 8), dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", [(4, 8, 0), (0, 8, 5), (4, 0, 5), (0, 0, 0), (3, 0, 0), (0, 6, 0)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_empty_dimensions_give_what_plain_mlx_gives(dtype, m, k, n, p):
    """Empty results for M = 0 or N = 0, the empty sum (bias) for K = 0; gradients
    of the right shapes, equal to the reference's."""
    mx.random.seed(1)
    x = mx.random.normal((m, k)).astype(dtype)
    w = mx.random.normal((n, k)).astype(dtype)
    bias = mx.random.normal((n,)).astype(dtype)
    a, b = mx.random.normal((k, 3)), mx.random.normal((3, n))
    key = mx.random.key(0)
    mask = dropout_mask(key, x.shape, p) if p > 0 else None
    y = fused_lora_linear(x, w, bias, a, b, scale=1.5, dropout=p, key=key)
    y_ref = reference.lora_linear(x, w, bias, a, b, 1.5, mask)
    assert y.shape == (m, n) and y.dtype == dtype
    assert mx.array_equal(y, y_ref)

    def fused(x, bias, a, b):
        return fused_lora_linear(x, w, bias, a, b, scale=1.5, dropout=p, key=key).astype(mx.float32).sum()

    def ref(x, bias, a, b):
        return reference.lora_linear(x, w, bias, a, b, 1.5, mask).astype(mx.float32).sum()

    grads = mx.grad(fused, argnums=(0, 1, 2, 3))(x, bias, a, b)
    grads_ref = mx.grad(ref, argnums=(0, 1, 2, 3))(x, bias, a, b)
    for g, g_ref, primal in zip(grads, grads_ref, (x, bias, a, b), strict=True):
        assert g.shape == primal.shape and g.dtype == primal.dtype
        assert np.allclose(np.array(g.astype(mx.float32)), np.array(g_ref.astype(mx.float32)), atol=1e-2)


def test_k_zero_with_leading_dims():
    """x of shape (2, 3, 0): the old reshape(-1, K) could not infer -1."""
    x = mx.zeros((2, 3, 0))
    y = fused_lora_linear(x, mx.zeros((4, 0)), mx.ones((4,)), mx.zeros((0, 2)), mx.zeros((2, 4)), scale=1.0)
    assert y.shape == (2, 3, 4) and mx.array_equal(y, mx.ones((2, 3, 4)))


TOL = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}


def assert_same_non_finite(actual, expected, tol=TOL[mx.float32]):
    """Same NaN, +inf and -inf positions, finite values close (relative to the largest)."""
    a = np.array(actual.astype(mx.float32))
    e = np.array(expected.astype(mx.float32))
    assert a.shape == e.shape
    for kind in (np.isnan, np.isposinf, np.isneginf):
        assert np.array_equal(kind(a), kind(e)), kind.__name__
    finite = np.isfinite(e)
    if finite.any():
        assert np.abs(a[finite] - e[finite]).max() <= tol * max(np.abs(e[finite]).max(), 1e-6)


def plain_mlx(x, w, bias, a, b, scale):
    """mlx-lm's LoRALinear forward in plain MLX ops."""
    return x @ w.T + bias + scale * ((x @ a) @ b)


@pytest.mark.parametrize("r", [1, 3, 5, 6])
@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_inf_in_lora_b_gives_inf_not_nan(r, value):
    """r % 4 != 0: the zero-coefficient padding lanes used to compute 0 * inf = NaN."""
    mx.random.seed(2)
    x, w, bias = mx.random.normal((7, 12)), mx.random.normal((9, 12)), mx.random.normal((9,))
    a, b = mx.random.normal((12, r)), mx.random.normal((r, 9))
    b[0, 4] = value
    y = fused_lora_linear(x, w, bias, a, b, scale=0.5)
    assert np.isinf(np.array(y[:, 4])).all()
    assert_same_non_finite(y, plain_mlx(x, w, bias, a, b, 0.5))
    assert_same_non_finite(y, reference.lora_linear(x, w, bias, a, b, 0.5))
    ct = mx.random.normal(y.shape)

    def loss(f):
        return lambda x, a, b: (f(x, a, b) * ct).sum()

    g = mx.grad(loss(lambda x, a, b: fused_lora_linear(x, w, bias, a, b, scale=0.5)), argnums=(0, 1, 2))(x, a, b)
    g_plain = mx.grad(loss(lambda x, a, b: plain_mlx(x, w, bias, a, b, 0.5)), argnums=(0, 1, 2))(x, a, b)
    for gi, gp in zip(g, g_plain, strict=True):
        assert_same_non_finite(gi, gp)


@pytest.mark.parametrize("m", [5, 6, 7, 9])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inf_row_in_last_partial_row_block_keeps_da_finite_elsewhere(m, dtype):
    """M % 4 != 0, inf in the last row of x: dA's other columns stay finite (the
    padding rows of the last block used to repeat a real row with coefficient 0)."""
    mx.random.seed(3)
    x = mx.random.normal((m, 10)).astype(dtype)
    x[m - 1, 2] = math.inf
    w = mx.random.normal((6, 10)).astype(dtype)
    a, b = mx.random.normal((10, 3)), mx.random.normal((3, 6))
    ct = mx.random.normal((m, 6))
    da = mx.grad(lambda a: (fused_lora_linear(x, w, None, a, b, scale=1.0).astype(mx.float32) * ct).sum())(a)
    da_plain = mx.grad(lambda a: (plain_mlx(x.astype(mx.float32), w.astype(mx.float32), 0, a, b, 1.0) * ct).sum())(a)
    assert np.isfinite(np.delete(np.array(da), 2, axis=0)).all()
    assert_same_non_finite(da, da_plain, TOL[dtype])


@pytest.mark.parametrize("scale", [1e39, -1e39, 3.5e38])
def test_scale_that_is_inf_in_float32_is_rejected(scale):
    with pytest.raises(ValueError, match="`scale` must be finite in float32") as info:
        fused_lora_linear(mx.zeros((2, 4)), mx.zeros((3, 4)), None, mx.zeros((4, 1)), mx.zeros((1, 3)), scale=scale)
    assert "inf in float32" in str(info.value)


def test_largest_float32_scale_is_accepted():
    big = float(np.finfo(np.float32).max)
    y = fused_lora_linear(mx.zeros((2, 4)), mx.zeros((3, 4)), None, mx.zeros((4, 1)), mx.zeros((1, 3)), scale=big)
    assert y.shape == (2, 3)


@pytest.mark.parametrize("p", [0.99999999, 1 - 2**-26])
def test_dropout_that_is_one_in_float32_is_rejected_naming_the_value(p):
    with pytest.raises(ValueError, match="`dropout` must be in \\[0, 1\\) as a float32") as info:
        fused_lora_linear(
            mx.zeros((2, 4)),
            mx.zeros((3, 4)),
            None,
            mx.zeros((4, 1)),
            mx.zeros((1, 3)),
            scale=1.0,
            dropout=p,
            key=mx.random.key(0),
        )
    assert str(p) in str(info.value) and "1.0 in float32" in str(info.value)
    with pytest.raises(ValueError, match="`dropout`"):
        dropout_mask(mx.random.key(0), (2, 2), p)


def test_largest_float32_dropout_below_one_works():
    p = float(np.nextafter(np.float32(1), np.float32(0)))
    mask = np.array(dropout_mask(mx.random.key(0), (64, 64), p))
    assert set(np.unique(mask)) <= {0.0, np.float32(1) / (np.float32(1) - np.float32(p))}


@pytest.mark.parametrize("shape", [(-1, 4), (3, -2), (2**31, 2), (2**40,)])
def test_dropout_mask_bad_dimension_names_shape(shape):
    with pytest.raises(ValueError, match="`shape` must be a sequence of ints in") as info:
        dropout_mask(mx.random.key(0), shape, 0.5)
    assert str(tuple(shape)) in str(info.value)


def test_dropout_mask_bad_shape_type_and_dtype():
    with pytest.raises(ValueError, match="`shape` must be a sequence of ints, got int"):
        dropout_mask(mx.random.key(0), 5, 0.5)
    with pytest.raises(ValueError, match="`shape` must be .*got \\(2.5,\\)"):
        dropout_mask(mx.random.key(0), (2.5,), 0.5)
    with pytest.raises(ValueError, match="`dtype` must be float32, float16 or bfloat16, got mlx.core.int32"):
        dropout_mask(mx.random.key(0), (2, 2), 0.5, dtype=mx.int32)


def test_dropout_mask_empty_shapes():
    for shape in [(0,), (3, 0), (0, 5), ()]:
        m = dropout_mask(mx.random.key(0), shape, 0.5)
        assert m.shape == shape
