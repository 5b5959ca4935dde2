"""The fused ops, each beside its plain-MLX reference (reference.py)."""

from .fused_lora_linear import dropout_mask, fused_lora_linear
from .fused_lora_onto import fused_lora_onto
from .fused_qlora_linear import fused_qlora_linear

__all__ = ["fused_lora_linear", "fused_qlora_linear", "fused_lora_onto", "dropout_mask"]
