"""The fused LoRA linear op in plain MLX, taking an explicit dropout mask.

This is the oracle every test holds the kernels against. It computes in float32 and
casts the result to x's dtype once, so it is the most accurate version of the formula,
not the fastest. The LoRA formula itself is written once, in two halves: ``down_project``
(``h = (mask * x) @ lora_a``) and ``lora_terms`` (``y + bias + scale * h @ lora_b``); the
oracle runs them in float32, the lean fallback of devices without (working) kernels
(``backends/reference.py``) in x's dtype, a block of rows at a time.
"""

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


def lora_linear(x, weight, bias, lora_a, lora_b, scale, mask=None):
    """``y = x @ weight.T + bias + scale * ((mask * x) @ lora_a) @ lora_b``.

    ``mask`` holds the dropout multipliers (0 or 1/(1-p), as ``dropout_mask``
    returns them) in x's shape, or is None for no dropout.
    """
    x32 = x.astype(mx.float32)
    y = x32 @ weight.astype(mx.float32).T
    h = down_project(x32, mask, lora_a, mx.float32)
    return lora_terms(y, h, bias, lora_b, scale, mx.float32).astype(x.dtype)


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


def qlora_linear(x, weight, scales, biases, bias, lora_a, lora_b, scale, mask=None, *, group_size, bits):
    """The same with a quantized base (``weight``, ``scales``, ``biases`` as
    ``nn.QuantizedLinear`` holds them, affine mode): the base product through MLX's
    ``quantized_matmul`` on float32 x, the LoRA term as in ``lora_linear``."""
    x32 = x.astype(mx.float32)
    y = quantized_matmul(x32, weight, scales, biases, transpose=True, group_size=group_size, bits=bits)
    h = down_project(x32, mask, lora_a, mx.float32)
    return lora_terms(y.astype(mx.float32), h, bias, lora_b, scale, mx.float32).astype(x.dtype)
