"""Walk a model's LoRA layers: find, freeze around and fold them; the scale formula."""

from __future__ import annotations

import math

import mlx.nn as nn
from mlx.utils import tree_unflatten

from .base import LoRALinearBase
from .fold import fold_lora
from .named import adapter_keys, holders

__all__ = [
    "lora_scale",
    "alpha_for",
    "is_lora_layer",
    "lora_layers",
    "lora_dropout_p",
    "freeze_all_but_lora",
    "fuse_lora_layers",
]


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The LoRA multiplier: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def alpha_for(r: int, scale: float, use_rslora: bool) -> float:
    """An ``alpha`` with ``lora_scale(r, alpha) == scale`` exactly (nearest float search)."""
    alpha = scale * (math.sqrt(r) if use_rslora else r)
    candidates = [alpha, math.nextafter(alpha, math.inf), math.nextafter(alpha, -math.inf)]
    for a in candidates:
        if lora_scale(r, a, use_rslora) == scale:
            return a
    return alpha


def is_lora_layer(module) -> bool:
    """Duck-typed: FusedLoRALinear, PlainLoRALinear and mlx-lm's LoRALinear all qualify."""
    return isinstance(module, nn.Module) and all(hasattr(module, a) for a in ("linear", "lora_a", "lora_b", "scale"))


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every LoRA layer in ``model``, in parameter order."""
    return [(name, m) for name, m in model.named_modules() if is_lora_layer(m)]


def lora_dropout_p(layer) -> float:
    """Dropout probability of a LoRA layer (a float, or mlx-lm's `nn.Dropout`)."""
    d = getattr(layer, "dropout", 0.0)
    if isinstance(d, (int, float)):
        return float(d)
    if isinstance(d, nn.Dropout):
        return round(1.0 - d._p_1, 12)
    return 0.0


def freeze_all_but_lora(model: nn.Module, train_bias: bool = False) -> None:
    """Freeze every parameter except the LoRA layers' ``lora_a``/``lora_b`` (DoRA's ``m``
    too), and the adapted layers' biases with ``train_bias``. A layer holding several
    named adapters keeps only those its routing trains (`named.holders`)."""
    model.freeze()
    for _, layer in lora_layers(model):
        routing = getattr(layer, "routing", None)
        trained = [layer] if routing is None else [h for n, h in holders(layer).items() if n in routing.trainable]
        for holder in trained:
            holder.unfreeze(keys=adapter_keys(holder), recurse=False)
        if train_bias and "bias" in layer.linear:
            layer.linear.unfreeze(keys=["bias"], recurse=False)


def _folds_as_plain_lora(layer) -> bool:
    """True when the layer's fuse is the plain LoRA fold (ours, or mlx-lm's LoRALinear's)."""
    fuse = getattr(type(layer), "fuse", None)
    mlx_lm_lora = type(layer).__name__ == "LoRALinear" and type(layer).__module__ == "mlx_lm.tuner.lora"
    return fuse is None or fuse is LoRALinearBase.fuse or mlx_lm_lora


def fuse_lora_layers(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Fold every LoRA layer of ``model`` into a plain layer, in place; returns ``model``.

    LoRA layers (ours and mlx-lm's ``LoRALinear``) go through `fold.fold_lora` (the one
    fold), labelled with their path, so a quantized base is re-quantized (unless
    ``dequantize``) with a warning naming the module when its delta is below the
    quantization step. A layer with a fold of its own (DoRA's magnitude) uses its
    ``fuse(dequantize)``.
    """
    folded = []
    for name, layer in lora_layers(model):
        if getattr(layer, "routing", None) is not None:  # several named adapters: those running
            base = layer.routing.fold(layer, dequantize=dequantize, name=name, stacklevel=3)
        elif _folds_as_plain_lora(layer):
            base = fold_lora(
                layer.linear, layer.lora_a, layer.lora_b, layer.scale, dequantize=dequantize, name=name, stacklevel=3
            )
        else:
            base = layer.fuse(dequantize=dequantize)
        folded.append((name, base))
    if folded:
        model.update_modules(tree_unflatten(folded))
    return model
