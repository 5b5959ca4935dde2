"""Drop-in LoRA layers on the fused op."""

from .convert import linear_to_lora_layers
from .fused_lora_linear import FusedLoRALinear
from .plain_lora_linear import PlainLoRALinear, plain_layer_class

__all__ = ["FusedLoRALinear", "PlainLoRALinear", "linear_to_lora_layers", "plain_layer_class"]
