"""The GPU op's first-use self-check: forward and every gradient against reference.py,
the mask against the CPU extension's, on a small input with tails.

Run once per (device, dtype, r, dropout on/off) by backends/gpu.py before the kernels
are trusted with real data: the last guard for kernels this project could only compile
and run on the CPU (PoCL), never on the user's GPU.
"""

import mlx.core as mx
import numpy as np

from .. import layout, reference

# (M, K, N) with tails against every tile: rows of a multiple of 4 take the kernels' 4-wide
# loads and stores, the others the scalar ones. Tolerances are relative to each result's
# largest value.
SHAPES = [(37, 148, 68), (9, 30, 14)]
SCALE, DROPOUT = 1.7, 0.1
TOLERANCE = {mx.float32: 1e-4, mx.float16: 2e-2, mx.bfloat16: 3e-2}


def _cpu_mask(key, shape, p):
    from ..backends import cpu

    return cpu.dropout_mask(key, shape, p, mx.float32)


def _inputs(dtype, r, shape):
    rng = np.random.default_rng(2024)
    m, k, n = shape

    def arr(shape, scale=1.0):
        return mx.array((scale * rng.standard_normal(shape)).astype(np.float32))

    x, w, b = arr((m, k)).astype(dtype), arr((n, k), 0.1).astype(dtype), arr((n,)).astype(dtype)
    return x, w, b, arr((k, r), 0.1), arr((r, n), 0.5), arr((m, n))


def _worst(got, want):
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    if got.shape != want.shape:
        return float("inf")
    err = np.abs(got - want).max() if got.size else 0.0
    return float(err / max(1.0, float(np.abs(want).max()) if want.size else 1.0))


def _check(kernels, run_op, dtype, r, dropout):
    for shape in SHAPES:
        failure = _check_shape(kernels, run_op, dtype, r, dropout, shape)
        if failure is not None:
            return failure
    return None


def _check_shape(kernels, run_op, dtype, r, dropout, shape):
    key = mx.random.key(17)
    p = DROPOUT if dropout else 0.0
    m, k, _ = shape
    if dropout:
        gpu = np.array(kernels.dropout_mask(key, (m, k), p))
        cpu = np.array(_cpu_mask(key, (m, k), p))
        differ = int((gpu.view(np.uint32) != cpu.view(np.uint32)).sum())
        if differ:
            return f"the dropout mask differs from the CPU's in {differ} of {m * k} elements"
    if r == 0:
        return None
    x, w, b, a, bb, ct = _inputs(dtype, r, shape)
    mask = _cpu_mask(key, (m, k), p) if dropout else None
    slot_key = key if dropout else layout.no_key()

    def fused(x, w, b, a, bb):
        return run_op(layout.Inputs(x, w, b, a, bb, slot_key), SCALE, p)

    def plain(x, w, b, a, bb):
        return reference.lora_linear(x, w, b, a, bb, SCALE, mask)

    primals = [x, w, b, a, bb]
    cotangent = [ct.astype(dtype)]
    (y, *grads) = _evaluated(fused, primals, cotangent)
    (y_ref, *grads_ref) = _evaluated(plain, primals, cotangent)
    tolerance = TOLERANCE[dtype]
    for name, got, want in zip(
        ["y", "dx", "d_weight", "d_bias", "d_lora_a", "d_lora_b"], [y, *grads], [y_ref, *grads_ref], strict=True
    ):
        err = _worst(got, want)
        if not err <= tolerance:
            return f"{name} differs from reference.py by {err:.3g} (relative; tolerance {tolerance}) at (M, K, N) = {shape}"
    return None


def _evaluated(f, primals, cotangent):
    outputs, vjps = mx.vjp(f, primals, cotangent)
    mx.eval(outputs, vjps)
    return [outputs[0] if isinstance(outputs, list | tuple) else outputs, *vjps]


def self_check(kernels, run_op, dtype, r, dropout):
    """None if the kernels agree with the reference (and the CPU's mask) for this
    configuration, else what failed, in words. ``run_op(inputs, scale, p)`` runs the op."""
    try:
        return _check(kernels, run_op, dtype, r, dropout)
    except Exception as e:  # any error disqualifies the kernels, and is reported
        return f"{type(e).__name__}: {e}"
