"""A fine-tuned CSM's files: its adapters (any format, or a training checkpoint), its merged model,
and the names of everything a run writes into its output folder."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ...adapters import get_format
from ...csm import save_csm
from ...csm.loading import CONFIG_FILE, WEIGHTS_FILE
from ...layers.tree import lora_layers
from ..adapter_files import check_adapter_target, weights_first, write_adapter
from ..checkpoint import TrainingCheckpointError, atomic_write_dir, load_checkpoint
from ..metrics import LOSS_CURVE, METRICS

__all__ = [
    "write_lora",
    "write_merged",
    "write_outputs",
    "load_lora",
    "expected_outputs",
    "sample_file",
    "output_names",
]

SAVE_MODES = ("lora", "full", "both")
SAMPLE = "sample.wav"  # or, without a codec, the codes beside it: sample.npy
SAMPLE_CODES = "sample.npy"


def _lora_files() -> list[str]:
    fmt = get_format("csm-cli")
    return [fmt.weights_file, fmt.config_file]


def sample_file(output_dir: Path, codec: bool) -> Path:
    """Where the run's sample goes: a WAV with a codec, else its codes."""
    return output_dir / (SAMPLE if codec else SAMPLE_CODES)


def expected_outputs(output_dir: Path, save_mode: str, sample: bool, codec: bool, adapters=()) -> list[Path]:
    """The files a finished run with these settings has written into ``output_dir``; ``adapters``:
    the names of a run's adapters saved each in its own folder there (one per speaker)."""
    names = []
    if save_mode in ("lora", "both"):
        names += _lora_files()
    if save_mode in ("full", "both"):
        names += [WEIGHTS_FILE, CONFIG_FILE]
    out = [output_dir / METRICS]
    for folder in [output_dir / a for a in adapters] or [output_dir]:
        out += [folder / n for n in names] + ([sample_file(folder, codec)] if sample else [])
    return out


def output_names(adapters=()) -> list[str]:
    """The names of every output a run may write into its folder (any save mode): what
    ``--overwrite`` deletes of an earlier run; ``adapters``: with a folder each (`expected_outputs`)."""
    own = [*_lora_files(), SAMPLE, SAMPLE_CODES]
    return [METRICS, LOSS_CURVE, *own, WEIGHTS_FILE, CONFIG_FILE] + [f"{a}/{n}" for a in adapters for n in own]


def check_lora_target(path: str | Path, format: str = "csm-cli") -> None:
    """Refuse a folder holding another format's adapter, before training (`adapter_files`)."""
    check_adapter_target(path, format)


def write_lora(
    model: nn.Module, path: str | Path, format: str = "csm-cli", name: str | None = None, convert_to_lora: bool = False
) -> list[Path]:
    """The adapters (``name``: that one alone) in directory ``path``, by default in the CSM
    CLI's file names (`adapter_files.write_adapter`; ``convert_to_lora``: a PiSSA / OLoRA
    adapter as plain LoRA of the original weights); returns the files, weights first."""
    return write_adapter(model, path, format, name, convert_to_lora)


def write_merged(model: nn.Module, path: str | Path) -> list[Path]:
    """The base model with the adapters folded in, as `save_csm` writes it; the model keeps
    its LoRA layers. Returns the files, weights first."""
    layers = lora_layers(model)
    model.update_modules(tree_unflatten([(name, layer.fuse()) for name, layer in layers]))
    try:
        moved = atomic_write_dir(path, lambda tmp: save_csm(model, tmp))
    finally:
        model.update_modules(tree_unflatten(list(layers)))
    return weights_first(moved)


def write_outputs(
    model: nn.Module,
    output_dir: str | Path,
    save_mode: str,
    adapter_name: str | None = None,
    convert_to_lora: bool = False,
) -> list[Path]:
    """``lora``: the adapters (``adapter_name``: that one; ``convert_to_lora``: see `write_lora`);
    ``full``: the merged model (the adapters that run folded into their bases: for an init
    that split W, its residual, which gives the trained model's weights); ``both``. Returns
    every file written."""
    if save_mode not in SAVE_MODES:
        raise ValueError(f"save_mode must be lora, full or both, got {save_mode!r}")
    out = []
    if save_mode in ("lora", "both"):
        out += write_lora(model, output_dir, name=adapter_name, convert_to_lora=convert_to_lora)
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
        from ...adapters import load_adapters

        load_adapters(model, path, name=name)
    mx.eval(model.parameters())
