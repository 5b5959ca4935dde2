"""Save, load and convert LoRA adapters: mlx-lm, PEFT and CSM-CLI formats (see `formats`).

Works for any MLX model whose adapted modules are LoRA layers (`FusedLoRALinear`, or
mlx-lm's `LoRALinear`): module paths are the model's own (``model.layers.0.self_attn.q_proj``
for an mlx-lm model, ``backbone.layers.0.self_attn.q_proj`` for a CSM).

Loading into a CSM also accepts the module names of the Hugging Face
``CsmForConditionalGeneration`` (``backbone_model.layers.{i}...``,
``depth_decoder.model.layers.{i}...``, ``lm_head``,
``depth_decoder.model.inputs_embeds_projector``) and of torchtune (``attn.output_proj``,
``mlp.w1``...), as PEFT adapters trained on those models carry. For HF q/k the adapter's
output rows are in rotate-half order and are permuted back to interleaved order.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .formats import (
    FORMATS,
    AdapterSet,
    ModuleAdapter,
    detect_adapter_format,
    read_adapters,
    write_adapters,
)

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
]

_FORMAT_ALIASES = {"mlx": "mlx-lm", "mlx_lm": "mlx-lm", "hf": "peft", "csm": "csm-cli"}


def _format(fmt: str) -> str:
    fmt = _FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"unknown adapter format {fmt!r}; expected one of {FORMATS}")
    return fmt


def _adapter_set_of(model: nn.Module) -> AdapterSet:
    from mlx_fused_lora.csm.lora import lora_dropout_p, lora_layers

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    settings = getattr(model, "lora_settings", None)
    use_rslora = bool(getattr(settings, "use_rslora", False))
    alpha = getattr(settings, "alpha", None)
    dropouts = {lora_dropout_p(layer) for _, layer in layers}
    if len(dropouts) > 1:
        warnings.warn(f"LoRA layers have different dropouts {sorted(dropouts)}; saving the largest", stacklevel=2)
    trained_biases = [
        name
        for name, layer in layers
        if "bias" in layer.linear and "bias" in dict(_flat(layer.linear.trainable_parameters()))
    ]
    if trained_biases:
        warnings.warn(f"trainable biases ({trained_biases[0]}, ...) are not saved with the adapters", stacklevel=2)
    modules = {name: ModuleAdapter(layer.lora_a, layer.lora_b, float(layer.scale), alpha) for name, layer in layers}
    num_layers = None
    if hasattr(model, "layers") and isinstance(model.layers, list):
        idx = [int(p.split("layers.", 1)[1].split(".", 1)[0]) for p in modules if "layers." in p]
        if idx:
            num_layers = len(model.layers) - min(idx)
    extra = {"model_type": "csm"} if _is_csm(model) else {}
    return AdapterSet(modules, max(dropouts), use_rslora, num_layers, extra)


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def _is_csm(model) -> bool:
    from mlx_fused_lora.csm.config import CSMConfig

    return isinstance(getattr(model, "config", None), CSMConfig)


def save_adapters(model: nn.Module, path: str | Path, format: str = "mlx-lm") -> Path:
    """Write the model's LoRA layers to directory ``path`` in ``format``.

    ``format``: ``mlx-lm`` (default), ``peft`` or ``csm-cli``. Returns the weights file.
    """
    return write_adapters(_adapter_set_of(model), path, _format(format))


def _csm_native_paths(adapters: AdapterSet, model) -> AdapterSet:
    """Rename HF / torchtune CSM module paths to this package's, un-permuting HF q/k."""
    from mlx_fused_lora.csm.loading import permute_rows_from_hf, qk_heads, to_native

    def layout_of(path: str) -> str:
        if path.startswith(("backbone_model.", "depth_decoder.")) or path == "lm_head":
            return "hf"
        if ".attn." in path or ".mlp.w" in path:
            return "torchtune"
        return "mlx"

    modules = {}
    for path, m in adapters.modules.items():
        layout = layout_of(path)
        if layout == "mlx":
            modules[path] = m
            continue
        native = to_native(path + ".weight", layout)
        if native is None:
            raise KeyError(f"adapter module {path!r} ({layout} names) has no counterpart in CSM")
        heads = qk_heads(native, model.config) if layout == "hf" else None
        if heads is not None:
            # rows of delta W are lora_b's columns
            m = ModuleAdapter(m.lora_a, permute_rows_from_hf(m.lora_b.T, heads).T, m.scale, m.alpha)
        modules[native[: -len(".weight")]] = m
    return AdapterSet(modules, adapters.dropout, adapters.use_rslora, adapters.num_layers, adapters.extra)


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Load adapters (format detected from the file names) into ``model``, in place.

    Each adapted module is wrapped in `FusedLoRALinear` (or, if it already is a LoRA
    layer, has its ``lora_a``/``lora_b``/``scale`` replaced). The base is frozen and the
    adapters left trainable. Raises KeyError naming an adapter module the model lacks,
    ValueError naming a module whose shapes do not fit.
    """
    from mlx.utils import tree_unflatten

    from mlx_fused_lora.csm.lora import freeze_all_but_lora, is_lora_layer, lora_layer_class

    adapters, _ = read_adapters(path)
    if _is_csm(model):
        adapters = _csm_native_paths(adapters, model)
    modules = dict(model.named_modules())
    LoRA = lora_layer_class()
    replacements = []
    for p, m in adapters.modules.items():
        if p not in modules:
            near = [k for k in modules if k.rsplit(".", 1)[-1] == p.rsplit(".", 1)[-1]][:3]
            raise KeyError(f"adapter module {p!r} is not in the model (similar: {near})")
        module = modules[p]
        base = module.linear if is_lora_layer(module) else module
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise ValueError(f"adapter module {p!r} is a {type(base).__name__}, not a linear layer")
        out_dims, in_dims = base.weight.shape
        if isinstance(base, nn.QuantizedLinear):
            in_dims = in_dims * 32 // base.bits
        if m.lora_a.shape[0] != in_dims or m.lora_b.shape[1] != out_dims:
            raise ValueError(
                f"adapter {p}: lora_a {tuple(m.lora_a.shape)} / lora_b {tuple(m.lora_b.shape)} "
                f"do not fit a linear of (in, out) = ({in_dims}, {out_dims}); expected "
                f"({in_dims}, r) and (r, {out_dims})"
            )
        layer = (
            module if is_lora_layer(module) else LoRA.from_base(base, r=m.r, dropout=adapters.dropout, scale=m.scale)
        )
        layer.lora_a = m.lora_a
        layer.lora_b = m.lora_b
        layer.scale = m.scale
        if layer is not module:
            replacements.append((p, layer))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    freeze_all_but_lora(model)
    mx.eval(model.parameters())
    return model


def convert_adapter(in_path: str | Path, out_path: str | Path, to: str, *, from_format: str | None = None) -> Path:
    """Convert an adapter directory between formats without a model; returns the weights file.

    ``to``: ``peft``, ``mlx-lm`` or ``csm-cli``. Tensors are transposed exactly; ``alpha``
    is carried through (mlx-lm gets it as an extra field) so PEFT -> mlx-lm -> PEFT
    reproduces the same tensors and per-module scales.
    """
    adapters, detected = read_adapters(in_path)
    if from_format is not None and _format(from_format) != detected:
        raise ValueError(f"{in_path} holds a {detected} adapter, not {from_format}")
    return write_adapters(adapters, out_path, _format(to))
