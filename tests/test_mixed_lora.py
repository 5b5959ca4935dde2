"""Mixed-adapter batches: every row on its own adapter, against each adapter alone, the
reference (gather_mm), finite differences; the single-adapter op as the n = 1 case, bit for
bit; the mask; out-of-range ids as a named error."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_fused_lora import dropout_mask, fused_lora_linear
from mlx_fused_lora.ops import fused_qlora_linear, layout, reference
from mlx_fused_lora.ops.backends import reference as reference_backend

TOL = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}
DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def as_np(a, rows=None):
    """a as a float32 numpy array, or its rows where the boolean numpy mask `rows` holds."""
    out = np.array(a.astype(mx.float32)) if isinstance(a, mx.array) else a
    return out if rows is None else out[rows]


def rel_err(actual, expected):
    actual, expected = as_np(actual), as_np(expected)
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max(initial=0) / max(np.abs(expected).max(initial=0), 1e-6))


def make(shape, n_out, r, count, dtype, adapter_dtype=mx.float32, seed=0):
    """x, W, bias and `count` stacked adapters (distinct, of similar size to the base)."""
    keys = mx.random.split(mx.random.key(seed), 5)
    k = shape[-1]
    x = mx.random.normal(shape, key=keys[0]).astype(dtype)
    w = (mx.random.normal((n_out, k), key=keys[1]) / k**0.5).astype(dtype)
    b = mx.random.normal((n_out,), key=keys[2]).astype(dtype)
    a = (mx.random.normal((count, k, r), key=keys[3]) / k**0.5).astype(adapter_dtype)
    bb = (mx.random.normal((count, r, n_out), key=keys[4]) / r**0.5).astype(adapter_dtype)
    return x, w, b, a, bb


def per_row(ids, x):
    """The ids of each row of x (broadcast from per-sequence ids)."""
    return np.broadcast_to(np.array(ids).reshape(*ids.shape, *([1] * (x.ndim - 1 - ids.ndim))), x.shape[:-1])


# (x shape, N, r, n adapters, ids as a list (per row or per sequence))
CASES = [
    # odd sizes, repeats, -1 rows, adapter 3 unused, scattered (in-place kernels)
    ((9, 37), 29, 5, 4, [0, 2, -1, 1, 2, 0, 0, -1, 2]),
    # long runs of one adapter (the BLAS on row ranges, widened adapters) beside short ones
    ((70, 48), 40, 17, 3, [0] * 30 + [2] * 20 + [1, 0, 2, -1, 1] * 4),
    # 3-D x, ids per sequence; r = 1
    ((3, 6, 24), 20, 1, 3, [2, -1, 0]),
    # 3-D x, ids per row, K and N of one element
    ((2, 3, 1), 1, 3, 2, [[1, 0, 1], [-1, 1, 0]]),
]


def losses(x, w, ids, scale_list, p, key, ct):
    """Loss closures: the mixed op over (x, bias, lora_a, lora_b, scales), and the single
    op over (x, bias, lora_a_i, lora_b_i) for adapter i with its scale."""

    def mixed(x, b, a, bb, scales):
        y = fused_lora_linear(x, w, b, a, bb, scale=scales, dropout=p, key=key, adapter_ids=ids)
        return (y.astype(mx.float32) * ct).sum()

    def alone(i):
        def loss(x, b, a, bb):
            y = fused_lora_linear(x, w, b, a, bb, scale=scale_list[i], dropout=p, key=key)
            return (y.astype(mx.float32) * ct).sum()

        return loss

    return mixed, alone


@pytest.mark.parametrize("case", CASES, ids=["scattered", "runs", "per-sequence", "tiny"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_mixed_batch_equals_each_adapter_alone(case, dtype, p):
    """Each row of a mixed batch, forward and every gradient, equals the single-adapter op
    with that row's adapter (same key, so the same mask); a -1 row equals the base alone; an
    unused adapter's gradients are exact zeros."""
    shape, n_out, r, count, id_list = case
    x, w, b, a, bb = make(shape, n_out, r, count, dtype)
    ids = mx.array(id_list, dtype=mx.int32)
    rows = per_row(ids, x)
    scale_list = [0.5 + i for i in range(count)]
    scales = mx.array(scale_list)
    key = mx.random.key(7)
    ct = mx.random.normal((*shape[:-1], n_out), key=mx.random.key(9))
    mixed, alone = losses(x, w, ids, scale_list, p, key, ct)

    y = fused_lora_linear(x, w, b, a, bb, scale=scales, dropout=p, key=key, adapter_ids=ids)
    assert y.dtype == dtype and y.shape == (*shape[:-1], n_out)
    gx, gb, ga, gbb, gs = mx.grad(mixed, argnums=(0, 1, 2, 3, 4))(x, b, a, bb, scales)
    assert (gx.dtype, gb.dtype, ga.shape, gbb.shape, gs.shape) == (dtype, dtype, a.shape, bb.shape, (count,))
    tol = TOL[dtype]
    base = fused_lora_linear(x, w, b, a[0], mx.zeros_like(bb[0]), scale=1.0)
    base_gx = mx.grad(alone(0), argnums=0)(x, b, a[0], mx.zeros_like(bb[0]))
    assert rel_err(as_np(y, rows == -1), as_np(base, rows == -1)) <= tol
    assert rel_err(as_np(gx, rows == -1), as_np(base_gx, rows == -1)) <= tol
    for i in range(count):
        sel = rows == i
        if not sel.any():
            assert mx.array_equal(ga[i], mx.zeros_like(ga[i])) and mx.array_equal(gbb[i], mx.zeros_like(gbb[i]))
            assert gs[i].item() == 0.0
            continue
        y_i = fused_lora_linear(x, w, b, a[i], bb[i], scale=scale_list[i], dropout=p, key=key)
        assert rel_err(as_np(y, sel), as_np(y_i, sel)) <= tol, i
        ct_i = ct * mx.array(sel)[..., None]  # the loss of adapter i's rows alone
        alone_i = losses(x, w, None, scale_list, p, key, ct_i)[1](i)
        gx_i, gb_i, ga_i, gbb_i = mx.grad(alone_i, argnums=(0, 1, 2, 3))(x, b, a[i], bb[i])
        assert rel_err(as_np(gx, sel), as_np(gx_i, sel)) <= tol, i
        assert rel_err(ga[i], ga_i) <= tol, i
        assert rel_err(gbb[i], gbb_i) <= tol, i
    assert rel_err(gb, ct.reshape(-1, n_out).sum(axis=0)) <= tol


REFERENCE_CASES = [
    # (x shape, N, r, ids): short runs, 5 adapters
    ((2, 11, 40), 36, 6, [[4, 4, 0, 1, -1, 2, 2, 2, 0, 4, 3], [1, 1, 1, 0, -1, -1, 4, 3, 2, 0, 1]]),
    # N = 1024: half-precision passes go by tiles of 64 rows, which these runs cross
    ((150, 32), 1024, 4, [0] * 70 + [4] * 5 + [1] * 40 + [-1] * 20 + [3] * 15),
]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=["short-runs", "tiles"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_mixed_op_matches_the_reference(case, dtype, p):
    """Forward and every gradient, the scales' included, against reference.py's gather_mm
    formula with the explicit mask; half-precision adapters too."""
    shape, n_out, r, id_list = case
    x, w, b, a, bb = make(shape, n_out, r, 5, dtype, adapter_dtype=dtype)
    ids = mx.array(id_list, dtype=mx.int32)
    scales = mx.array([2.0, -1.0, 0.25, 3.0, 1.0])
    key = mx.random.key(4)
    mask = dropout_mask(key, x.shape, p) if p > 0 else None
    ct = mx.random.normal((*shape[:-1], n_out), key=mx.random.key(5))

    def fused(*args):
        return fused_lora_linear(*args[:1], w, *args[1:4], scale=args[4], dropout=p, key=key, adapter_ids=ids)

    def ref(*args):
        return reference.lora_linear(args[0], w, *args[1:4], args[4], mask, ids)

    primals = (x, b, a, bb, scales)
    assert rel_err(fused(*primals), ref(*primals)) <= TOL[dtype]
    grads = mx.grad(lambda *t: (fused(*t).astype(mx.float32) * ct).sum(), argnums=tuple(range(5)))(*primals)
    ref_grads = mx.grad(lambda *t: (ref(*t).astype(mx.float32) * ct).sum(), argnums=tuple(range(5)))(*primals)
    for name, g, g_ref in zip(("x", "bias", "lora_a", "lora_b", "scales"), grads, ref_grads, strict=True):
        assert rel_err(g, g_ref) <= TOL[dtype], name


@pytest.mark.parametrize("m", [5, 40])  # in-place and widened adapters
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_n1_is_the_single_adapter_op_bit_for_bit(m, dtype, p):
    """One adapter stacked with every row on it (ids given, the scale as an array) is the
    single-adapter op: the same bits, forward and gradients, dense and quantized base."""
    x, w, b, a, bb = make((m, 64), 24, 8, 1, dtype)
    key = mx.random.key(3)
    ids = mx.zeros((m,), dtype=mx.int32)
    ct = mx.random.normal((m, 24), key=mx.random.key(1))
    wq, sq, bq = mx.quantize(w.astype(mx.float32), group_size=32, bits=4)
    sq, bq = sq.astype(dtype), bq.astype(dtype)
    q = dict(group_size=32, bits=4)

    def single(x, b, a2, b2):
        return fused_lora_linear(x, w, b, a2, b2, scale=1.7, dropout=p, key=key)

    def stacked(x, b, a2, b2):
        return fused_lora_linear(x, w, b, a2[None], b2[None], scale=[1.7], dropout=p, key=key, adapter_ids=ids)

    def q_single(x, b, a2, b2):
        return fused_qlora_linear(x, wq, sq, bq, b, a2, b2, **q, scale=1.7, dropout=p, key=key)

    def q_stacked(x, b, a2, b2):
        scales = mx.array([1.7])
        return fused_qlora_linear(x, wq, sq, bq, b, a2[None], b2[None], **q, scale=scales, dropout=p, key=key)

    for one, other in ((single, stacked), (q_single, q_stacked)):
        assert mx.array_equal(one(x, b, a[0], bb[0]), other(x, b, a[0], bb[0]))
        g1, g2 = (
            mx.grad(lambda *t, f=f: (f(*t).astype(mx.float32) * ct).sum(), argnums=(0, 1, 2, 3))(x, b, a[0], bb[0])
            for f in (one, other)
        )
        for u, v in zip(g1, g2, strict=True):
            assert mx.array_equal(u, v)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_adapters_read_in_place_give_the_bits_of_widened_ones(dtype, p):
    """An adapter serving few rows is read in place (decoding), one serving many is widened
    once for the blocked kernels: the same arithmetic, so the same bits. W = 0 leaves the
    rank-r term alone (the base GEMM of 20 rows and of 4 may round differently)."""
    x, _, _, a, bb = make((20, 37), 13, 5, 2, dtype)  # K and r with tails
    w = mx.zeros((13, 37), dtype=dtype)
    key, scales = mx.random.key(5), mx.array([1.7, 0.3])
    ids = mx.array([1] * 20, dtype=mx.int32)
    widened = fused_lora_linear(x, w, None, a, bb, scale=scales, dropout=p, key=key, adapter_ids=ids)
    in_place = fused_lora_linear(x[:4], w, None, a, bb, scale=scales, dropout=p, key=key, adapter_ids=ids[:4])
    assert mx.array_equal(widened[:4], in_place)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_is_the_single_ops_mask(p):
    """With W = 0 and identity adapters y = c_i * (mask * x) exactly: the mixed op's mask is
    dropout_mask's (the single op's), element for element, on every adapter."""
    m, k = 30, 8
    x = mx.random.normal((m, k), key=mx.random.key(0))
    eye = mx.broadcast_to(mx.eye(k), (3, k, k))
    ids = mx.array([i % 3 for i in range(m)], dtype=mx.int32)
    scales = mx.array([1.0, 2.0, 0.5])
    key = mx.random.key(12)
    y = fused_lora_linear(x, mx.zeros((k, k)), None, eye, eye, scale=scales, dropout=p, key=key, adapter_ids=ids)
    expected = scales[ids][:, None] * (dropout_mask(key, x.shape, p) * x)
    assert mx.array_equal(y, expected)


def test_out_of_range_ids_are_a_named_error():
    x, w, b, a, bb = make((4, 16), 8, 2, 3, mx.float32)
    for bad in (3, -2, 2**31 - 1):
        ids = mx.array([0, 1, bad, 2], dtype=mx.int32)
        y = fused_lora_linear(x, w, b, a, bb, scale=1.0, adapter_ids=ids)
        with pytest.raises(RuntimeError, match=rf"adapter_ids must be in \[-1, 3\).*got {bad} at row 2"):
            mx.eval(y)
        grad = mx.grad(lambda a, ids=ids: fused_lora_linear(x, w, b, a, bb, scale=1.0, adapter_ids=ids).sum())
        with pytest.raises(RuntimeError, match=r"adapter_ids must be in \[-1, 3\)"):
            mx.eval(grad(a))
    # the plain-MLX fallback of a GPU without (working) kernels never reads out of bounds:
    # NaN rows, and gradients as if the bad row were on the base alone (-1), all finite
    inputs = layout.mixed_op_inputs(x, w, b, a, bb, None, 0.0, mx.ones((3,)), mx.array([0, 3, -1, 1], dtype=mx.int32))
    with pytest.warns(UserWarning, match="running the plain-MLX formulation"):
        y = reference_backend.lora_linear(inputs, 1.0, 0.0, hint=" (test: the mixed op's fallback)")
    assert np.isnan(np.array(y[1])).all() and np.isfinite(np.array(y[mx.array([0, 2, 3])])).all()
    as_base = inputs._replace(adapter_ids=mx.array([0, -1, -1, 1], dtype=mx.int32))

    def grads(slots):  # of every row's sum (a NaN value, finite gradients): x, both adapters
        def loss(x, a, bb):
            return reference_backend.lean_lora_linear(slots._replace(x=x, lora_a=a, lora_b=bb), 1.0, 0.0).sum()

        return mx.grad(loss, argnums=(0, 1, 2))(x, a, bb)

    for g, want in zip(grads(inputs), grads(as_base), strict=True):
        assert np.isfinite(np.array(g)).all() and np.array_equal(np.array(g), np.array(want))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(adapter_ids=mx.array([0, 1, 0, 1], dtype=mx.int64)), "`adapter_ids` must be an int32 mx.array"),
        (dict(adapter_ids=[0, 1, 0, 1]), "`adapter_ids` must be an int32 mx.array"),
        (dict(adapter_ids=mx.array([0, 1], dtype=mx.int32)), r"`adapter_ids` must be of shape \(4,\)"),
        (dict(), r"`adapter_ids` must be an int32 id per row of x with n = 3 stacked adapters"),
        (
            dict(scale=[1.0, 2.0], adapter_ids=mx.zeros((4,), dtype=mx.int32)),
            "`scale` must be one value per adapter, 3",
        ),
        (
            dict(scale=mx.ones((2,)), adapter_ids=mx.zeros((4,), dtype=mx.int32)),
            r"`scale` must be a float array of shape",
        ),
        (dict(scale=[1.0, float("inf"), 1.0], adapter_ids=mx.zeros((4,), dtype=mx.int32)), "`scale` must be finite"),
    ],
)
def test_bad_routing_is_a_named_value_error(kwargs, match):
    x, w, b, a, bb = make((4, 16), 8, 2, 3, mx.float32)
    kwargs = {"scale": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        fused_lora_linear(x, w, b, a, bb, **kwargs)


def test_bad_stacked_shapes_are_named():
    x, w, b, a, bb = make((4, 16), 8, 2, 3, mx.float32)
    ids = mx.zeros((4,), dtype=mx.int32)
    with pytest.raises(ValueError, match=r"`lora_b` must be \(n, r, N\) = \(3, 2, 8\)"):
        fused_lora_linear(x, w, b, a, bb[:2], scale=1.0, adapter_ids=ids)
    with pytest.raises(ValueError, match=r"`lora_a` must be \(n, K, r\)"):
        fused_lora_linear(x, w, b, a[:, :5], bb, scale=1.0, adapter_ids=ids)
    with pytest.raises(ValueError, match=r"`adapter_ids` must be of shape \(2, 3\) .* or \(2,\) \(one per sequence\)"):
        fused_lora_linear(mx.zeros((2, 3, 16)), w, b, a, bb, scale=1.0, adapter_ids=ids)


def test_empty_batch_and_one_adapter_with_base_rows():
    x, w, b, a, bb = make((0, 16), 8, 2, 3, mx.float32)
    ids = mx.zeros((0,), dtype=mx.int32)
    y = fused_lora_linear(x, w, b, a, bb, scale=1.0, adapter_ids=ids)
    assert y.shape == (0, 8)
    ga, gbb = mx.grad(lambda a, bb: fused_lora_linear(x, w, b, a, bb, scale=1.0, adapter_ids=ids).sum(), (0, 1))(a, bb)
    assert mx.array_equal(ga, mx.zeros_like(a)) and mx.array_equal(gbb, mx.zeros_like(bb))
    # one adapter (2-D), some rows on the base alone
    x, w, b, a, bb = make((6, 16), 8, 2, 1, mx.float32)
    ids = mx.array([0, -1, 0, 0, -1, 0], dtype=mx.int32)
    y = fused_lora_linear(x, w, b, a[0], bb[0], scale=2.0, adapter_ids=ids)
    assert rel_err(y, reference.lora_linear(x, w, b, a[0], bb[0], 2.0, None, ids)) <= TOL[mx.float32]
    base = x @ w.T + b
    assert rel_err(y[mx.array([1, 4])], base[mx.array([1, 4])]) <= TOL[mx.float32]


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_grads_against_finite_differences(p):
    x, w, b, a, bb = make((7, 10), 6, 3, 3, mx.float32, seed=5)
    ids = mx.array([2, 0, -1, 2, 1, 0, 2], dtype=mx.int32)
    scales = mx.array([1.3, -0.7, 2.1])
    key = mx.random.key(11)
    ct = mx.random.normal((7, 6), key=mx.random.key(2))

    def loss(x, b, a, bb, scales):
        return (fused_lora_linear(x, w, b, a, bb, scale=scales, dropout=p, key=key, adapter_ids=ids) * ct).sum()

    primals = [x, b, a, bb, scales]
    grads = mx.grad(loss, argnums=tuple(range(5)))(*primals)
    eps = 1e-2
    for i, g in enumerate(grads):
        v = mx.random.normal(primals[i].shape, key=mx.random.key(20 + i))
        plus, minus = list(primals), list(primals)
        plus[i], minus[i] = primals[i] + eps * v, primals[i] - eps * v
        fd = (loss(*plus) - loss(*minus)).item() / (2 * eps)
        analytic = (g * v).sum().item()
        assert abs(fd - analytic) <= 2e-3 * max(1.0, abs(analytic)), (i, fd, analytic)


def looped(x, w, b, a, bb, scales, mask, ids):
    """The mixed formula as a sum over adapters of the single-adapter reference on the rows
    of each (MLX's gather_mm, the reference's, has no forward-mode derivative)."""
    y = reference.lora_linear(x, w, b, a[0], mx.zeros_like(bb[0]), 1.0).astype(mx.float32)
    dropped = x if mask is None else x * mask
    for i in range(a.shape[0]):
        on_i = (ids == i)[..., None]
        y = y + mx.where(on_i, scales[i] * ((dropped @ a[i]) @ bb[i]), 0.0)
    return y.astype(x.dtype)


def test_jvp_and_compile():
    """Forward mode against the per-adapter formula; under mx.compile the ids and scales
    are inputs: new values change the result without a retrace."""
    x, w, b, a, bb = make((2, 5, 12), 10, 3, 3, mx.float32)
    ids = mx.array([[0, 2, -1, 1, 2], [1, 1, 0, -1, 2]], dtype=mx.int32)
    scales = mx.array([0.5, 1.5, -2.0])
    key = mx.random.key(8)
    mask = dropout_mask(key, x.shape, 0.3)
    primals = [x, w, b, a, bb, scales]
    tangents = [mx.random.normal(t.shape, key=mx.random.key(30 + i)) for i, t in enumerate(primals)]
    _, (ty,) = mx.jvp(
        lambda x, w, b, a, bb, s: fused_lora_linear(x, w, b, a, bb, scale=s, dropout=0.3, key=key, adapter_ids=ids),
        primals,
        tangents,
    )
    _, (ty_ref,) = mx.jvp(lambda x, w, b, a, bb, s: looped(x, w, b, a, bb, s, mask, ids), primals, tangents)
    assert rel_err(ty, ty_ref) <= TOL[mx.float32]

    traces = []

    def f(x, ids, scales):
        traces.append(1)
        return fused_lora_linear(x, w, b, a, bb, scale=scales, adapter_ids=ids)

    cf = mx.compile(f)
    for new_ids, new_scales in ((ids, scales), (2 - mx.abs(ids), scales), (ids, scales * 3)):
        assert (
            rel_err(cf(x, new_ids, new_scales), reference.lora_linear(x, w, b, a, bb, new_scales, None, new_ids))
            <= 1e-5
        )
    assert len(traces) == 1


def test_quantized_mixed_matches_the_reference():
    x, w, b, a, bb = make((13, 64), 24, 4, 3, mx.float32)
    wq, sq, bq = mx.quantize(w, group_size=32, bits=4)
    ids = mx.array([2, 0, 0, -1, 1, 2, 2, 0, 1, 1, -1, 0, 2], dtype=mx.int32)
    scales = mx.array([1.0, 0.5, 2.0])
    key = mx.random.key(6)
    mask = dropout_mask(key, x.shape, 0.2)
    q = dict(group_size=32, bits=4)
    ct = mx.random.normal((13, 24), key=mx.random.key(3))

    def fused(x, a, bb, s):
        return fused_qlora_linear(x, wq, sq, bq, b, a, bb, **q, scale=s, dropout=0.2, key=key, adapter_ids=ids)

    def ref(x, a, bb, s):
        return reference.qlora_linear(x, wq, sq, bq, b, a, bb, s, mask, **q, adapter_ids=ids)

    assert rel_err(fused(x, a, bb, scales), ref(x, a, bb, scales)) <= TOL[mx.float32]
    g = mx.grad(lambda *t: (fused(*t) * ct).sum(), argnums=(0, 1, 2, 3))(x, a, bb, scales)
    g_ref = mx.grad(lambda *t: (ref(*t) * ct).sum(), argnums=(0, 1, 2, 3))(x, a, bb, scales)
    for u, v in zip(g, g_ref, strict=True):
        assert rel_err(u, v) <= TOL[mx.float32]
