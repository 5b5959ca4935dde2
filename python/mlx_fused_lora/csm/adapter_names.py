"""CSM's adapter rename hook: Hugging Face and torchtune module names to this package's.

PEFT adapters trained on Transformers' ``CsmForConditionalGeneration`` name modules
``backbone_model.layers.{i}...``, ``depth_decoder.model.layers.{i}...``, ``lm_head`` and
``depth_decoder.model.inputs_embeds_projector``; torchtune's use ``attn.output_proj``,
``mlp.w1``... For HF q/k the adapter's output rows are in rotate-half order and are
permuted back to interleaved order. Registered for `CSM` with
`mlx_fused_lora.adapters.register_model_hooks` (see the package ``__init__``).
"""

from __future__ import annotations

from ..adapters import AdapterSet, ModelAdapterHooks, ModuleAdapter
from .layouts import permute_rows_from_hf, qk_heads, to_native

__all__ = ["csm_native_paths", "CSM_ADAPTER_HOOKS"]


def _layout_of(path: str) -> str:
    if path.startswith(("backbone_model.", "depth_decoder.")) or path == "lm_head":
        return "hf"
    if ".attn." in path or ".mlp.w" in path:
        return "torchtune"
    return "mlx"


def csm_native_paths(adapters: AdapterSet, model) -> AdapterSet:
    """Rename HF / torchtune CSM module paths to this package's, un-permuting HF q/k."""
    modules = {}
    for path, m in adapters.modules.items():
        layout = _layout_of(path)
        if layout == "mlx":
            modules[path] = m
            continue
        native = to_native(path + ".weight", layout)
        if native is None:
            raise KeyError(f"adapter module {path!r} ({layout} names) has no counterpart in CSM")
        heads = qk_heads(native, model.config) if layout == "hf" else None
        if heads is not None:
            # rows of delta W are lora_b's columns (and DoRA's magnitude entries)
            magnitude = None if m.magnitude is None else permute_rows_from_hf(m.magnitude, heads)
            m = ModuleAdapter(m.lora_a, permute_rows_from_hf(m.lora_b.T, heads).T, m.scale, m.alpha, magnitude)
        modules[native[: -len(".weight")]] = m
    return adapters.renamed(modules)


CSM_ADAPTER_HOOKS = ModelAdapterHooks(rename=csm_native_paths, extra={"model_type": "csm"})
