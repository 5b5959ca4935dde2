"""mlx-fused-lora: a fused, differentiable LoRA linear op for MLX and the layers on it."""

from ._extension import _ext  # noqa: F401  (fails fast on an MLX/nanobind mismatch)
from .layers import FusedLoRALinear, linear_to_lora_layers
from .lm_lora import patch_mlx_lm
from .ops import dropout_mask, fused_lora_linear

__version__ = "0.1.0"

__all__ = [
    "fused_lora_linear",
    "dropout_mask",
    "FusedLoRALinear",
    "linear_to_lora_layers",
    "patch_mlx_lm",
]
