"""Drop-in LoRA layers on the fused op, and the helpers that walk a model's LoRA layers."""

from .base import LoRALinearBase, base_dims
from .convert import linear_to_lora_layers
from .fold import fold_lora
from .fused_dora_linear import FusedDoRALinear
from .fused_lora_linear import FusedLoRALinear
from .fused_lora_switch_linear import FusedLoRASwitchLinear
from .init import INIT_METHODS, LoRAInit, init_lora
from .patterns import module_rank_alpha
from .plain_lora_linear import PlainLoRALinear, plain_layer_class
from .tree import (
    alpha_for,
    freeze_all_but_lora,
    fuse_lora_layers,
    is_lora_layer,
    lora_dropout_p,
    lora_layers,
    lora_scale,
)

__all__ = [
    "FusedLoRALinear",
    "FusedDoRALinear",
    "FusedLoRASwitchLinear",
    "PlainLoRALinear",
    "LoRALinearBase",
    "linear_to_lora_layers",
    "plain_layer_class",
    "base_dims",
    "fold_lora",
    "fuse_lora_layers",
    "is_lora_layer",
    "lora_layers",
    "lora_dropout_p",
    "freeze_all_but_lora",
    "lora_scale",
    "alpha_for",
    "init_lora",
    "LoRAInit",
    "INIT_METHODS",
    "module_rank_alpha",
]
