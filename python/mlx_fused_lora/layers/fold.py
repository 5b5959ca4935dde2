"""Fold a LoRA adapter into its base linear: the one fold behind every ``fuse`` and merge.

``W' = W + scale * lora_b.T @ lora_a.T``, computed once in float32 and cast back once to
the base weight's dtype (folding in bf16 would round the small delta against the large
weight twice). A quantized base is dequantized, folded and re-quantized with its own
group size, bits and mode — or returned as a plain ``nn.Linear`` with
``dequantize=True`` — with a warning when the delta is below the quantization step, since
re-quantizing then rounds most of the adapter away.
"""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn

__all__ = ["base_dims", "dense_weight", "fold_lora", "warn_if_below_step"]


def base_dims(linear: nn.Module) -> tuple[int, int]:
    """``(input_dims, output_dims)`` of a linear or quantized linear base layer."""
    output_dims, input_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        input_dims = input_dims * 32 // linear.bits  # packed: 32 // bits values per uint32
    return input_dims, output_dims


def dense_weight(linear: nn.Module) -> mx.array:
    """The base's weight as a dense ``(out, in)`` array (dequantized for a quantized base)."""
    if not isinstance(linear, nn.QuantizedLinear):
        return linear.weight
    return mx.dequantize(
        linear.weight,
        linear.scales,
        getattr(linear, "biases", None),
        group_size=linear.group_size,
        bits=linear.bits,
        mode=linear.mode,
    )


def warn_if_below_step(base: nn.Module, delta: mx.array, name: str, stacklevel: int) -> None:
    """Warn (naming ``name``) when re-quantizing ``base`` (a quantized layer, affine) would
    round the folded ``delta`` mostly away."""
    if base.mode != "affine":
        return  # the step check reads affine scales
    # One quantization step per group is `scales`; a delta much smaller than the step is
    # mostly rounded away by re-quantizing.
    delta_rms = mx.sqrt(mx.mean(delta * delta)).item()
    step_mean = mx.mean(mx.abs(base.scales.astype(mx.float32))).item()
    if delta_rms < step_mean:
        warnings.warn(
            f"{name}: the LoRA delta (rms {delta_rms:.3g}) is below the {base.bits}-bit "
            f"quantization step (mean {step_mean:.3g}); re-quantizing the merged weight loses "
            "most of the adapter. Fold into a dequantized base instead (dequantize=True).",
            stacklevel=stacklevel + 1,
        )


def fold_lora(
    linear: nn.Module,
    lora_a: mx.array,
    lora_b: mx.array,
    scale: float,
    *,
    magnitude: mx.array | None = None,
    dequantize: bool = False,
    name: str = "fuse",
    stacklevel: int = 2,
) -> nn.Module:
    """``linear`` with ``scale * lora_b.T @ lora_a.T`` folded into its weight (a new layer).

    ``linear`` is an ``nn.Linear`` or ``nn.QuantizedLinear`` (``lora_a (in, r)``,
    ``lora_b (r, out)``). The bias, if any, is kept as is. A quantized base comes back
    re-quantized unless ``dequantize``; ``name`` labels the warning. With ``magnitude``
    (DoRA's ``m``, shape (out,)) each folded row is then rescaled to that norm,
    ``W'[n] * m[n] / ||W'[n]||``, as mlx-lm's ``DoRALinear.fuse`` does (bias unscaled;
    the result keeps the base's dtype).
    """
    quantized = isinstance(linear, nn.QuantizedLinear)
    weight = dense_weight(linear)
    delta = float(scale) * (lora_b.astype(mx.float32).T @ lora_a.astype(mx.float32).T)
    output_dims, input_dims = weight.shape
    has_bias = "bias" in linear
    fused = nn.Linear(input_dims, output_dims, bias=has_bias)
    base32 = weight.astype(mx.float32)
    folded = base32 + delta
    if magnitude is not None:
        folded = (magnitude.astype(mx.float32) / mx.linalg.norm(folded, axis=1))[:, None] * folded
        delta = folded - base32  # the change re-quantizing has to keep
    fused.weight = folded.astype(weight.dtype)
    if has_bias:
        fused.bias = linear.bias
    if not quantized or dequantize:
        return fused
    warn_if_below_step(linear, delta, name, stacklevel)
    return nn.QuantizedLinear.from_linear(fused, linear.group_size, linear.bits, mode=linear.mode)
