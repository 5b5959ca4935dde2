"""The fused ops, each beside its plain-MLX reference (reference.py)."""

from .fused_lora_linear import dropout_mask, fused_lora_linear

__all__ = ["fused_lora_linear", "dropout_mask"]
