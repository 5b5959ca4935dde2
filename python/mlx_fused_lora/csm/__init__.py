"""Sesame's Conversational Speech Model (CSM-1B) in MLX, with fused LoRA layers.

- `CSMConfig`, `CSM`: the model (`model.py` documents the layout and the frame format).
- `load_csm`, `save_csm`: checkpoints in the torchtune, mlx and Hugging Face layouts.
- `generate`, `generate_frame`: frame-by-frame generation with a backbone KV cache.
- `apply_lora`, `merge_lora`: put `FusedLoRALinear` into the projections / fold it back.
- `adapter_names`: the rename hook that lets `mlx_fused_lora.adapters` load adapters
  saved under Hugging Face / torchtune CSM names.
"""

from ..adapters import register_model_hooks
from .adapter_names import CSM_ADAPTER_HOOKS
from .config import FLAVORS, CSMConfig, LlamaFlavor, RopeScaling
from .generation import generate, generate_frame, sample_top_k
from .layouts import CheckpointError, detect_layout
from .loading import load_csm, save_csm
from .lora import LoRAReport, LoRASettings, apply_lora, merge_lora
from .model import CSM

# load_adapters / save_adapters learn CSM's foreign module names from this hook.
register_model_hooks(CSM, CSM_ADAPTER_HOOKS)

__all__ = [
    "CSM",
    "CSMConfig",
    "LlamaFlavor",
    "RopeScaling",
    "FLAVORS",
    "load_csm",
    "save_csm",
    "detect_layout",
    "CheckpointError",
    "generate",
    "generate_frame",
    "sample_top_k",
    "apply_lora",
    "merge_lora",
    "LoRAReport",
    "LoRASettings",
]
