"""The LoRA layer in plain MLX, formulated as mlx-lm's ``LoRALinear`` is.

The baseline the fused layer is measured against (the demo, the benchmarks) on
machines without mlx-lm: an ``nn.Dropout`` that materializes a dropped copy of x,
the LoRA path in the adapters' dtype (so float32 adapters promote bf16 x), and the
base and LoRA terms added as separate arrays. ``from_base`` and ``fuse`` are
`LoRALinearBase`'s, the fused layer's own.
"""

import mlx.nn as nn

from .base import LoRALinearBase, init_lora_weights


def plain_layer_class():
    """The plain peer: mlx-lm's ``LoRALinear`` when mlx-lm is installed, else ours."""
    try:
        from mlx_lm.tuner.lora import LoRALinear
    except ImportError:
        return PlainLoRALinear
    return LoRALinear


class PlainLoRALinear(LoRALinearBase):
    def __init__(self, input_dims, output_dims, r=8, dropout=0.0, scale=20.0, bias=False):
        super().__init__()
        self.linear = nn.Linear(input_dims, output_dims, bias=bias)
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.lora_a, self.lora_b = init_lora_weights(input_dims, output_dims, r)

    def __call__(self, x):
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return self.linear(x) + (self.scale * z).astype(x.dtype)
