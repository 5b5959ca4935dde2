"""Drop-in LoRA layers on the fused op."""

from .convert import linear_to_lora_layers
from .fused_lora_linear import FusedLoRALinear

__all__ = ["FusedLoRALinear", "linear_to_lora_layers"]
