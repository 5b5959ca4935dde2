"""The fallback backend: the plain-MLX reference (ops/reference.py) with the CPU
extension's mask, for devices that have no fused kernels (enabled) yet."""

import functools
import warnings

import mlx.core as mx

from .. import layout, reference
from . import cpu


@functools.cache
def _warn_once(device, hint):
    warnings.warn(
        f"mlx_fused_lora: fused kernels for {device} are not enabled{hint}; running the plain-MLX "
        "reference (same results and dropout masks, plain-MLX speed).",
        stacklevel=4,
    )


def lora_linear(inputs, scale, p, hint=""):
    """y (M, N) for the fixed slots `inputs` (layout.Inputs), in plain MLX."""
    _warn_once(str(mx.default_device()), hint)
    x, weight, bias, lora_a, lora_b, key = inputs
    mask = cpu.dropout_mask(key, x.shape, p, mx.float32) if p > 0 else None
    return reference.lora_linear(x, weight, layout.bias_or_none(bias), lora_a, lora_b, scale, mask)


def qlora_linear(inputs, scale, p, *, group_size, bits, hint=""):
    """y (M, N) for the quantized op's fixed slots `inputs` (layout.QInputs), in plain MLX."""
    _warn_once(str(mx.default_device()), hint)
    x, weight, scales, biases, bias, lora_a, lora_b, key = inputs
    mask = cpu.dropout_mask(key, x.shape, p, mx.float32) if p > 0 else None
    return reference.qlora_linear(
        x,
        weight,
        scales,
        biases,
        layout.bias_or_none(bias),
        lora_a,
        lora_b,
        scale,
        mask,
        group_size=group_size,
        bits=bits,
    )


dropout_mask = cpu.dropout_mask
