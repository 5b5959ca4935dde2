"""Re-export shim for one release: the adapter formats now live in `registry`,
`mlx_lm_format`, `peft_format` and `adapter_set`; import from `mlx_fused_lora.adapters`."""

from ..layers.tree import alpha_for, lora_scale
from . import FORMATS
from .adapter_set import AdapterSet, ModuleAdapter
from .registry import detect_adapter_format, read_adapters, write_adapters

__all__ = [
    "FORMATS",
    "ModuleAdapter",
    "AdapterSet",
    "detect_adapter_format",
    "read_adapters",
    "write_adapters",
    "lora_scale",
    "alpha_for",
]
