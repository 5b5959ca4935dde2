"""fused_lora_onto: the LoRA term onto a caller's base product equals the fused op whose base
made that product (forward and every gradient, the base's too), on the CPU extension and the
plain-MLX fallback; one adapter is its n = 1 case; bad inputs are named errors."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_fused_lora import fused_lora_linear, fused_lora_onto
from mlx_fused_lora.ops import layout
from mlx_fused_lora.ops.backends import reference as reference_backend

TOL = {mx.float32: 2e-5, mx.float16: 3e-3, mx.bfloat16: 2e-2}


def close(a, b, tol):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    assert a.shape == b.shape
    assert np.abs(a - b).max(initial=0) <= tol * max(np.abs(b).max(initial=0), 1e-6)


def make(shape, n_out, r, count, dtype):
    keys = mx.random.split(mx.random.key(0), 4)
    k = shape[-1]
    x = mx.random.normal(shape, key=keys[0]).astype(dtype)
    w = (mx.random.normal((n_out, k), key=keys[1]) / k**0.5).astype(dtype)
    a = mx.random.normal((count, k, r), key=keys[2]) / k**0.5
    b = mx.random.normal((count, r, n_out), key=keys[3]) / r**0.5
    return x, w, a, b


CASES = [
    ((9, 37), 29, 5, 4, [0, 2, -1, 1, 2, 0, 0, -1, 2]),  # per row, repeats, -1, adapter 3 unused
    ((3, 6, 24), 20, 2, 3, [2, -1, 0]),  # per sequence
]


@pytest.mark.parametrize("case", CASES, ids=["per-row", "per-sequence"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_onto_equals_the_fused_op_over_that_base(case, dtype, p):
    shape, n_out, r, count, ids = case
    x, w, a, b = make(shape, n_out, r, count, dtype)
    ids = mx.array(ids, dtype=mx.int32)
    scales = mx.array([0.5, 2.0, -1.0, 3.0][:count])
    key = mx.random.key(11)
    ct = mx.random.normal((*shape[:-1], n_out), key=mx.random.key(5))

    def onto(x, a, b, s):
        y = fused_lora_onto(x, x @ w.T, a, b, scale=s, dropout=p, key=key, adapter_ids=ids)
        return (y.astype(mx.float32) * ct).sum()

    def fused(x, a, b, s):
        y = fused_lora_linear(x, w, None, a, b, scale=s, dropout=p, key=key, adapter_ids=ids)
        return (y.astype(mx.float32) * ct).sum()

    args = (x, a, b, scales)
    close(
        fused_lora_onto(x, x @ w.T, a, b, scale=scales, dropout=p, key=key, adapter_ids=ids),
        fused_lora_linear(x, w, None, a, b, scale=scales, dropout=p, key=key, adapter_ids=ids),
        TOL[dtype],
    )
    for g_onto, g_fused in zip(
        mx.grad(onto, argnums=(0, 1, 2, 3))(*args), mx.grad(fused, argnums=(0, 1, 2, 3))(*args), strict=True
    ):
        close(g_onto, g_fused, 4 * TOL[dtype])
    # the base's own cotangent is dY, unchanged
    base = x @ w.T
    d_base = mx.grad(lambda y: (fused_lora_onto(x, y, a, b, scale=scales, adapter_ids=ids) * ct).sum())(base)
    assert mx.array_equal(d_base, ct.astype(dtype)).item()


def test_one_adapter_and_the_fallback():
    x, w, a, b = make((7, 16), 12, 3, 3, mx.float32)
    base = x @ w.T
    close(fused_lora_onto(x, base, a[1], b[1], scale=2.0), fused_lora_linear(x, w, None, a[1], b[1], scale=2.0), 1e-5)
    ids = mx.array([0, 1, 2, -1, 2, 2, 1], dtype=mx.int32)
    key, p = mx.random.key(3), 0.4
    scales = mx.array([1.0, 0.5, 2.0])
    ours = fused_lora_onto(x, base, a, b, scale=scales, dropout=p, key=key, adapter_ids=ids)
    inputs = layout.OntoInputs(x, base, a, b, key, scales, ids)
    with pytest.warns(UserWarning, match="plain-MLX"):
        close(reference_backend.lora_onto(inputs, p, hint=" (test)"), ours, 1e-5)
    empty = fused_lora_onto(x[:0], base[:0], a, b, scale=scales, adapter_ids=ids[:0])
    assert empty.shape == (0, 12)


def test_jvp_through_the_primitives():
    x, w, a, b = make((5, 8), 6, 2, 2, mx.float32)
    ids = mx.array([1, 0, -1, 1, 1], dtype=mx.int32)
    t = mx.random.normal(x.shape, key=mx.random.key(9))
    f = lambda x: fused_lora_onto(x, x @ w.T, a, b, scale=[1.0, 2.0], adapter_ids=ids)  # noqa: E731
    g = lambda x: fused_lora_linear(x, w, None, a, b, scale=[1.0, 2.0], adapter_ids=ids)  # noqa: E731
    close(mx.jvp(f, [x], [t])[1][0], mx.jvp(g, [x], [t])[1][0], 1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(base=mx.zeros((4, 3))), r"fused_lora_onto: `base` must be of shape x.shape\[:-1\] \+ \(N,\)"),
        (dict(base=mx.zeros((5, 6), dtype=mx.float16)), "fused_lora_onto: `base` must be x's dtype"),
        (dict(lora_b=mx.zeros((2, 2, 7))), r"fused_lora_onto: `lora_b` must be \(n, r, N\) = \(2, 2, 6\)"),
        (dict(adapter_ids=mx.zeros((4,), dtype=mx.int32)), "fused_lora_onto: `adapter_ids` must be of shape"),
        (dict(dropout=0.5), "fused_lora_onto: `key` must be an mx.random.key array"),
    ],
)
def test_bad_input_is_named(change, match):
    x, _, a, b = make((5, 8), 6, 2, 2, mx.float32)
    args = dict(base=mx.zeros((5, 6)), lora_a=a, lora_b=b, adapter_ids=mx.zeros((5,), dtype=mx.int32), dropout=0.0)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fused_lora_onto(
            x,
            args["base"],
            args["lora_a"],
            args["lora_b"],
            scale=1.0,
            dropout=args["dropout"],
            adapter_ids=args["adapter_ids"],
        )
