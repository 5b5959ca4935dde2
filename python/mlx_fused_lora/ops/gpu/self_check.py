"""The GPU op's first-use self-check: forward and every gradient against reference.py,
the masks against the CPU extension's, on inputs that take every kernel path.

Run once per (device, dtype, r, dropout on/off, mixed adapters or not) by
backends/gpu.py before the kernels are trusted with real data: the last guard for kernels
this project could only compile and run on the CPU (PoCL), never on the user's GPU. The
mixed op's check runs the same cases with 4 adapters stacked and an id per row
(``mixed_ids``: rows on the base alone, an adapter no row uses, runs of one adapter over
several tiles and splits, single rows between them), its scales' gradient included.

Like with like: the reference runs on the CPU stream in exact float32, and each result
element is held to a rounding bound, not to a fixed tolerance: ``|got - want| <= tau *
magnitude``, where ``magnitude`` is the same result computed by the reference from the
inputs' absolute values (the sum of the absolute values of every product that makes it
up: the op is multilinear, so this is the classical bound's right-hand side) and ``tau
= 8 u + 2 L 2^-24``, with ``u`` the unit roundoff of what the op rounds to (the dtype,
or TF32 where MLX's float32 GEMMs run in TF32: CUDA by default) and ``L`` the longest
reduction. A correct kernel cannot fail it; a wrong index, a lost partial or a missed
mask can pass it only by luck smaller than the rounding itself.

Coverage: ``CASES`` (shapes, a sliced x, a capped grid) times ``plans`` (every kernel
the op may choose, and the GEMM and gather_mm paths with the device mask) run every path
of every kernel the op can launch for this r; tests/test_gpu_kernels.py holds that, path
by path, from the geometry each case produces and its ids (``geometry.paths``).
"""

from typing import NamedTuple

import mlx.core as mx
import numpy as np

from .. import layout, reference
from . import geometry


class Case(NamedTuple):
    shape: tuple  # (M, K, N)
    offset: int  # x and dY start this many elements into their buffers (a sliced view)
    caps: tuple | None  # (max_groups, max_splits) of a capped grid, or None


CASES = [
    # rows a multiple of 4 long: the 4-wide accesses; several row tiles and column
    # blocks with tails for every tile size, split K, split rows
    Case((150, 300, 300), 0, None),
    # odd rows: the element-wise accesses
    Case((37, 150, 70), 0, None),
    # x and dY sliced one element in: misaligned for CUDA's wide accesses
    Case((150, 300, 300), 1, None),
    # 2 groups in x, 2 splits in y: the group-stride loops, several tiles per split
    Case((150, 300, 300), 0, (2, 2)),
]
SCALE, DROPOUT = 1.7, 0.1
ADAPTERS, SCALES = 4, (1.7, 0.6, 2.5, 1.1)
UNIT_ROUNDOFF = {mx.float32: 2.0**-24, mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}
TF32_ROUNDOFF = 2.0**-11
NAMES = ["y", "dx", "d_weight", "d_bias", "d_lora_a", "d_lora_b", "d_scales"]


def plans(r, dropout, mixed=False):
    """The op's choices to check: every kernel it may launch for this r (the mixed op
    also at p = 0), then MLX's GEMMs (with the device mask where there is dropout), and
    for the mixed op MLX's gather_mm."""
    masked = (dropout or mixed) and r <= geometry.MAX_RANK
    kernel = {
        "h": "kernel" if masked else "gemm",
        "up": "gemm",
        "ds_db": "kernel" if r <= geometry.MAX_LOW_RANK else "gemm",
        "da_e": "kernel" if masked else "gemm",
    }
    gemm = dict.fromkeys(kernel, "gemm")
    found = [kernel, gemm] if kernel != gemm else [gemm]
    return found + [gemm | {"h": "gather", "up": "gather"}] if mixed else found


def mixed_ids(m):
    """The mixed check's ids for m rows: adapter 3 unused; a run of rows on the base
    alone, a run of adapter 1 longer than the kernels' tiles and splits (2/3 of the rows),
    one of adapter 0, then single rows cycling through 2, 0, -1, 1 (in the op's row order
    they part-fill tiles)."""
    runs = [-1] * 5 + [1] * (2 * m // 3) + [0] * (m // 8)
    cycle = [2, 0, -1, 1, 2, 2]
    return np.array((runs + cycle * m)[:m], dtype=np.int32)


def tolerance(dtype, tf32, reduction):
    """tau: the rounding bound per unit of magnitude (see the module doc)."""
    u = max(UNIT_ROUNDOFF[dtype], TF32_ROUNDOFF if tf32 and dtype == mx.float32 else 0.0)
    return 8 * u + 2 * reduction * 2.0**-24


def case_inputs(dtype, r, case, seed=2024, count=None):
    """(x, weight, bias, lora_a, lora_b, cotangent) for `case` (`count` adapters stacked,
    or one); x and the cotangent are views `case.offset` elements into their buffers.
    Every value is positive, so no sum cancels: each result is its own magnitude, and a
    lost term moves it by its share."""
    rng = np.random.default_rng(seed)
    m, k, n = case.shape
    stack = () if count is None else (count,)

    def arr(shape, scale=1.0, dt=mx.float32, offset=0):
        values = (scale * rng.uniform(0.25, 1.0, int(np.prod(shape)) + offset)).astype(np.float32)
        return mx.array(values).astype(dt)[offset:].reshape(shape)

    x, ct = arr((m, k), dt=dtype, offset=case.offset), arr((m, n), dt=dtype, offset=case.offset)
    return x, arr((n, k), 0.1, dtype), arr((n,), dt=dtype), arr((*stack, k, r), 0.1), arr((*stack, r, n), 0.5), ct


def _cpu_mask(key, shape, p):
    from ..backends import cpu

    return cpu.dropout_mask(key, shape, p, mx.float32)


def _mask_failure(what, got, key, shape, p):
    want = np.array(_cpu_mask(key, shape, p))
    differ = int((np.array(got.astype(mx.float32)).view(np.uint32) != want.view(np.uint32)).sum())
    return f"{what} differs from the CPU's in {differ} of {want.size} elements" if differ else None


def _reference(primals, cotangent, mask, ids=None):
    """The oracle's outputs and gradients, and their magnitudes, on the CPU stream."""
    with mx.stream(mx.cpu):
        if ids is None:
            plain = lambda *a: reference.lora_linear(*a, SCALE, mask)  # noqa: E731
        else:
            plain = lambda *a: reference.lora_linear(*a, mask, adapter_ids=ids)  # noqa: E731
        exact = _evaluated(plain, primals, cotangent)
        absolute = [mx.abs(a.astype(mx.float32)) for a in primals]
        magnitude = _evaluated(plain, absolute, [mx.abs(cotangent[0].astype(mx.float32))])
    return exact, magnitude


def _worst(got, want, magnitude, tau):
    """The largest |got - want| / (tau * magnitude) (<= 1 passes), or inf for a shape
    mismatch or a non-finite value."""
    got, want, magnitude = (np.array(a.astype(mx.float32), dtype=np.float64) for a in (got, want, magnitude))
    if got.shape != want.shape or not np.isfinite(got).all():
        return float("inf")
    if not got.size:
        return 0.0
    return float((np.abs(got - want) / (tau * magnitude + np.finfo(np.float32).tiny)).max())


def _check_case(kernels, run_op, dtype, r, dropout, case, tf32, mixed=False):
    key = mx.random.key(17)
    p = DROPOUT if dropout else 0.0
    m, k, n = case.shape
    if case.caps is not None:
        kernels = kernels.capped(*case.caps)
    if dropout:
        from ..backends.reference import device_dropout_mask

        failure = _mask_failure("the dropout mask", kernels.dropout_mask(key, (m, k), p), key, (m, k), p)
        failure = failure or _mask_failure("the device mask", device_dropout_mask(key, (m, k), p), key, (m, k), p)
        if failure:
            return failure
    if r == 0:
        return None
    x, w, b, a, bb, ct = case_inputs(dtype, r, case, count=ADAPTERS if mixed else None)
    slot_key = key if dropout else layout.no_key()
    primals, cotangent = [x, w, b, a, bb], [ct]
    ids = mx.array(mixed_ids(m)) if mixed else None
    primals += [mx.array(SCALES)] if mixed else []
    want, magnitude = _reference(primals, cotangent, _cpu_mask(key, (m, k), p) if dropout else None, ids)
    tau = tolerance(dtype, tf32, max(m, k, n) + r)
    for plan in plans(r, dropout, mixed):

        def fused(x, w, b, a, bb, *scales, plan=plan):
            if not mixed:
                return run_op(kernels, plan, layout.Inputs(x, w, b, a, bb, slot_key), SCALE, p)
            return run_op(kernels, plan, layout.MixedInputs(x, w, b, a, bb, slot_key, *scales, ids), 1.0, p)

        got = _evaluated(fused, primals, cotangent)
        for name, g, wv, mag in zip(NAMES[: len(got)], got, want, magnitude, strict=True):
            worst = _worst(g, wv, mag, tau)
            if not worst <= 1.0:
                return (
                    f"{name} differs from reference.py by {worst:.3g}x its rounding bound (tau = {tau:.2g}) "
                    f"at (M, K, N) = {case.shape}, x offset {case.offset}, grid caps {case.caps}, plan {plan}"
                )
    return None


def _evaluated(f, primals, cotangent):
    outputs, vjps = mx.vjp(f, primals, cotangent)
    mx.eval(outputs, vjps)
    return [outputs[0] if isinstance(outputs, list | tuple) else outputs, *vjps]


def self_check(kernels, run_op, dtype, r, dropout, tf32=False, mixed=False):
    """None if the kernels agree with the reference (and the masks with the CPU's) for
    this configuration, else what failed, in words. ``run_op(kernels, plan, inputs,
    scale, p)`` runs the op over `kernels` with the choices `plan`; ``tf32``: the op's
    float32 GEMMs may round their inputs to TF32 (MLX's default on CUDA); r = 0 checks
    the masks alone; ``mixed``: the mixed op (layout.MixedInputs)."""
    try:
        for case in CASES:
            failure = _check_case(kernels, run_op, dtype, r, dropout, case, tf32, mixed)
            if failure is not None:
                return failure
        return None
    except Exception as e:  # any error disqualifies the kernels, and is reported
        return f"{type(e).__name__}: {e}"
