"""FusedLoRALinear: a drop-in for mlx-lm's ``LoRALinear`` on the fused op.

Same constructor, ``from_base``, ``fuse``, parameter names, shapes and
initialisation as ``mlx_lm.tuner.lora.LoRALinear`` (``linear``, ``lora_a (in, r)``
uniform in +-1/sqrt(in), ``lora_b (r, out)`` zeros, ``scale`` the full multiplier),
so adapters saved by mlx-lm load unchanged (``from_base`` and ``fuse`` come from
`LoRALinearBase`, shared with the plain layer). Differences, on purpose:

- ``dropout`` is the float p, not an ``nn.Dropout`` module (it has no parameters
  either way, so checkpoints are unaffected).
- In training mode each call draws a fresh dropout key from ``mx.random``, so a
  compiled step that threads ``mx.random.state`` (as mlx-lm's trainer does) gets
  a new mask every step; in eval mode there is no dropout.
- x keeps its dtype: float32 adapters with bf16 activations never promote x.
"""

import mlx.core as mx
import mlx.nn as nn

from ..ops import dropout_mask, fused_lora_linear, fused_qlora_linear
from .base import LoRALinearBase, check_lora_args, init_lora_weights


def draw_dropout_key():
    """A fresh dropout key from MLX's global random state (which mx.compile can thread)."""
    return mx.random.randint(0, 2**31 - 1, shape=(2,), dtype=mx.int32).astype(mx.uint32)


def lora_product(linear, x, lora_a, lora_b, *, scale, dropout=0.0, key=None, with_bias=True):
    """``linear(x) + scale * (dropout(x) @ lora_a) @ lora_b`` on the fused op: the one
    dispatch from a base layer to an op, for every layer built on it (LoRA, DoRA).

    A dense base takes `fused_lora_linear`; a quantized one (affine, as MLX quantizes
    by default) `fused_qlora_linear`: no dequantized weight, no stored mask.
    ``with_bias=False`` leaves the base's bias out (DoRA adds it after its scaling).
    Other quantization modes (``mxfp4``, ...) have no fused op yet: they take MLX's
    quantized matmul and the LoRA term in plain MLX with the same mask (stored).
    """
    bias = linear.bias if with_bias and "bias" in linear else None
    if not isinstance(linear, nn.QuantizedLinear):
        return fused_lora_linear(x, linear.weight, bias, lora_a, lora_b, scale=scale, dropout=dropout, key=key)
    if linear.mode == "affine":
        quantized = dict(group_size=linear.group_size, bits=linear.bits)
        return fused_qlora_linear(
            x,
            linear.weight,
            linear.scales,
            linear.biases,
            bias,
            lora_a,
            lora_b,
            **quantized,
            scale=scale,
            dropout=dropout,
            key=key,
        )
    y = mx.quantized_matmul(
        x,
        linear.weight,
        linear.scales,
        linear.get("biases"),
        transpose=True,
        group_size=linear.group_size,
        bits=linear.bits,
        mode=linear.mode,
    )
    if bias is not None:
        y = y + bias
    dropped = x if dropout == 0 else x * dropout_mask(key, x.shape, dropout, dtype=x.dtype)
    z = (dropped @ lora_a.astype(x.dtype)) @ lora_b.astype(x.dtype)
    return y + (scale * z).astype(x.dtype)


class FusedLoRALinear(LoRALinearBase):
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
        check_lora_args("FusedLoRALinear", r, dropout)
        self.linear = nn.Linear(input_dims, output_dims, bias=bias)
        self.dropout = float(dropout)
        self.scale = scale
        self.lora_a, self.lora_b = init_lora_weights(input_dims, output_dims, r)

    def __call__(self, x):
        if self.routing is not None:  # several named adapters, or none running (`layers.named`)
            return self.routing.forward(self, x)
        p = self.dropout if self.training else 0.0
        key = draw_dropout_key() if p > 0 else None
        return lora_product(self.linear, x, self.lora_a, self.lora_b, scale=self.scale, dropout=p, key=key)
