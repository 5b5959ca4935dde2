"""What the LoRA linear layers share: the base's dims, the adapters' checks and init, ``from_base`` and ``fuse``.

One copy for every layer class (fused, plain, and what subclasses them), so the layers
cannot drift apart: a quantized base gives ``lora_a (in, r)`` with ``in`` unpacked from
its uint32 words, and ``fuse`` is the one fold in `fold`.
"""

from __future__ import annotations

import mlx.nn as nn

from .fold import base_dims, fold_lora
from .init import LoRAInit, init_lora, init_lora_weights, is_default_init

__all__ = ["base_dims", "check_lora_args", "init_lora_weights", "start_adapter", "LoRALinearBase"]


def check_lora_args(layer: str, r: int, dropout: float) -> None:
    """The fused layers' rule for ``r`` and ``dropout``; the error names ``layer``."""
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{layer}: `dropout` must be in [0, 1), got {dropout}")
    if int(r) < 1:
        raise ValueError(f"{layer}: `r` must be >= 1, got {r}")


def start_adapter(holder, base: nn.Module, r: int, scale: float, init_lora_weights) -> LoRAInit | None:
    """Give ``holder`` (a LoRA layer, or a named adapter's weights) the adapter PEFT's
    ``init_lora_weights`` names for ``base`` (`init.init_lora`), and keep that `LoRAInit` as
    ``holder.lora_init`` (what the adapter's files record, and what `convert_to_lora` undoes).
    Returns it; the caller puts its ``base`` in place when it ``changes_base``. mlx-lm's default
    init, which the layers draw themselves, returns None."""
    if is_default_init(init_lora_weights):
        return None
    init = init_lora(base, r, scale, init_lora_weights)
    holder.lora_a, holder.lora_b = init.lora_a, init.lora_b
    holder.lora_init = init
    return init


class LoRALinearBase(nn.Module):
    """Base class: subclasses set ``linear``, ``lora_a (in, r)``, ``lora_b (r, out)``, ``scale``."""

    routing = None  # set by `layers.named` when the layer holds several adapters or runs none
    lora_init = None  # the `LoRAInit` the adapter started from, when it was not mlx-lm's default

    @classmethod
    def from_base(
        cls, linear: nn.Module, r: int = 8, dropout: float = 0.0, scale: float = 20.0, init_lora_weights=True
    ):
        """A LoRA layer around ``linear`` (an ``nn.Linear`` or ``nn.QuantizedLinear``).

        ``init_lora_weights`` is PEFT's (`layers.init`): ``True`` (mlx-lm's init), ``"gaussian"``,
        ``"pissa"``, ``"pissa_niter_N"``, ``"olora"``, ``"loftq"``. The inits that split W give
        the layer the new base (``linear`` itself is never changed); else ``linear`` is kept as is.
        """
        input_dims, output_dims = base_dims(linear)
        layer = cls(input_dims, output_dims, r=r, dropout=dropout, scale=scale)
        layer.linear = linear
        init = start_adapter(layer, linear, r, scale, init_lora_weights)
        if init is not None and init.changes_base:
            layer.linear = init.base
        return layer

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """The base layer with ``scale * lora_b.T @ lora_a.T`` folded into its weight (with
        several named adapters: the ones running, weighted, `layers.named`)."""
        if self.routing is not None:
            return self.routing.fold(self, dequantize=dequantize)
        return fold_lora(self.linear, self.lora_a, self.lora_b, self.scale, dequantize=dequantize, stacklevel=3)
