"""The fused LoRA linear op in plain MLX, taking an explicit dropout mask.

This is the oracle every test holds the kernels against. It computes in float32 and
casts the result to x's dtype once, so it is the most accurate version of the formula,
not the fastest. The LoRA formula itself is written once, in two halves: ``down_project``
(``h = (mask * x) @ lora_a``) and ``lora_terms`` (``y + bias + scale * h @ lora_b``); the
oracle runs them in float32, the lean fallback of devices without (working) kernels
(``backends/reference.py``) in x's dtype, a block of rows at a time.

One formula for one adapter and for many: with stacked adapters (``lora_a (n, K, r)``,
``lora_b (n, r, N)``) and ``adapter_ids`` (one per row of x, in [-1, n)), row i takes
adapter ``adapter_ids[i]`` (-1: the base product alone) through MLX's ``gather_mm``
(``mixed_lora_term``); one adapter without ids is the case where every row takes adapter 0.
"""

import math

import mlx.core as mx


def down_project(x, mask, lora_a, dtype):
    """``h = (mask * x) @ lora_a`` with every operand in `dtype` (mask None: no dropout)."""
    x = x.astype(dtype)
    dropped = x if mask is None else x * mask.astype(dtype)
    return dropped @ lora_a.astype(dtype)


def lora_terms(y, h, bias, lora_b, scale, dtype):
    """``y + bias + scale * h @ lora_b`` with every operand in `dtype` (y, the base
    product, and h already are)."""
    if bias is not None:
        y = y + bias.astype(dtype)
    return y + scale * (h @ lora_b.astype(dtype))


def mixed_lora_term(dropped, lora_a, lora_b, scale, adapter_ids):
    """scale * (dropped @ A) @ B, float32, each row on its adapter. An id outside [-1, n)
    gives a NaN row (never a read out of bounds: the gather takes adapter 0 there): raising
    would need the ids on the host."""
    a32, b32 = lora_a.astype(mx.float32), lora_b.astype(mx.float32)
    if a32.ndim == 2:
        a32, b32 = a32[None], b32[None]
    count, k, n = a32.shape[0], dropped.shape[-1], b32.shape[-1]
    m = math.prod(dropped.shape[:-1])
    if m == 0 or k == 0 or n == 0:  # the empty product (MLX's gather_mm fails on empty shapes)
        return mx.zeros((*dropped.shape[:-1], n), dtype=mx.float32)
    ids = adapter_ids.reshape(m)
    known = (ids >= -1) & (ids < count)
    gather = mx.where(ids >= 0, ids, 0) * known
    h = mx.gather_mm(dropped.reshape(m, 1, k), a32, rhs_indices=gather)
    term = mx.gather_mm(h, b32, rhs_indices=gather).reshape(m, n)
    scale = scale.astype(mx.float32) if isinstance(scale, mx.array) else mx.array(scale, dtype=mx.float32)
    scales = mx.broadcast_to(scale, (count,))[gather]
    term = mx.where((ids >= 0)[:, None], scales[:, None] * term, 0.0)
    term = mx.where(known[:, None], term, mx.nan)
    return term.reshape(*dropped.shape[:-1], n)


def _lora(y, x32, bias, lora_a, lora_b, scale, mask, adapter_ids):
    """The float32 base product ``y`` plus the LoRA terms of one adapter, or of each row's."""
    if adapter_ids is None:
        return lora_terms(y, down_project(x32, mask, lora_a, mx.float32), bias, lora_b, scale, mx.float32)
    if bias is not None:
        y = y + bias.astype(mx.float32)
    dropped = x32 if mask is None else x32 * mask.astype(mx.float32)
    return y + mixed_lora_term(dropped, lora_a, lora_b, scale, adapter_ids)


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
