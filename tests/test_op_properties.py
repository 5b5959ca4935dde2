"""Property-based tests (Hypothesis) of the fused op: over shapes (odd, M = 1, empty
dimensions), strides (non-contiguous x), dtypes, p, scale and special values, the
op and its gradients against reference.py and, in float32, plain MLX (mlx-lm's
LoRALinear formula); mixed-adapter batches (stacked adapters, ids) against reference.py. Bounded: a fixed number of examples, no deadline, derandomized
so CI sees the same cases every run."""

import math
from typing import NamedTuple

import mlx.core as mx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_fused_lora import dropout_mask, fused_lora_linear
from mlx_fused_lora.ops import reference

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
# Relative to the reference's largest finite magnitude, as in test_fused_lora_linear.py.
TOL = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}


def bounded(n):
    return settings(
        max_examples=n, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
    )


class Case(NamedTuple):
    lead: tuple  # x is (*lead, K); () is a 1-D x (M = 1)
    k: int
    n: int
    r: int
    dtype: mx.Dtype
    adapter_dtype: mx.Dtype
    x_layout: str  # contiguous, strided (every other column) or transposed
    p: float
    scale: float
    bias: bool
    seed: int
    special: tuple | None  # (array name, flat index, value)


def dim(lo, hi):
    # Mostly non-empty; an empty dimension now and then.
    return st.one_of(st.integers(lo, hi), st.just(0)) if lo > 0 else st.integers(lo, hi)


@st.composite
def cases(draw, special=False):
    lead = tuple(draw(st.lists(st.one_of(st.integers(1, 7), st.just(0)), max_size=2)))
    k, n = draw(st.integers(1, 48)), draw(st.integers(1, 40))
    if not special:
        k = draw(st.sampled_from([k, k, k, 0]))
        n = draw(st.sampled_from([n, n, n, 0]))
    dtype = draw(st.sampled_from(DTYPES))
    case = Case(
        lead=lead,
        k=k,
        n=n,
        r=draw(st.integers(1, 9)),
        dtype=dtype,
        adapter_dtype=draw(st.sampled_from([dtype, mx.float32])),
        x_layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])),
        # Special values only without dropout: dropout puts exact zeros next to
        # them, and 0 * inf is NaN in IEEE (the op, OpenBLAS, Accelerate) while
        # MLX's Linux reference BLAS skips zero terms.
        p=0.0 if special else draw(st.one_of(st.sampled_from([0.0, 0.5]), st.floats(0.0, 0.95))),
        # Zero or of a size where scale * dY cannot underflow: the op applies scale to
        # the rank-r products, plain MLX to dY, and the two differ only there.
        scale=draw(st.one_of(st.just(0.0), st.floats(2**-10, 8.0, width=32), st.floats(-8.0, -(2**-10), width=32))),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        special=None,
    )
    if special:
        m = math.prod(lead)
        sizes = {"x": m * k, "weight": n * k, "lora_a": k * case.r, "lora_b": case.r * n}
        name = draw(st.sampled_from([s for s, size in sizes.items() if size > 0] or ["none"]))
        if name != "none":
            value = draw(st.sampled_from([math.inf, -math.inf, math.nan]))
            case = case._replace(special=(name, draw(st.integers(0, sizes[name] - 1)), value))
    return case


def build(case):
    """The op's inputs for `case`: x possibly a strided view, one special value placed."""
    keys = mx.random.split(mx.random.key(case.seed), 5)
    k, n, r, dtype = case.k, case.n, case.r, case.dtype
    special = case.special or (None, None, None)

    def with_special(name, a):
        if special[0] != name:
            return a
        flat = a.reshape(-1)
        flat[special[1]] = special[2]
        return flat.reshape(a.shape)

    x = with_special("x", mx.random.normal((*case.lead, k), key=keys[0]).astype(dtype))
    # The same values, laid out so that x is a non-contiguous view.
    if case.x_layout == "strided":
        full = mx.stack([x, mx.zeros_like(x)], axis=-1).reshape(*case.lead, 2 * k)
        x = full[..., ::2]
    elif case.x_layout == "transposed" and x.ndim >= 2:
        x = mx.moveaxis(mx.contiguous(mx.moveaxis(x, -1, 0)), 0, -1)
    w = with_special("weight", (mx.random.normal((n, k), key=keys[1]) / max(k, 1) ** 0.5).astype(dtype))
    b = mx.random.normal((n,), key=keys[2]).astype(dtype) if case.bias else None
    a = with_special("lora_a", (mx.random.normal((k, r), key=keys[3]) / max(k, 1) ** 0.5).astype(case.adapter_dtype))
    bb = with_special("lora_b", (mx.random.normal((r, n), key=keys[4]) / r**0.5).astype(case.adapter_dtype))
    return x, w, b, a, bb


def assert_matches(actual, expected, tol, name):
    """Same shape, same NaN / +inf / -inf positions, finite values within tol of the
    largest finite magnitude, or of 1 (the inputs' scale: a small output is the
    cancellation of terms of that size, and carries their rounding)."""
    assert actual.shape == expected.shape, name
    a = np.array(actual.astype(mx.float32))
    e = np.array(expected.astype(mx.float32))
    for kind in (np.isnan, np.isposinf, np.isneginf):
        assert np.array_equal(kind(a), kind(e)), (name, kind.__name__)
    finite = np.isfinite(e)
    if finite.any():
        err = np.abs(a[finite] - e[finite]).max()
        assert err <= tol * max(np.abs(e[finite]).max(), 1.0), (name, err)


def plain_mlx(x, w, b, a, bb, scale, mask):
    """mlx-lm's LoRALinear forward in plain MLX ops (float32 here)."""
    y = x @ w.T + (b if b is not None else 0) + scale * (((x if mask is None else x * mask) @ a) @ bb)
    return y.astype(x.dtype)


def check_against(case, peers):
    """The op's forward and gradients (x, bias, lora_a, lora_b) against each peer
    f(x, w, b, a, bb, scale, mask)."""
    x, w, b, a, bb = build(case)
    key = mx.random.key(case.seed // 2)
    mask = dropout_mask(key, x.shape, case.p) if case.p > 0 else None
    ct = mx.random.normal((*x.shape[:-1], case.n), key=mx.random.key(case.seed // 3))

    def fused(x, b, a, bb):
        return fused_lora_linear(x, w, b, a, bb, scale=case.scale, dropout=case.p, key=key)

    def loss(f):
        return lambda *args: (f(*args).astype(mx.float32) * ct).sum()

    argnums = (0, 1, 2, 3) if b is not None else (0, 2, 3)
    y = fused(x, b, a, bb)
    grads = mx.grad(loss(fused), argnums=argnums)(x, b, a, bb)
    assert y.dtype == case.dtype and y.shape == (*x.shape[:-1], case.n)
    for g, i in zip(grads, argnums, strict=True):
        assert g.dtype == (x, b, a, bb)[i].dtype and g.shape == (x, b, a, bb)[i].shape
    for peer in peers:

        def peer_op(x, b, a, bb, peer=peer):
            return peer(x, w, b, a, bb, case.scale, mask)

        assert_matches(y, peer_op(x, b, a, bb), TOL[case.dtype], "y")
        peer_grads = mx.grad(loss(peer_op), argnums=argnums)(x, b, a, bb)
        for g, g_peer, i in zip(grads, peer_grads, argnums, strict=True):
            assert_matches(g, g_peer, TOL[case.dtype], ("x", "bias", "lora_a", "lora_b")[i])


def peers_for(case):
    float32 = case.dtype == mx.float32 and case.adapter_dtype == mx.float32
    return [reference.lora_linear] + ([plain_mlx] if float32 else [])


@bounded(60)
@given(cases())
def test_op_and_gradients_match_reference_and_plain_mlx(case):
    check_against(case, peers_for(case))


@bounded(40)
@given(cases(special=True))
def test_special_values_propagate_as_in_plain_mlx(case):
    check_against(case, peers_for(case))


@st.composite
def mixed_cases(draw):
    """A case with n stacked adapters and an id per row (or per sequence) in [-1, n)."""
    case = draw(cases())
    count = draw(st.integers(1, 4))
    per_sequence = len(case.lead) >= 1 and draw(st.booleans())
    id_shape = case.lead[:-1] if per_sequence else case.lead
    ids = draw(st.lists(st.integers(-1, count - 1), min_size=math.prod(id_shape), max_size=math.prod(id_shape)))
    return case, count, np.array(ids, dtype=np.int32).reshape(id_shape)


@bounded(40)
@given(mixed_cases())
def test_mixed_op_and_gradients_match_reference(mixed):
    """The mixed-adapter op (stacked adapters, a scale per adapter, ids per row or per
    sequence, -1 rows) and its gradients, the scales' included, against the reference."""
    case, count, id_values = mixed
    x, w, b, _, _ = build(case)
    keys = mx.random.split(mx.random.key(case.seed + 1), 3)
    k, r = case.k, case.r
    a = (mx.random.normal((count, k, r), key=keys[0]) / max(k, 1) ** 0.5).astype(case.adapter_dtype)
    bb = (mx.random.normal((count, r, case.n), key=keys[1]) / r**0.5).astype(case.adapter_dtype)
    scales = mx.random.uniform(-2.0, 2.0, (count,), key=keys[2])
    ids = mx.array(id_values)
    # reshape(shape) with a tuple: MLX 0.32.4's reshape() with no arguments crashes
    rows = mx.broadcast_to(ids.reshape((*ids.shape, *([1] * (x.ndim - 1 - ids.ndim)))), x.shape[:-1])
    key = mx.random.key(case.seed // 2)
    mask = dropout_mask(key, x.shape, case.p) if case.p > 0 else None
    ct = mx.random.normal((*x.shape[:-1], case.n), key=mx.random.key(case.seed // 3))

    def fused(x, b, a, bb, s):
        return fused_lora_linear(x, w, b, a, bb, scale=s, dropout=case.p, key=key, adapter_ids=ids)

    def ref(x, b, a, bb, s):
        return reference.lora_linear(x, w, b, a, bb, s, mask, rows)

    def loss(f):
        return lambda *args: (f(*args).astype(mx.float32) * ct).sum()

    argnums = (0, 1, 2, 3, 4) if b is not None else (0, 2, 3, 4)
    primals = (x, b, a, bb, scales)
    assert_matches(fused(*primals), ref(*primals), TOL[case.dtype], "y")
    grads = mx.grad(loss(fused), argnums=argnums)(*primals)
    ref_grads = mx.grad(loss(ref), argnums=argnums)(*primals)
    for g, g_ref, i in zip(grads, ref_grads, argnums, strict=True):
        assert g.shape == primals[i].shape
        assert_matches(g, g_ref, TOL[case.dtype], ("x", "bias", "lora_a", "lora_b", "scales")[i])


@bounded(100)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_dropout_is_checked_in_float32(p):
    p32 = float(np.float32(p)) if math.isfinite(p) and abs(p) < 1e38 else p
    ok = 0.0 <= p32 < 1.0
    x, w, a, bb = mx.ones((2, 3)), mx.ones((4, 3)), mx.ones((3, 1)), mx.ones((1, 4))
    try:
        y = fused_lora_linear(x, w, None, a, bb, scale=1.0, dropout=p, key=mx.random.key(0))
    except ValueError as e:
        assert not ok, e
        assert "`dropout`" in str(e) and str(p) in str(e)
        return
    assert ok, p
    mx.eval(y)


@bounded(100)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_scale_is_checked_in_float32(scale):
    with np.errstate(over="ignore"):
        ok = bool(np.isfinite(np.float32(scale)))
    x, w, a, bb = mx.ones((2, 3)), mx.ones((4, 3)), mx.ones((3, 1)), mx.ones((1, 4))
    try:
        y = fused_lora_linear(x, w, None, a, bb, scale=scale)
    except ValueError as e:
        assert not ok, e
        assert "`scale`" in str(e) and str(scale) in str(e)
        return
    assert ok, scale
    mx.eval(y)


@bounded(30)
@given(
    st.sampled_from([1, 2, 3, 4, 5, 6, 8]),
    st.sampled_from([32, 64, 128]),
    st.integers(1, 3),
    st.integers(1, 24),
    st.integers(1, 8),
    st.sampled_from(DTYPES),
    st.one_of(st.just(0.0), st.floats(0.0, 0.9)),
    st.lists(st.integers(0, 5), max_size=2),
    st.integers(0, 2**31 - 1),
)
def test_quantized_base_matches_reference(bits, group_size, groups, n, r, dtype, p, lead, seed):
    """fused_qlora_linear over every bits / group size MLX supports, against
    reference.qlora_linear (plain MLX over the same quantized weight)."""
    from mlx_fused_lora.ops import fused_qlora_linear

    k = groups * group_size
    keys = mx.random.split(mx.random.key(seed), 4)
    weight, scales, biases = mx.quantize(
        mx.random.normal((n, k), key=keys[0]) / k**0.5, group_size=group_size, bits=bits
    )
    scales, biases = scales.astype(dtype), biases.astype(dtype)
    x = mx.random.normal((*lead, k), key=keys[1]).astype(dtype)
    a = mx.random.normal((k, r), key=keys[2]) / k**0.5
    bb = mx.random.normal((r, n), key=keys[3]) / r**0.5
    key = mx.random.key(seed // 2)
    mask = dropout_mask(key, x.shape, p) if p > 0 else None
    q = dict(group_size=group_size, bits=bits)

    def fused(x, a, bb):
        return fused_qlora_linear(x, weight, scales, biases, None, a, bb, **q, scale=1.5, dropout=p, key=key)

    def mlx_lm(x, a, bb):
        # mlx-lm's LoRALinear over a QuantizedLinear: the quantized matmul in x's dtype.
        dropped = x if mask is None else x * mask.astype(x.dtype)
        base = mx.quantized_matmul(x, weight, scales, biases, **q) if x.size else mx.zeros((*x.shape[:-1], n), x.dtype)
        return (base + 1.5 * ((dropped @ a) @ bb)).astype(x.dtype)

    def ref(x, a, bb):
        return reference.qlora_linear(x, weight, scales, biases, None, a, bb, 1.5, mask, **q)

    ct = mx.random.normal((*x.shape[:-1], n), key=mx.random.key(seed // 3))

    def loss(f):
        return lambda *args: (f(*args).astype(mx.float32) * ct).sum()

    # Against mlx-lm's formula (the same quantized matmul, in x's dtype) in every dtype;
    # against the float32 reference in float32 only: in half precision MLX's quantized
    # matmul itself is off the float32 product by more than a rounding (7 % of the
    # output's size seen in bfloat16, K = 384), for mlx-lm as for this op.
    peers = [(mlx_lm, 2 * TOL[dtype])] + ([(ref, TOL[dtype])] if dtype == mx.float32 else [])
    y = fused(x, a, bb)
    grads = mx.grad(loss(fused), argnums=(0, 1, 2))(x, a, bb)
    for peer, tol in peers:
        assert_matches(y, peer(x, a, bb), tol, "y")
        peer_grads = mx.grad(loss(peer), argnums=(0, 1, 2))(x, a, bb)
        for g, g_peer, name in zip(grads, peer_grads, ("x", "lora_a", "lora_b"), strict=True):
            assert_matches(g, g_peer, tol, name)
