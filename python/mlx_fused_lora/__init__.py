"""mlx-fused-lora: a fused, differentiable LoRA linear op for MLX and the layers on it."""

from importlib.metadata import version

from ._extension import _ext  # noqa: F401  (fails fast on an MLX/nanobind mismatch)
from .layers import FusedLoRALinear, linear_to_lora_layers
from .lm_lora import patch_mlx_lm
from .ops import dropout_mask, fused_lora_linear

__version__ = version("mlx-fused-lora")  # the one place it is written is pyproject.toml

__all__ = [
    "fused_lora_linear",
    "dropout_mask",
    "FusedLoRALinear",
    "linear_to_lora_layers",
    "patch_mlx_lm",
]
