"""A fine-tuned CSM's files: its adapters (any format, or a training checkpoint) and its merged model."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..csm import save_csm
from ..layers.tree import lora_layers
from .checkpoint import TrainingCheckpointError, atomic_write_dir, load_checkpoint

__all__ = ["write_lora", "write_merged", "write_outputs", "load_lora"]

SAVE_MODES = ("lora", "full", "both")


def _weights_first(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: p.suffix != ".safetensors")


def write_lora(model: nn.Module, path: str | Path, format: str = "csm-cli", name: str | None = None) -> list[Path]:
    """The adapters (``name``: that one alone) in directory ``path`` (each file replaced whole);
    returns the files, weights first."""
    from ..adapters import save_adapters

    return _weights_first(atomic_write_dir(path, lambda tmp: save_adapters(model, tmp, format=format, name=name)))


def write_merged(model: nn.Module, path: str | Path) -> list[Path]:
    """The base model with the adapters folded in, as `save_csm` writes it; the model keeps
    its LoRA layers. Returns the files, weights first."""
    layers = lora_layers(model)
    model.update_modules(tree_unflatten([(name, layer.fuse()) for name, layer in layers]))
    try:
        moved = atomic_write_dir(path, lambda tmp: save_csm(model, tmp))
    finally:
        model.update_modules(tree_unflatten(list(layers)))
    return _weights_first(moved)


def write_outputs(
    model: nn.Module, output_dir: str | Path, save_mode: str, adapter_name: str | None = None
) -> list[Path]:
    """``lora``: the adapters (``adapter_name``: that one); ``full``: the merged model (the
    adapters that run folded in); ``both``. Returns every file written."""
    if save_mode not in SAVE_MODES:
        raise ValueError(f"save_mode must be lora, full or both, got {save_mode!r}")
    out = []
    if save_mode in ("lora", "both"):
        out += write_lora(model, output_dir, name=adapter_name)
    if save_mode in ("full", "both"):
        out += write_merged(model, output_dir)
    return out


def load_lora(model: nn.Module, path: str | Path, name: str | None = None) -> None:
    """Adapters (csm-cli, mlx-lm or PEFT format, or a training checkpoint) into ``model``'s
    LoRA layers, checked in full before anything is assigned; ``name``: as that named
    adapter (`adapters.load_adapters`)."""
    path = Path(path)
    if (path / "manifest.json").exists() or (path / "checkpoints").is_dir() or path.name.startswith("step_"):
        adapters, _, state = load_checkpoint(path)
        trainable = dict(tree_flatten(model.trainable_parameters()))
        wrong = [k for k, v in trainable.items() if k not in adapters or adapters[k].shape != v.shape]
        if wrong:
            raise TrainingCheckpointError(
                f"checkpoint {state['checkpoint_dir']} does not fit this model's adapters: {wrong[:3]}"
            )
        model.load_weights([(k, adapters[k]) for k in trainable], strict=False)
    else:
        from ..adapters import load_adapters

        load_adapters(model, path, name=name)
    mx.eval(model.parameters())
