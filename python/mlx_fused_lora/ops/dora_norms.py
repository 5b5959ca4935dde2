"""DoRA's row norms of the adapted weight ``W + c * (A B)^T`` without forming it (N x K).

DoRA divides each output ``n`` by ``||W[n] + c * A @ B[:, n]||``. Expanding the square:

    ||w_n||^2  +  2c * (W A)[n] . B[:, n]  +  c^2 * B[:, n]^T (A^T A) B[:, n]

The first term is fixed for a frozen W: `base_row_sq_norms` computes it once. The cross
term needs ``W A`` (N x r, one pass over W: a quantized W goes through
``backends.quantized_matmul``, on the CPU a tile of rows dequantized at a time, never
the whole W) and the rank-r term the r x r Gram matrix ``A^T A``: O(N K r) work and
O(N r) memory, where forming the adapted weight costs O(N K) memory on every call
(mlx-lm's ``DoRALinear``).

Where the adapter nearly cancels a row the expansion cancels catastrophically: each
term is exact to ~1e-7 of its own size, which is up to ``(||w_n|| + |c| ||A B[:, n]||)^2``
(Cauchy-Schwarz bounds the cross term by it), so the sum is exact to ~1e-7 times
``S_n / sq_n`` of itself (a row norm of 1e-3 ||w|| lost 34 % of it). So the rows whose
result is smallest against that bound — the ``direct_rows(N, r)`` worst conditioned,
``max(64, 2r)`` — are recomputed directly, ``||w_n + c A B[:, n]||``, from those rows
of W (dequantized where quantized): a (rows x K) temporary, never N x K. The number is
fixed, not data-dependent, so the layer needs no host synchronisation and compiles
(mx.compile). A rank-r adapter can cancel at most about r rows of a weight whose rows
are in general position (a row must lie nearly in the span of A's r columns), so 2r
covers them; with more ill-conditioned rows than that the others keep the expansion.
A layer of at most that many rows is computed directly in full.

Everything is float32: a dense weight stored in a narrower dtype is widened a block of
rows at a time (exact), so the norms are those of the float32 adapted weight, as
mlx-lm's layer and ``fuse()`` take them.
"""

import mlx.core as mx

from . import backends, reference

__all__ = ["base_row_sq_norms", "base_times_lora_a", "adapted_row_norms", "direct_rows"]

_F32 = mx.float32
_BLOCK_ROWS = 256


def direct_rows(n: int, r: int) -> int:
    """How many of N rows `adapted_row_norms` recomputes directly (all, when N is at most that)."""
    return min(n, max(64, 2 * r))


def _dense_rows(weight, rows, scales=None, biases=None, *, group_size=None, bits=None, mode="affine"):
    """Rows ``rows`` (a slice or an index array) of a dense or quantized W, in float32."""
    if scales is None:
        return weight[rows].astype(_F32)
    row_scales, row_biases = scales[rows], None if biases is None else biases[rows]
    if mode == "affine":
        # float32 scales: the exact quantized values, as quantized_matmul sees them with
        # float32 inputs (dequantizing in bf16 would round them).
        row_scales, row_biases = row_scales.astype(_F32), row_biases.astype(_F32)
    block = mx.dequantize(weight[rows], row_scales, row_biases, group_size=group_size, bits=bits, mode=mode)
    return block.astype(_F32)


def _row_blocks(n, block_rows):
    return [slice(start, min(start + block_rows, n)) for start in range(0, n, block_rows)]


def base_row_sq_norms(
    weight, scales=None, biases=None, *, group_size=None, bits=None, mode="affine", block_rows=_BLOCK_ROWS
):
    """``||w_n||^2`` (float32, shape (N,)) of a dense ``(N, K)`` weight, or of a quantized
    one given its ``scales``/``biases``/``group_size``/``bits``/``mode`` as
    ``nn.QuantizedLinear`` holds them.

    Rows are taken ``block_rows`` at a time, so the float32 (dequantized) temporary is
    ``block_rows x K``, not ``N x K``. The result is lazy like any MLX op.
    """
    q = dict(scales=scales, biases=biases, group_size=group_size, bits=bits, mode=mode)
    parts = [
        mx.sum(mx.square(_dense_rows(weight, rows, **q)), axis=1) for rows in _row_blocks(weight.shape[0], block_rows)
    ]
    if not parts:
        return mx.zeros((0,), dtype=_F32)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def base_times_lora_a(weight, lora_a, scales=None, biases=None, *, group_size=None, bits=None, mode="affine"):
    """``W @ lora_a`` as a float32 ``(N, r)`` array, for a dense or quantized W."""
    a = lora_a.astype(_F32)
    if scales is None:
        if weight.dtype == _F32:
            # W @ A, not A^T @ W^T: BLAS runs this (N x K) x (K x r) shape ~10x faster.
            return weight @ a
        # A narrower W: float32 blocks of rows, so the products are exact (A rounded to
        # bf16 put ~4e-3 of the cross term's size into every norm).
        blocks = [_dense_rows(weight, rows) @ a for rows in _row_blocks(weight.shape[0], _BLOCK_ROWS)]
        return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks)
    q = dict(group_size=group_size, bits=bits)
    if mode == "affine":
        # The CPU's tiled dequantize + BLAS (MLX's CPU quantized_matmul was ~20x slower
        # for these r rows), MLX's quantized_matmul on a GPU.
        out = backends.quantized_matmul(a.T, weight, scales, biases, transpose=True, **q)
    else:
        out = reference.quantized_matmul(a.T, weight, scales, biases, transpose=True, mode=mode, **q)
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


def _direct_sq(weight, rows, a, b_rows, c, q):
    """``||w_n + c * A b_n||^2`` for the rows ``rows`` of W (``b_rows``: their columns of B, transposed)."""
    adapted = _dense_rows(weight, rows, **q) + c * (b_rows @ a.T)
    return mx.sum(mx.square(adapted), axis=1)


def adapted_row_norms(
    weight,
    lora_a,
    lora_b,
    scale,
    base_sq_norms=None,
    *,
    scales=None,
    biases=None,
    group_size=None,
    bits=None,
    mode="affine",
):
    """``||W[n] + scale * lora_a @ lora_b[:, n]||`` for every n, float32 (N,).

    ``weight`` (with ``scales``... for a quantized one) is the base as
    ``nn.Linear``/``nn.QuantizedLinear`` holds it; ``base_sq_norms`` its
    `base_row_sq_norms` when kept (computed here otherwise); ``lora_a`` (K, r),
    ``lora_b`` (r, N). By the expansion, with the `direct_rows` worst-conditioned rows
    computed directly (see the module's docstring). No gradient is defined through it on
    purpose: DoRA treats this norm as a constant (callers wrap it in stop_gradient).
    """
    q = dict(scales=scales, biases=biases, group_size=group_size, bits=bits, mode=mode)
    n, r = weight.shape[0], lora_a.shape[1]
    c = float(scale)
    a = lora_a.astype(_F32)
    b_t = lora_b.astype(_F32).T  # (N, r)
    k = direct_rows(n, r)
    if k == n:
        sq = _direct_sq(weight, slice(None), a, b_t, c, q) if n else mx.zeros((0,), dtype=_F32)
        return mx.sqrt(sq)
    if base_sq_norms is None:
        base_sq_norms = base_row_sq_norms(weight, **q)
    cross = mx.sum(base_times_lora_a(weight, lora_a, **q) * b_t, axis=1)
    rank_term = mx.sum(b_t * (b_t @ _gram(a)), axis=1)  # ||A b_n||^2
    sq = base_sq_norms + (2.0 * c) * cross + (c * c) * rank_term
    # The terms' scale (Cauchy-Schwarz): the expansion's rounding error is ~1e-7 of it.
    terms = mx.square(mx.sqrt(base_sq_norms) + abs(c) * mx.sqrt(mx.maximum(rank_term, 0.0)))
    conditioning = mx.where(terms > 0, sq / terms, 1.0)  # small (or negative): cancelled
    worst = mx.argpartition(conditioning, kth=k - 1)[:k]
    sq = mx.put_along_axis(sq, worst, _direct_sq(weight, worst, a, b_t[worst], c, q), axis=0)
    return mx.sqrt(mx.maximum(sq, 0.0))
