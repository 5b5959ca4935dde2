"""A task's adapter files: the trained adapter started from a file (``--resume-adapter-file``) and written whole at the end.

Any task that trains LoRA layers (the CSM task, the preference task) uses these: the
formats themselves are `adapters`' (mlx-lm, PEFT, the CSM CLI's).
"""

from __future__ import annotations

from pathlib import Path

import mlx.nn as nn

from ..adapters import load_adapters, save_adapters
from ..adapters.registry import check_write_target
from ..layers.named import holders
from ..layers.tree import lora_layers
from .checkpoint import atomic_write_dir

__all__ = ["check_adapter_target", "write_adapter", "start_from_adapter", "weights_first"]


def weights_first(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: p.suffix != ".safetensors")


def check_adapter_target(path: str | Path, format: str) -> None:
    """Refuse a folder holding another format's adapter (FileExistsError). `write_adapter` writes
    through a temporary folder, where `save_adapters`' own check would see an empty one."""
    check_write_target(path, format)


def write_adapter(
    model: nn.Module, path: str | Path, format: str, name: str | None = None, convert_to_lora: bool = False
) -> list[Path]:
    """The adapters (``name``: that one alone) in directory ``path`` in ``format``, each file
    replaced whole (``convert_to_lora``: a PiSSA / OLoRA adapter as plain LoRA of the original
    weights, `adapters.save_adapters`); returns the files, weights first."""
    check_adapter_target(path, format)

    def write(tmp):
        return save_adapters(model, tmp, format=format, name=name, convert_to_lora=convert_to_lora or None)

    return weights_first(atomic_write_dir(path, write))


def _held(model: nn.Module, name: str) -> dict:
    return {p: holders(layer)[name] for p, layer in lora_layers(model) if name in holders(layer)}


def start_from_adapter(model: nn.Module, path: str | Path, name: str, shape_flags: str) -> None:
    """Adapter ``name``'s weights from the adapter at ``path`` (mlx-lm's ``--resume-adapter-file``):
    it must cover the same modules with the same ranks (``shape_flags`` names the flags that
    set them, for the error); the run keeps its scale and dropout."""
    before = {p: (h.lora_a.shape, h.scale, h.dropout) for p, h in _held(model, name).items()}
    load_adapters(model, path, name=name)
    after = _held(model, name)
    differ = sorted(set(before) ^ set(after)) or [p for p in before if after[p].lora_a.shape != before[p][0]]
    if differ:
        p = differ[0]
        theirs = f"rank {after[p].lora_a.shape[1]}" if p in after else "no adapter"
        ours = f"rank {before[p][0][1]}" if p in before else "no adapter"
        raise ValueError(
            f"--resume-adapter-file {path}: {p} has {theirs} there and {ours} in this run "
            f"({shape_flags} must match the file)"
        )
    for p, h in after.items():
        h.scale, h.dropout = before[p][1], before[p][2]
