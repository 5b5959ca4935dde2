"""The adapter formats: a small registry of one reader/writer per format, and file I/O.

A format is its two file names (weights, config), a reader (directory -> `AdapterSet`)
and a writer (`AdapterSet` -> tensors, config, safetensors metadata). The format
modules (`mlx_lm_format`, `peft_format`) register themselves; `read_adapters` and
`write_adapters` pick one by name or by the file names found in a directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .adapter_set import AdapterSet

__all__ = [
    "AdapterFormat",
    "register_format",
    "get_format",
    "format_names",
    "detect_adapter_format",
    "read_adapters",
    "write_adapters",
    "read_json",
    "load_tensors",
]


@dataclass(frozen=True)
class AdapterFormat:
    name: str
    weights_file: str
    config_file: str
    read: Callable[[Path], AdapterSet]  # adapter directory -> AdapterSet
    write: Callable[[AdapterSet], tuple[dict, dict, dict]]  # -> (tensors, config, metadata)
    aliases: tuple[str, ...] = ()
    named: bool = False  # a file may hold several named adapters: read takes (directory, adapter_name)


_FORMATS: dict[str, AdapterFormat] = {}
_ALIASES: dict[str, str] = {}


def register_format(fmt: AdapterFormat) -> AdapterFormat:
    """Add ``fmt`` (replacing one of the same name); returns it."""
    _FORMATS[fmt.name] = fmt
    for alias in fmt.aliases:
        _ALIASES[alias] = fmt.name
    return fmt


def format_names() -> tuple[str, ...]:
    return tuple(_FORMATS)


def get_format(name: str) -> AdapterFormat:
    """The format called ``name`` (or one of its aliases: mlx, hf, csm...)."""
    fmt = _FORMATS.get(_ALIASES.get(name, name))
    if fmt is None:
        raise ValueError(f"unknown adapter format {name!r}; expected one of {format_names()}")
    return fmt


def _weights_files() -> list[str]:
    return [f.weights_file for f in _FORMATS.values()]


def _adapter_dir(path: Path) -> Path:
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    raise FileNotFoundError(f"no adapter at {path}")


def detect_adapter_format(path: str | Path) -> str:
    """The format's name, from the file names in ``path`` (a directory or weights file)."""
    path = Path(path)
    if path.is_file():
        for fmt in _FORMATS.values():
            if path.name == fmt.weights_file:
                return fmt.name
        raise ValueError(f"{path.name} is not an adapter weights file; expected one of {_weights_files()}")
    d = _adapter_dir(path)
    found = [fmt.name for fmt in _FORMATS.values() if (d / fmt.weights_file).exists()]
    if len(found) == 1:
        return found[0]
    if not found:
        hint = (
            " (adapter_model.bin is PyTorch pickle: convert it to safetensors)"
            if (d / "adapter_model.bin").exists()
            else ""
        )
        raise FileNotFoundError(f"no adapter in {d}: expected one of {_weights_files()}{hint}")
    raise ValueError(f"{d} holds adapters in several formats {found}; pass the weights file")


def read_json(p: Path) -> dict:
    """A JSON object from ``p``, with errors naming the file."""
    if not p.exists():
        raise FileNotFoundError(f"missing {p.name} beside the adapter weights in {p.parent}")
    try:
        with open(p) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{p}: expected a JSON object, got {type(config).__name__}")
    return config


def read_adapters(path: str | Path, adapter_name: str | None = None) -> tuple[AdapterSet, str]:
    """Read an adapter directory (or its weights file); returns (adapters, format name).

    Every tensor and config field is checked (see `checks`) before it is returned. A file
    of a format that can hold several named adapters (PEFT's) gives the one called
    ``adapter_name``, by default its default one (see the format's reader).
    """
    path = Path(path)
    name = detect_adapter_format(path)
    fmt = _FORMATS[name]
    if fmt.named:
        return fmt.read(_adapter_dir(path), adapter_name), name
    return fmt.read(_adapter_dir(path)), name


def write_adapters(adapters: AdapterSet, path: str | Path, fmt: str) -> Path:
    """Write ``adapters`` into directory ``path`` in format ``fmt``; returns the weights file."""
    format_ = get_format(fmt)
    d = Path(path)
    if d.suffix == ".safetensors":
        raise ValueError(f"{d}: pass a directory; the file names are fixed by the format")
    if not adapters.modules:
        raise ValueError("no adapters to write")
    d.mkdir(parents=True, exist_ok=True)
    tensors, config, metadata = format_.write(adapters)
    # safetensors wants contiguous row-major data; transposes are views.
    tensors = {k: mx.contiguous(v) for k, v in tensors.items()}
    try:
        mx.save_safetensors(str(d / format_.weights_file), tensors, metadata=metadata)
    except RuntimeError as e:  # MLX reports an unwritable file as a RuntimeError
        raise OSError(f"cannot write {d / format_.weights_file}: {e}") from None
    with open(d / format_.config_file, "w") as f:
        json.dump(config, f, indent=2)
    return d / format_.weights_file


def load_tensors(p: Path) -> dict[str, mx.array]:
    """The tensors of a safetensors file, with errors naming the file."""
    try:
        return mx.load(str(p))
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{p}: cannot read the adapter weights ({e})") from None
