"""Save, load and convert LoRA adapters: mlx-lm, PEFT and CSM-CLI formats.

One reader/writer per format (`mlx_lm_format`, `peft_format`) behind a small registry
(`registry`), all reading into and writing from one `AdapterSet`; `model_io` moves
adapters between files and a model's LoRA layers; `merge` combines adapters into one;
`init_conversion` turns a PiSSA / OLoRA adapter into plain LoRA on the original weights.
Many adapters on one model, by name (PEFT's words: `add_adapter`, `set_adapter`,
`disable_adapters`, ...): `manager`, with `named_io` for hot swap and
`add_weighted_adapter` (a `merge` into a new adapter on the model). This package knows
the layers, not any model: model families (CSM) register a rename hook for their
foreign module names with `register_model_hooks`.
"""

from . import mlx_lm_format, peft_format  # noqa: F401  (register the formats)
from .adapter_set import AdapterSet, ModuleAdapter
from .checks import AdapterError
from .config import AdapterConfig
from .init_conversion import convert_to_lora
from .manager import (
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapters,
    fuse_adapters,
    list_adapters,
    set_adapter,
    using_adapters,
)
from .merge import MERGE_METHODS, MergeArgumentError, merge_adapters, merge_module
from .mixed import adapter_ids, mixed_batch, trained_adapters
from .model_io import ModelAdapterHooks, convert_adapter, load_adapters, register_model_hooks, save_adapters
from .named_io import add_weighted_adapter, hotswap_adapter
from .registry import (
    AdapterFormat,
    detect_adapter_format,
    format_names,
    get_format,
    read_adapters,
    register_format,
    write_adapters,
)

FORMATS = format_names()

__all__ = [
    "FORMATS",
    "save_adapters",
    "load_adapters",
    "convert_adapter",
    "detect_adapter_format",
    "read_adapters",
    "write_adapters",
    "AdapterSet",
    "ModuleAdapter",
    "AdapterError",
    "AdapterFormat",
    "register_format",
    "get_format",
    "format_names",
    "ModelAdapterHooks",
    "register_model_hooks",
    "merge_adapters",
    "merge_module",
    "MERGE_METHODS",
    "MergeArgumentError",
    "AdapterConfig",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "list_adapters",
    "active_adapters",
    "disable_adapters",
    "using_adapters",
    "mixed_batch",
    "adapter_ids",
    "trained_adapters",
    "fuse_adapters",
    "hotswap_adapter",
    "add_weighted_adapter",
    "convert_to_lora",
]
