"""The fused LoRA linear op in plain MLX, taking an explicit dropout mask.

This is the oracle every test holds the kernels against. It computes in float32 and
casts the result to x's dtype once, so it is the most accurate version of the formula,
not the fastest. The LoRA formula itself is written once, in two halves: ``down_project``
(``h = (mask * x) @ lora_a``) and ``lora_terms`` (``y + bias + scale * h @ lora_b``); the
oracle runs them in float32, the lean fallback of devices without (working) kernels
(``backends/reference.py``) in x's dtype, a block of rows at a time.

One formula for one adapter and for many: with stacked adapters (``lora_a (n, K, r)``,
``lora_b (n, r, N)``) and ``adapter_ids`` (one per row of x, in [-1, n)), row i takes
adapter ``adapter_ids[i]`` (-1: the base product alone) through MLX's ``gather_mm`` in
the same two halves; one adapter without ids is the case where every row takes adapter 0.
"""

import math

import mlx.core as mx


def down_project(x, mask, lora_a, dtype, adapter_ids=None):
    """``h = (mask * x) @ lora_a`` with every operand in `dtype` (mask None: no dropout);
    with `adapter_ids` (one per row of x) lora_a stacked, (n, K, r), and each row taking
    its own (adapter 0's for a row on none: ``lora_terms`` gives it no term)."""
    x = x.astype(dtype)
    dropped = x if mask is None else x * mask.astype(dtype)
    if adapter_ids is None:
        return dropped @ lora_a.astype(dtype)
    a = lora_a.astype(dtype)
    a = a[None] if a.ndim == 2 else a
    rows, (k, r) = dropped.shape[:-1], a.shape[1:]
    m = math.prod(rows)
    if m == 0 or k == 0:  # the empty product (MLX's gather_mm fails on empty shapes)
        return mx.zeros((*rows, r), dtype=dtype)
    _, gather = _routes(a.shape[0], adapter_ids, m)
    return gather_rows(dropped.reshape(m, k), a, gather).reshape(*rows, r)


def lora_terms(y, h, bias, lora_b, scale, dtype, adapter_ids=None):
    """``y + bias + scale * h @ lora_b`` with every operand in `dtype` (y, the base
    product, and h already are); with `adapter_ids` lora_b stacked, (n, r, N), `scale`
    a float or n of them, and each row taking its own: a -1 row gets y + bias, a row with
    an id outside [-1, n) NaN (never a read out of bounds: the gather takes adapter 0
    there; raising would need the ids on the host)."""
    if bias is not None:
        y = y + bias.astype(dtype)
    if adapter_ids is None:
        return y + scale * (h @ lora_b.astype(dtype))
    b = lora_b.astype(dtype)
    b = b[None] if b.ndim == 2 else b
    count, n = b.shape[0], b.shape[-1]
    m = math.prod(h.shape[:-1])
    if m == 0 or n == 0:
        return y
    known, gather = _routes(count, adapter_ids, m)
    term = gather_rows(h.reshape(m, h.shape[-1]), b, gather)
    scale = scale.astype(dtype) if isinstance(scale, mx.array) else mx.array(scale, dtype=dtype)
    scales = mx.broadcast_to(scale, (count,))[gather]
    term = mx.where((adapter_ids.reshape(m) >= 0)[:, None], scales[:, None] * term, 0.0)
    return y + mx.where(known[:, None], term, mx.nan).astype(dtype).reshape(*h.shape[:-1], n)


def gather_rows(rows, stacked, ids):
    """rows (M, d) @ stacked[ids[i]] for each row i by MLX's ``gather_mm`` (each row reads
    its own matrix), in the operands' dtype. MLX 0.32's CPU gather_mm takes float32 only:
    on the CPU (the oracle; the GPU op's paths only in the tests) half-precision operands
    go through float32 and the result is rounded back."""
    if rows.dtype != mx.float32 and mx.default_device() == mx.cpu:
        return gather_rows(rows.astype(mx.float32), stacked.astype(mx.float32), ids).astype(rows.dtype)
    return mx.gather_mm(rows[:, None, :], stacked, rhs_indices=ids).reshape(rows.shape[0], stacked.shape[-1])


def _routes(count, adapter_ids, m):
    """(known, gather) for ids of m rows: whether each id is in [-1, n), and the adapter
    each row's gather reads (its own, 0 for -1 and for an unknown id)."""
    ids = adapter_ids.reshape(m)
    known = (ids >= -1) & (ids < count)
    return known, mx.where(ids >= 0, ids, 0) * known


def _lora(y, x32, bias, lora_a, lora_b, scale, mask, adapter_ids):
    """The float32 base product ``y`` plus the LoRA terms of one adapter, or of each row's."""
    h = down_project(x32, mask, lora_a, mx.float32, adapter_ids)
    return lora_terms(y, h, bias, lora_b, scale, mx.float32, adapter_ids)


def lora_linear(x, weight, bias, lora_a, lora_b, scale, mask=None, adapter_ids=None):
    """``y = x @ weight.T + bias + scale * ((mask * x) @ lora_a) @ lora_b``.

    ``mask`` holds the dropout multipliers (0 or 1/(1-p), as ``dropout_mask``
    returns them) in x's shape, or is None for no dropout. With ``adapter_ids``
    (int32, x.shape[:-1]) the adapters are stacked, ``(n, K, r)`` and ``(n, r, N)``
    (or one, 2-D), ``scale`` a float or n of them, and each row takes its own.
    """
    x32 = x.astype(mx.float32)
    y = x32 @ weight.astype(mx.float32).T
    return _lora(y, x32, bias, lora_a, lora_b, scale, mask, adapter_ids).astype(x.dtype)


def lora_onto(x, base, lora_a, lora_b, scale, mask=None, adapter_ids=None):
    """``base + scale * ((mask * x) @ lora_a) @ lora_b`` for a base product the caller
    made (``fused_lora_onto``), each row on its adapter with ``adapter_ids``; float32
    math, x's dtype out."""
    x32 = x.astype(mx.float32)
    return _lora(base.astype(mx.float32), x32, None, lora_a, lora_b, scale, mask, adapter_ids).astype(x.dtype)


def quantized_matmul_dtype(x_dtype, scales_dtype):
    """The dtype of MLX's ``quantized_matmul``: x's promoted with float scales (affine);
    x's own where the scales are not floats (uint8 exponents: mxfp4, nvfp4, mxfp8)."""
    return mx.result_type(x_dtype, scales_dtype) if mx.issubdtype(scales_dtype, mx.floating) else x_dtype


def quantized_matmul(x, weight, scales, biases, *, transpose, group_size, bits, mode="affine"):
    """MLX's ``quantized_matmul`` (any mode), with an empty dimension giving the empty
    product (zeros of the right shape and dtype): MLX 0.32.4's dies of SIGFPE on an empty
    M, N or K. The one guard for every quantized product outside the CPU extension."""
    n = weight.shape[0]
    k = weight.shape[1] * 32 // bits
    out = (*x.shape[:-1], n if transpose else k)
    if x.size == 0 or n == 0 or k == 0:
        return mx.zeros(out, dtype=quantized_matmul_dtype(x.dtype, scales.dtype))
    return mx.quantized_matmul(
        x, weight, scales, biases, transpose=transpose, group_size=group_size, bits=bits, mode=mode
    )


def qlora_linear(
    x, weight, scales, biases, bias, lora_a, lora_b, scale, mask=None, *, group_size, bits, adapter_ids=None
):
    """The same with a quantized base (``weight``, ``scales``, ``biases`` as
    ``nn.QuantizedLinear`` holds them, affine mode): the base product through MLX's
    ``quantized_matmul`` on float32 x, the LoRA term as in ``lora_linear``."""
    x32 = x.astype(mx.float32)
    y = quantized_matmul(x32, weight, scales, biases, transpose=True, group_size=group_size, bits=bits)
    return _lora(y.astype(mx.float32), x32, bias, lora_a, lora_b, scale, mask, adapter_ids).astype(x.dtype)
