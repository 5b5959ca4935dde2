"""What the LoRA linear layers share: the base's dims, the adapters' checks and init, ``from_base`` and ``fuse``.

One copy for every layer class (fused, plain, and what subclasses them), so the layers
cannot drift apart: a quantized base gives ``lora_a (in, r)`` with ``in`` unpacked from
its uint32 words, and ``fuse`` is the one fold in `fold`.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .fold import fold_lora

__all__ = ["base_dims", "check_lora_args", "init_lora_weights", "LoRALinearBase"]


def base_dims(linear: nn.Module) -> tuple[int, int]:
    """``(input_dims, output_dims)`` of a linear or quantized linear base layer."""
    output_dims, input_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        input_dims = input_dims * 32 // linear.bits  # packed: 32 // bits values per uint32
    return input_dims, output_dims


def check_lora_args(layer: str, r: int, dropout: float) -> None:
    """The fused layers' rule for ``r`` and ``dropout``; the error names ``layer``."""
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{layer}: `dropout` must be in [0, 1), got {dropout}")
    if int(r) < 1:
        raise ValueError(f"{layer}: `r` must be >= 1, got {r}")


def init_lora_weights(input_dims: int, output_dims: int, r: int, key: mx.array | None = None):
    """mlx-lm's adapter init: ``lora_a (in, r)`` uniform in +-1/sqrt(in), ``lora_b (r, out)``
    zeros, so a new layer computes exactly its base (``key``: an ``mx.random.key``, else
    MLX's global random state). PEFT's ``init_lora_weights=True`` draws the same
    distribution (kaiming-uniform with ``a = sqrt(5)`` on ``(r, in)``: bound 1/sqrt(in))."""
    bound = 1 / math.sqrt(input_dims)
    lora_a = mx.random.uniform(low=-bound, high=bound, shape=(input_dims, r), key=key)
    return lora_a, mx.zeros(shape=(r, output_dims))


class LoRALinearBase(nn.Module):
    """Base class: subclasses set ``linear``, ``lora_a (in, r)``, ``lora_b (r, out)``, ``scale``."""

    routing = None  # set by `layers.named` when the layer holds several adapters or runs none

    @classmethod
    def from_base(cls, linear: nn.Module, r: int = 8, dropout: float = 0.0, scale: float = 20.0):
        """A LoRA layer around ``linear`` (an ``nn.Linear`` or ``nn.QuantizedLinear``, kept as is)."""
        input_dims, output_dims = base_dims(linear)
        layer = cls(input_dims, output_dims, r=r, dropout=dropout, scale=scale)
        layer.linear = linear
        return layer

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """The base layer with ``scale * lora_b.T @ lora_a.T`` folded into its weight (with
        several named adapters: the ones running, weighted, `layers.named`)."""
        if self.routing is not None:
            return self.routing.fold(self, dequantize=dequantize)
        return fold_lora(self.linear, self.lora_a, self.lora_b, self.scale, dequantize=dequantize, stacklevel=3)
