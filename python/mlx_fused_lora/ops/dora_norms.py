"""DoRA's row norms of the adapted weight ``W + c * (A B)^T`` without forming it (N x K).

DoRA divides each output ``n`` by ``||W[n] + c * A @ B[:, n]||``. Expanding the square:

    ||w_n||^2  +  2c * (W A)[n] . B[:, n]  +  c^2 * B[:, n]^T (A^T A) B[:, n]

The first term is fixed for a frozen W: `base_row_sq_norms` computes it once. The cross
term needs ``W A`` (N x r, one pass over W: a quantized W goes through
``backends.quantized_matmul``, on the CPU a tile of rows dequantized at a time, never
the whole W) and the rank-r term the r x r Gram matrix ``A^T A``: O(N K r) work and
O(N r) memory, where forming the adapted weight costs O(N K) memory on every call
(mlx-lm's ``DoRALinear``).

Everything is float32. A dense weight stored in a narrower dtype is multiplied in its
own dtype (A cast down), so no float32 copy of W is made; the cross term then carries
that dtype's rounding, which is the precision the frozen weight has anyway.
"""

import mlx.core as mx

from . import backends, reference

__all__ = ["base_row_sq_norms", "base_times_lora_a", "adapted_row_norms"]

_F32 = mx.float32


def _quantization(scales, biases, group_size, bits, mode):
    return dict(scales=scales, biases=biases, group_size=group_size, bits=bits, mode=mode)


def base_row_sq_norms(weight, scales=None, biases=None, *, group_size=None, bits=None, mode="affine", block_rows=256):
    """``||w_n||^2`` (float32, shape (N,)) of a dense ``(N, K)`` weight, or of a quantized
    one given its ``scales``/``biases``/``group_size``/``bits``/``mode`` as
    ``nn.QuantizedLinear`` holds them.

    Rows are taken ``block_rows`` at a time, so the float32 (dequantized) temporary is
    ``block_rows x K``, not ``N x K``. The result is lazy like any MLX op.
    """
    n = weight.shape[0]
    parts = []
    for start in range(0, n, block_rows):
        rows = slice(start, min(start + block_rows, n))
        if scales is None:
            block = weight[rows]
        else:
            block_scales, block_biases = scales[rows], None if biases is None else biases[rows]
            if mode == "affine":
                # float32 scales: the exact quantized values, as quantized_matmul sees them
                # with float32 inputs (dequantizing in bf16 would round them).
                block_scales = block_scales.astype(_F32)
                block_biases = block_biases.astype(_F32)
            block = mx.dequantize(
                weight[rows],
                block_scales,
                block_biases,
                group_size=group_size,
                bits=bits,
                mode=mode,
            )
        block = block.astype(_F32)
        parts.append(mx.sum(block * block, axis=1))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def base_times_lora_a(weight, lora_a, scales=None, biases=None, *, group_size=None, bits=None, mode="affine"):
    """``W @ lora_a`` as a float32 ``(N, r)`` array, for a dense or quantized W."""
    if scales is None:
        # W @ A, not A^T @ W^T: BLAS runs this (N x K) x (K x r) shape ~10x faster.
        return (weight @ lora_a.astype(weight.dtype)).astype(_F32)
    if mode == "affine":
        # The CPU's tiled dequantize + BLAS (MLX's CPU quantized_matmul was ~20x slower
        # for these r rows), MLX's quantized_matmul on a GPU.
        out = backends.quantized_matmul(
            lora_a.T.astype(_F32), weight, scales, biases, transpose=True, group_size=group_size, bits=bits
        )
    else:
        out = reference.quantized_matmul(
            lora_a.T.astype(_F32), weight, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode
        )
    return out.T.astype(_F32)


def _gram(a, max_elements=1 << 20):
    """``a.T @ a`` (r x r) as products summed over K, in chunks of at most max_elements.

    Not a GEMM: this r x r x K shape (tiny output, long K) was measured at 70-200 ms in
    OpenBLAS right after a fused step on this 2-core machine (threads woken for 0.5
    MFLOP), against well under 1 ms as broadcast products.
    """
    k, r = a.shape
    rows = max(1, max_elements // (r * r))
    gram = None
    for start in range(0, k, rows):
        block = a[start : start + rows]
        part = mx.sum(block[:, :, None] * block[:, None, :], axis=0)
        gram = part if gram is None else gram + part
    return gram


def adapted_row_norms(base_sq_norms, base_a, lora_a, lora_b, scale):
    """``||W[n] + scale * lora_a @ lora_b[:, n]||`` for every n, float32 (N,).

    ``base_sq_norms``: `base_row_sq_norms` of W; ``base_a``: `base_times_lora_a`
    (N, r); ``lora_a`` (K, r), ``lora_b`` (r, N). No gradient is defined through it on
    purpose: DoRA treats this norm as a constant (callers wrap it in stop_gradient).
    """
    a = lora_a.astype(_F32)
    b_t = lora_b.astype(_F32).T  # (N, r)
    gram = _gram(a)
    cross = mx.sum(base_a * b_t, axis=1)
    rank_term = mx.sum(b_t * (b_t @ gram), axis=1)
    c = float(scale)
    sq = base_sq_norms + (2.0 * c) * cross + (c * c) * rank_term
    # Rounding can leave a tiny negative where the adapted row is ~0.
    return mx.sqrt(mx.maximum(sq, 0.0))
