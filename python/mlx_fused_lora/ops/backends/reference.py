"""The fallback backend: the plain-MLX reference (ops/reference.py) with the CPU
extension's mask, for devices that have no fused kernels (enabled) yet. It takes the
single-adapter slots and the mixed ones (layout.MixedInputs, layout.QMixedInputs: the
multiplier of adapter i is scale * scales[i])."""

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


def _routing(scale, routing):
    """(per-adapter multipliers, ids) of the mixed slots, (scale, None) without them."""
    if not routing:
        return scale, None
    scales, ids = routing
    return scale * scales, ids


def lora_linear(inputs, scale, p, hint=""):
    """y (M, N) for the fixed slots `inputs` (layout.Inputs or layout.MixedInputs), in plain MLX."""
    _warn_once(str(mx.default_device()), hint)
    x, weight, bias, lora_a, lora_b, key, *routing = inputs
    mask = cpu.dropout_mask(key, x.shape, p, mx.float32) if p > 0 else None
    scales, ids = _routing(scale, routing)
    return reference.lora_linear(x, weight, layout.bias_or_none(bias), lora_a, lora_b, scales, mask, ids)


def qlora_linear(inputs, scale, p, *, group_size, bits, hint=""):
    """y (M, N) for the quantized op's fixed slots `inputs` (layout.QInputs or
    layout.QMixedInputs), in plain MLX."""
    _warn_once(str(mx.default_device()), hint)
    x, weight, scales, biases, bias, lora_a, lora_b, key, *routing = inputs
    mask = cpu.dropout_mask(key, x.shape, p, mx.float32) if p > 0 else None
    lora_scales, ids = _routing(scale, routing)
    return reference.qlora_linear(
        x,
        weight,
        scales,
        biases,
        layout.bias_or_none(bias),
        lora_a,
        lora_b,
        lora_scales,
        mask,
        group_size=group_size,
        bits=bits,
        adapter_ids=ids,
    )


dropout_mask = cpu.dropout_mask
