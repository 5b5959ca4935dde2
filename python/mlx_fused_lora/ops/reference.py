"""The fused LoRA linear op in plain MLX, taking an explicit dropout mask.

This is the oracle every test holds the kernels against. It computes in float32 and
casts the result to x's dtype once, so it is the most accurate version of the formula,
not the fastest. The LoRA formula itself is written once, in two halves: ``down_project``
(``h = (mask * x) @ lora_a``) and ``lora_terms`` (``y + bias + scale * h @ lora_b``); the
oracle runs them in float32, the lean fallback of devices without (working) kernels
(``backends/reference.py``) in x's dtype, a block of rows at a time.

One formula for one adapter and for many: with stacked adapters (``lora_a (n, K, r)``,
``lora_b (n, r, N)``) and ``adapter_ids`` (one per row of x, in [-1, n)), row i takes
adapter ``adapter_ids[i]`` (-1: the base product alone), in the same two halves, as one
adapter of the concatenated rank n*r of which each row keeps its own block (plain GEMMs:
any dtype on every backend, and their gradients make no per-row temporaries, which
MLX's ``gather_mm`` gradient would); one adapter without ids is the case where every
row takes adapter 0.
"""

import mlx.core as mx


def down_project(x, mask, lora_a, dtype, adapter_ids=None):
    """``h = (mask * x) @ lora_a`` with every operand in `dtype` (mask None: no dropout);
    with `adapter_ids` (one per row of x) lora_a stacked, (n, K, r), and each row taking
    its own: one GEMM over the concatenated rank, each row keeping its adapter's block
    (adapter 0's for a row on none: ``lora_terms`` gives it no term)."""
    x = x.astype(dtype)
    dropped = x if mask is None else x * mask.astype(dtype)
    if adapter_ids is None:
        return dropped @ lora_a.astype(dtype)
    count = lora_a.shape[0] if lora_a.ndim == 3 else 1
    ids, _, _ = routes(adapter_ids, count)
    return own(dropped @ a_concat(lora_a).astype(dtype), ids, count)


def lora_terms(y, h, bias, lora_b, scale, dtype, adapter_ids=None):
    """``y + bias + scale * h @ lora_b`` with every operand in `dtype` (y, the base
    product, and h already are); with `adapter_ids` lora_b stacked, (n, r, N), `scale`
    a float or n of them, and each row taking its own: one GEMM over the concatenated
    rank, row i's ``scale_i * h_i`` spread into its adapter's block. A -1 row gets
    y + bias, a row with an id outside [-1, n) NaN (never a read out of bounds; raising
    would need the ids on the host), its gradients those of a -1 row."""
    if bias is not None:
        y = y + bias.astype(dtype)
    if adapter_ids is None:
        return y + scale * (h @ lora_b.astype(dtype))
    count = lora_b.shape[0] if lora_b.ndim == 3 else 1
    ids, onehot, known = routes(adapter_ids, count)
    scale = scale.astype(dtype) if isinstance(scale, mx.array) else mx.array(scale, dtype=dtype)
    row_scale = mx.where(known, mx.broadcast_to(scale, (count,))[ids.reshape(-1)].reshape(ids.shape), 0.0)
    y = y + spread(h * row_scale[..., None], onehot) @ b_concat(lora_b).astype(dtype)
    # A bad row is a -1 row plus NaN, added after the product as a constant: no gradient
    # flows through the NaN (the row adds nothing to any adapter's, dX's row is the base's,
    # as on the GPU kernels).
    bad = ~known & (adapter_ids != -1)
    return y + mx.where(bad[..., None], mx.nan, 0.0).astype(dtype)


# The concatenated rank: n adapters as one adapter of rank n*r, adapter i in columns
# (rows) i*r ... i*r + r - 1; each row's r values spread into its adapter's block and
# taken back from it. The formula above, and the GPU op's GEMM paths (ops/gpu/adapter_rows.py).


def routes(adapter_ids, count):
    """(ids, onehot, known) for `count` adapters: each row's id clamped into [0, n) (a
    gather by it stays in bounds), whether it takes adapter i (..., n) (none for -1 and
    for an id outside [-1, n)), and whether its id is in [0, n)."""
    known = (adapter_ids >= 0) & (adapter_ids < count)
    onehot = adapter_ids[..., None] == mx.arange(count, dtype=adapter_ids.dtype)
    return mx.where(known, adapter_ids, 0), onehot, known


def spread(values, onehot):
    """(..., r) -> (..., n*r): each row's values in the blocks its one-hot row marks,
    zeros in the others."""
    count, r = onehot.shape[-1], values.shape[-1]
    placed = mx.where(onehot[..., None], values[..., None, :], 0.0)
    return placed.reshape(*values.shape[:-1], count * r)


def own(values, ids, count):
    """(..., n*r) -> (..., r): each row's block ids[...]."""
    rows, r = values.shape[:-1], values.shape[-1] // count
    blocks = values.reshape(*rows, count, r)
    return mx.take_along_axis(blocks, ids[..., None, None], axis=-2).reshape(*rows, r)


def a_concat(lora_a):
    """(n, K, r) -> (K, n*r) (a copy); (K, r) as it is."""
    if lora_a.ndim == 2:
        return lora_a
    n, k, r = lora_a.shape
    return lora_a.transpose(1, 0, 2).reshape(k, n * r)


def b_concat(lora_b):
    """(n, r, N) -> (n*r, N) (a reshape, no copy); (r, N) as it is."""
    return lora_b if lora_b.ndim == 2 else lora_b.reshape(lora_b.shape[0] * lora_b.shape[1], lora_b.shape[2])


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
