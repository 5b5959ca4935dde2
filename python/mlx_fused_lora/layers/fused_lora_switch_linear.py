"""FusedLoRASwitchLinear: a drop-in for mlx-lm's ``LoRASwitchLinear`` (mixture-of-experts LoRA) on the mixed op.

Same constructor, ``from_base``, ``fuse``, parameter names, shapes and initialisation as
``mlx_lm.tuner.lora.LoRASwitchLinear`` (``linear`` a ``SwitchLinear`` or
``QuantizedSwitchLinear``, ``lora_a (E, r, in)`` uniform in +-1/sqrt(in), ``lora_b (E, out,
r)`` zeros, ``scale`` the full multiplier, ``num_experts``), so its adapter files load
unchanged either way. The forward is the same sum, computed differently:

    y = linear(x, indices) + scale * (dropout(x) @ lora_a[e].T) @ lora_b[e].T    (e = indices)

- The base stays MLX's: each expert has its own weight, ``gather_mm`` (``gather_qmm``) picks
  it per row exactly as ``SwitchLinear`` does, so no single base GEMM exists to fuse into.
- The LoRA term is the mixed-adapter op's rank-r part with the experts as adapters
  (`ops.fused_lora_onto`, the expert index as each row's adapter id), added onto that base
  product: the rank-r passes grouped by expert in C++, the dropout mask recomputed from a key
  in the backward, never stored (mlx-lm's ``nn.Dropout`` stores it and a dropped copy of x).
- The op takes adapters as ``(E, in, r)`` and ``(E, r, out)``: each call transposes mlx-lm's
  layout, a copy of ``E * r * (in + out)`` values (about ``r / out`` of the base weight's size),
  kept so that the files stay mlx-lm's.
- A token routed to k experts is k rows of the op: x is broadcast to one row per (token,
  expert) pair (mlx-lm's sorted path makes the same copy; its unsorted path, taken for fewer
  than 64 pairs, broadcasts inside ``gather_mm``), and each pair gets its own dropout mask
  (mlx-lm's unsorted path shares one mask among a token's experts).
- ``dropout`` is the float p; in training mode a fresh key is drawn from ``mx.random`` per call.

``fuse`` folds each expert's ``scale * lora_b[e] @ lora_a[e]`` in float32, cast once (mlx-lm
rounds the delta to the weight's dtype first), re-quantizing a quantized base unless
``dequantize``, with the one fold's warning when the delta is below the quantization step.
Named adapters and mixed-adapter batches (`layers.named`) are for linear layers, not these.
"""

import math

import mlx.core as mx
import mlx.nn as nn

from ..ops import fused_lora_onto
from .base import check_lora_args
from .fold import warn_if_below_step
from .fused_lora_linear import draw_dropout_key

__all__ = ["FusedLoRASwitchLinear", "switch_lora_product", "fold_switch_lora"]


def _switch_layers():
    try:
        from mlx_lm.models import switch_layers
    except ImportError as e:
        raise ImportError('FusedLoRASwitchLinear needs mlx-lm\'s SwitchLinear: pip install "mlx-fused-lora[lm]"') from e
    return switch_layers


def switch_lora_product(y, x, indices, lora_a, lora_b, *, scale, dropout=0.0, key=None):
    """``y + scale * (dropout(x) @ lora_a[e].T) @ lora_b[e].T`` for the base product ``y`` of
    ``x`` through a switch layer with expert ``indices`` (mlx-lm's layouts: x ``(..., m, in)``,
    its leading dims broadcast against ``indices``; ``lora_a (E, r, in)``, ``lora_b (E, out, r)``)."""
    lead = mx.broadcast_shapes(tuple(x.shape[:-2]), tuple(indices.shape))
    product = mx.result_type(x.dtype, y.dtype)  # MLX's gather_mm promotes x with the weight
    rows = mx.broadcast_to(x, (*lead, *x.shape[-2:])).astype(product)
    ids = mx.broadcast_to(indices, lead).astype(mx.int32)
    return fused_lora_onto(
        rows,
        y.astype(product),
        lora_a.swapaxes(-1, -2),
        lora_b.swapaxes(-1, -2),
        scale=scale,
        dropout=dropout,
        key=key,
        adapter_ids=ids,
    )


def fold_switch_lora(linear: nn.Module, lora_a, lora_b, scale: float, *, dequantize: bool = False, name="fuse"):
    """A new ``SwitchLinear`` (re-quantized for a quantized base unless ``dequantize``) with
    ``scale * lora_b[e] @ lora_a[e]`` folded into each expert's weight, in float32."""
    switch_layers = _switch_layers()
    quantized = isinstance(linear, switch_layers.QuantizedSwitchLinear)
    weight = linear.weight
    if quantized:
        weight = mx.dequantize(
            weight,
            linear.scales,
            linear.get("biases"),
            group_size=linear.group_size,
            bits=linear.bits,
            mode=linear.mode,
            global_scale=linear.get("global_scale"),
        )
    num_experts, output_dims, input_dims = weight.shape
    delta = float(scale) * (lora_b.astype(mx.float32) @ lora_a.astype(mx.float32))
    fused = switch_layers.SwitchLinear(input_dims, output_dims, num_experts, bias="bias" in linear)
    fused.weight = (weight.astype(mx.float32) + delta).astype(weight.dtype)
    if "bias" in linear:
        fused.bias = linear.bias
    if not quantized or dequantize:
        return fused
    warn_if_below_step(linear, delta, name, stacklevel=3)
    global_scale = linear.get("global_scale") is not None
    return fused.to_quantized(linear.group_size, linear.bits, mode=linear.mode, global_scale=global_scale)


class FusedLoRASwitchLinear(nn.Module):
    @staticmethod
    def from_base(linear: nn.Module, r: int = 8, dropout: float = 0.0, scale: float = 20.0):
        """A LoRA layer around ``linear`` (a ``SwitchLinear`` or ``QuantizedSwitchLinear``)."""
        layer = FusedLoRASwitchLinear(
            input_dims=linear.input_dims,
            output_dims=linear.output_dims,
            num_experts=linear.num_experts,
            r=r,
            dropout=dropout,
            scale=scale,
        )
        layer.linear = linear
        return layer

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_experts: int,
        r: int = 8,
        dropout: float = 0.0,
        scale: float = 20.0,
        bias: bool = False,
    ):
        super().__init__()
        check_lora_args("FusedLoRASwitchLinear", r, dropout)
        # mlx-lm's order of random draws (base, then lora_a): one seed, the same adapters.
        self.linear = _switch_layers().SwitchLinear(input_dims, output_dims, num_experts, bias=bias)
        self.dropout = float(dropout)
        self.scale = scale
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(num_experts, r, input_dims))
        self.lora_b = mx.zeros(shape=(num_experts, output_dims, r))
        self.num_experts = num_experts

    def __call__(self, x, indices, sorted_indices=False):
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        p = self.dropout if self.training else 0.0
        key = draw_dropout_key() if p > 0 else None
        return switch_lora_product(y, x, indices, self.lora_a, self.lora_b, scale=self.scale, dropout=p, key=key)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """The base ``SwitchLinear`` with every expert's adapter folded in (mlx-lm's ``fuse``)."""
        return fold_switch_lora(self.linear, self.lora_a, self.lora_b, self.scale, dequantize=dequantize)
