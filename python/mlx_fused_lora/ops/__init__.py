"""The fused ops, each beside its plain-MLX reference (reference.py)."""

from .fused_lora_linear import dropout_mask, fused_lora_linear
from .fused_qlora_linear import fused_qlora_linear

__all__ = ["fused_lora_linear", "fused_qlora_linear", "dropout_mask"]
