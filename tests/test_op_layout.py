"""The op's fixed input slots (ops/layout.py) and the C++ builders that take them."""

import mlx.core as mx
import pytest
from mlx_fused_lora import _ext
from mlx_fused_lora.ops import layout


def test_slots_are_fixed_whatever_bias_and_p():
    x, w = mx.ones((3, 4)), mx.ones((5, 4))
    a, b = mx.ones((4, 2)), mx.ones((2, 5))
    for bias in (None, mx.ones((5,))):
        for p, key in ((0.0, None), (0.0, mx.random.key(1)), (0.3, mx.random.key(1))):
            slots = layout.op_inputs(x, w, bias, a, b, key, p)
            assert len(slots) == 6 and slots.x is x and slots.weight is w
            assert slots.bias.shape == ((5,) if bias is not None else (0,)) and slots.bias.dtype == x.dtype
            assert layout.has_bias(slots.bias) == (bias is not None)
            assert slots.key.dtype == mx.uint32 and slots.key.shape == (2,)
            if p == 0:  # never read: zeros, so the graph does not depend on a stale key
                assert mx.array_equal(slots.key, mx.zeros((2,), dtype=mx.uint32))
            else:
                assert slots.key is key


def test_cotangents_follow_the_slots():
    x, w = mx.ones((3, 4)), mx.ones((5, 4))
    slots = layout.op_inputs(x, w, None, mx.ones((4, 2)), mx.ones((2, 5)), None, 0.0)
    dy = mx.ones((3, 5))
    ct = layout.cotangents(slots, dy, dx=mx.zeros((3, 4)), d_lora_a=mx.zeros((4, 2)), d_lora_b=mx.zeros((2, 5)))
    assert [c.shape for c in ct] == [s.shape for s in slots]
    assert ct[2].shape == (0,)  # no bias: an empty cotangent for the empty slot


def test_builders_take_fixed_slots_and_check_them():
    x, w = mx.ones((3, 4)), mx.ones((5, 4))
    a, b = mx.ones((4, 2)), mx.ones((2, 5))
    no_bias, key = mx.zeros((0,)), mx.zeros((2,), dtype=mx.uint32)
    y, h = _ext.lora_forward(x, w, no_bias, a, b, key, scale=1.0, dropout=0.0)
    assert y.shape == (3, 5) and h.shape == (3, 2)
    assert mx.array_equal(y, x @ w.T + (x @ a) @ b)
    with pytest.raises(ValueError, match="bias must be \\(N,\\) or \\(0,\\)"):
        _ext.lora_forward(x, w, mx.zeros((4,)), a, b, key, scale=1.0, dropout=0.0)
    with pytest.raises(ValueError, match="key must be a uint32 array of shape \\(2,\\)"):
        _ext.lora_forward(x, w, no_bias, a, b, mx.zeros((3,), dtype=mx.uint32), scale=1.0, dropout=0.0)
    with pytest.raises(ValueError, match="dropout must be in \\[0, 1\\), got 1"):
        _ext.lora_forward(x, w, no_bias, a, b, key, scale=1.0, dropout=1.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        _ext.lora_forward(x, w, no_bias, a, b, key, scale=float("inf"), dropout=0.0)


def test_onto_builders_add_the_rank_r_term_to_a_given_base():
    x = mx.random.normal((6, 8), key=mx.random.key(0))
    base = mx.random.normal((6, 3), key=mx.random.key(1))
    a, b = mx.random.normal((8, 2), key=mx.random.key(2)), mx.random.normal((2, 3), key=mx.random.key(3))
    bias, key = mx.ones((3,)), mx.zeros((2,), dtype=mx.uint32)
    y, h = _ext.lora_forward_onto(x, base, bias, a, b, key, scale=0.5, dropout=0.0)
    assert mx.allclose(y, base + bias + 0.5 * (x @ a) @ b, atol=1e-5) and mx.allclose(h, x @ a, atol=1e-5)
    ds = mx.random.normal((6, 2), key=mx.random.key(4))
    dx = _ext.lora_input_grad_onto(x, ds, a, key, dropout=0.0)
    assert mx.allclose(dx, x + ds @ a.T, atol=1e-5)
    with pytest.raises(ValueError, match="base must be \\(M, N\\)"):
        _ext.lora_forward_onto(x, mx.zeros((5, 3)), bias, a, b, key, scale=0.5, dropout=0.0)


def test_test_hooks_live_in_the_testing_submodule():
    assert not hasattr(_ext, "blas_matmul") and not hasattr(_ext, "dropout_bits")
    out = _ext.testing.blas_matmul(mx.ones((2, 3)), mx.ones((4, 3)), transpose_b=True)
    assert mx.array_equal(out, mx.full((2, 4), 3.0))
