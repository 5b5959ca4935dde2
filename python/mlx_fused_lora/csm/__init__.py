"""Sesame's Conversational Speech Model (CSM-1B) in MLX, with fused LoRA layers.

- `CSMConfig`, `CSM`: the model (`model.py` documents the layout and the frame format).
- `load_csm`, `save_csm`: checkpoints in the torchtune, mlx and Hugging Face layouts.
- `generate`, `generate_frame`: frame-by-frame generation with a backbone KV cache.
- `apply_lora`, `merge_lora`: put `FusedLoRALinear` into the projections / fold it back.
"""

from .config import FLAVORS, CSMConfig, LlamaFlavor, RopeScaling
from .generation import generate, generate_frame, sample_top_k
from .loading import CheckpointError, detect_layout, load_csm, save_csm
from .lora import LoRAReport, LoRASettings, apply_lora, merge_lora
from .model import CSM

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
