"""FusedDoRALinear: a drop-in for mlx-lm's ``DoRALinear`` on the fused op.

Same constructor, ``from_base``, ``set_linear``, ``fuse``, parameter names and shapes as
``mlx_lm.tuner.dora.DoRALinear`` (``linear``, ``lora_a (in, r)``, ``lora_b (r, out)``,
``m (out,)`` float32, initialised to the base's row norms; ``scale`` the full
multiplier), and the same forward and gradients:

    y = m / stop_gradient(||W + scale * (lora_a @ lora_b).T||_rows) * (x W^T + scale * dropout(x) A B) + bias

What differs is how it is computed:

- ``x W^T + scale * dropout(x) A B`` is one fused op (`lora_product`: `ops.fused_lora_linear`,
  or `ops.fused_qlora_linear` for an ``nn.QuantizedLinear`` base): no dropout mask or
  dropped copy of x is stored, and the frozen weight's gradient is never formed.
- The row norms of the adapted weight come from `ops.dora_norms` without forming the
  N x K adapted weight (mlx-lm builds it on every call): ``||w_n||^2`` of the frozen
  base is computed once, when the base is set, and kept as the non-parameter
  ``_base_sq_norms`` (not saved with the adapters, not trained). Replacing the base's
  weights afterwards needs ``set_linear`` again, as mlx-lm's ``m`` does. Rows where the
  adapter nearly cancels the base (where the expansion would cancel catastrophically)
  are computed directly from their rows of W, so the layer agrees with ``fuse()``.
- ``dropout`` is the float p, and in training mode a fresh dropout key is drawn from
  ``mx.random`` on every call (as `FusedLoRALinear`); x keeps its dtype.
"""

import mlx.core as mx
import mlx.nn as nn

from ..ops.dora_norms import adapted_row_norms, base_row_sq_norms
from .base import base_dims, check_lora_args, init_lora_weights, start_adapter
from .fold import fold_lora
from .fused_lora_linear import draw_dropout_key, lora_product

__all__ = ["FusedDoRALinear", "dora_product", "adapted_norms", "quantization_args"]


def quantization_args(linear):
    """The quantized base's arrays and settings as `ops.dora_norms` takes them ({} if dense)."""
    if not isinstance(linear, nn.QuantizedLinear):
        return {}
    return dict(
        scales=linear.scales,
        biases=linear.get("biases"),
        group_size=linear.group_size,
        bits=linear.bits,
        mode=linear.mode,
    )


def adapted_norms(linear, lora_a, lora_b, base_sq_norms, scale):
    """``||W + scale * (lora_a @ lora_b).T||`` per output row of ``linear``'s weight, float32, no gradient."""
    lora_a = mx.stop_gradient(lora_a)
    lora_b = mx.stop_gradient(lora_b)
    norms = adapted_row_norms(linear.weight, lora_a, lora_b, scale, base_sq_norms, **quantization_args(linear))
    return mx.stop_gradient(norms)


def dora_product(linear, x, lora_a, lora_b, m, base_sq_norms, *, scale, dropout=0.0, key=None):
    """DoRA's output over ``linear``: ``m / ||W + c A B||_rows * (x W^T + c dropout(x) A B) + bias``."""
    out = lora_product(linear, x, lora_a, lora_b, scale=scale, dropout=dropout, key=key, with_bias=False)
    out = (m / adapted_norms(linear, lora_a, lora_b, base_sq_norms, scale)).astype(x.dtype) * out
    if "bias" in linear:
        out = out + linear.bias
    return out


class FusedDoRALinear(nn.Module):
    routing = None  # set by `layers.named` when the layer holds several adapters or runs none
    lora_init = None  # the `LoRAInit` the adapter started from, when it was not mlx-lm's default

    @classmethod
    def from_base(
        cls, linear: nn.Module, r: int = 8, dropout: float = 0.0, scale: float = 20.0, init_lora_weights=True
    ):
        """A DoRA layer around ``linear`` (``nn.Linear`` or ``nn.QuantizedLinear``), its adapter
        started by PEFT's ``init_lora_weights`` (see `LoRALinearBase.from_base`). With an init
        other than mlx-lm's, ``m`` starts as the adapted rows' norms, ``||W' + scale (A B)^T||``
        (PEFT's DoRA init after the LoRA init), so the layer starts at its base's output."""
        input_dims, output_dims = base_dims(linear)
        layer = cls(input_dims, output_dims, r=r, dropout=dropout, scale=scale)
        layer.set_linear(linear)
        init = start_adapter(layer, linear, r, scale, init_lora_weights)
        if init is not None:
            if init.changes_base:
                layer.set_linear(init.base)
            layer.m = layer.adapted_norms()
        return layer

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        r: int = 8,
        dropout: float = 0.0,
        scale: float = 20.0,
        bias: bool = False,
    ):
        super().__init__()
        check_lora_args("FusedDoRALinear", r, dropout)
        # mlx-lm's order of random draws (base, then lora_a): one seed, the same adapters.
        self.set_linear(nn.Linear(input_dims, output_dims, bias=bias))
        self.dropout = float(dropout)
        self.scale = scale
        self.lora_a, self.lora_b = init_lora_weights(input_dims, output_dims, r)

    def set_linear(self, linear: nn.Module):
        """Set the base layer; recompute its row norms and reset ``m`` to them (as mlx-lm)."""
        self.linear = linear
        # Lazy: a base replaced right away (from_base) never has its norms evaluated.
        self._base_sq_norms = base_row_sq_norms(linear.weight, **quantization_args(linear))
        self.m = mx.sqrt(self._base_sq_norms)

    def adapted_norms(self):
        """``||W + scale * (lora_a @ lora_b).T||`` per output row, float32, no gradient."""
        return adapted_norms(self.linear, self.lora_a, self.lora_b, self._base_sq_norms, self.scale)

    def __call__(self, x):
        if self.routing is not None:  # several named adapters, or none running (`layers.named`)
            return self.routing.forward(self, x)
        p = self.dropout if self.training else 0.0
        key = draw_dropout_key() if p > 0 else None
        return dora_product(
            self.linear, x, self.lora_a, self.lora_b, self.m, self._base_sq_norms, scale=self.scale, dropout=p, key=key
        )

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """The base with the adapter folded in and each row rescaled to ``m`` (mlx-lm's DoRA fuse)."""
        if self.routing is not None:
            return self.routing.fold(self, dequantize=dequantize)
        return fold_lora(
            self.linear, self.lora_a, self.lora_b, self.scale, magnitude=self.m, dequantize=dequantize, stacklevel=3
        )
