"""The adapter formats: a small registry of one reader/writer per format, and file I/O.

A format is its two file names (weights, config), a reader (directory -> `AdapterSet`),
a writer (`AdapterSet` -> tensors, config, safetensors metadata) and a test that tells
its config from another format's. The format modules (`mlx_lm_format`, `peft_format`)
register themselves; `read_adapters` and `write_adapters` pick one by name or by the file
names found in a directory.

Writes are format-aware: mlx-lm and PEFT both name their config ``adapter_config.json``,
so writing one format into a folder that holds an adapter of another would overwrite
that adapter's config and leave neither loadable. `write_adapters` refuses such a folder
(`check_write_target`), judging by what is there — weights file names and the config's
shape — not by names alone. Refusing was chosen over writing beside under other names:
both formats' readers (and mlx-lm's and PEFT's own) look for those fixed names, so an
adapter written under another name would not load anywhere. Rewriting a folder's adapter
in its own format is allowed (a trainer saving again).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .adapter_set import AdapterSet
from .checks import check_finite

__all__ = [
    "AdapterFormat",
    "register_format",
    "get_format",
    "format_names",
    "detect_adapter_format",
    "read_adapters",
    "write_adapters",
    "check_write_target",
    "adapter_formats_in",
    "adapter_dir",
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
    # True for a config (a parsed JSON object) of this format: what tells formats apart
    # that name their config alike.
    recognizes: Callable[[dict], bool] = lambda config: True


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


def adapter_dir(path: Path) -> Path:
    """The directory of an adapter given as its directory or its weights file."""
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
    d = adapter_dir(path)
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


def _holds_config_of(d: Path, fmt: AdapterFormat) -> bool:
    """Whether ``d`` holds ``fmt``'s config: by its name, and by its shape where another
    format shares the name."""
    p = d / fmt.config_file
    if not p.is_file():
        return False
    if not any(o.config_file == fmt.config_file for o in _FORMATS.values() if o is not fmt):
        return True
    try:
        config = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and fmt.recognizes(config)


def adapter_formats_in(d: str | Path) -> list[str]:
    """The formats of the adapter files in directory ``d`` (weights, or a config of that shape)."""
    d = Path(d)
    return [f.name for f in _FORMATS.values() if (d / f.weights_file).exists() or _holds_config_of(d, f)]


def check_write_target(d: str | Path, fmt: str) -> None:
    """Refuse (FileExistsError) to write a ``fmt`` adapter into ``d`` when ``d`` holds an
    adapter of another format, or a config under ``fmt``'s config name that is not ``fmt``'s."""
    d, format_ = Path(d), get_format(fmt)
    others = [name for name in adapter_formats_in(d) if name != format_.name]
    if others:
        files = sorted(p.name for p in d.iterdir() if p.name in _adapter_file_names(others))
        raise FileExistsError(
            f"{d} holds a {' and '.join(others)} adapter ({', '.join(files)}); writing a {format_.name} "
            f"adapter there would {'overwrite its config' if _shares_config(format_, others) else 'mix two formats'}: "
            "write into another folder"
        )
    config = d / format_.config_file
    if config.exists() and not _holds_config_of(d, format_):
        raise FileExistsError(
            f"{config} exists and is not a {format_.name} adapter config; not overwriting it: write into another folder"
        )


def _adapter_file_names(names) -> set[str]:
    return {n for name in names for n in (_FORMATS[name].weights_file, _FORMATS[name].config_file)}


def _shares_config(fmt: AdapterFormat, names) -> bool:
    return any(_FORMATS[name].config_file == fmt.config_file for name in names)


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
        return fmt.read(adapter_dir(path), adapter_name), name
    return fmt.read(adapter_dir(path)), name


def write_adapters(adapters: AdapterSet, path: str | Path, fmt: str) -> Path:
    """Write ``adapters`` into directory ``path`` in format ``fmt``; returns the weights file.

    A folder holding an adapter of another format is refused (`check_write_target`)."""
    format_ = get_format(fmt)
    d = Path(path)
    if d.suffix == ".safetensors":
        raise ValueError(f"{d}: pass a directory; the file names are fixed by the format")
    if not adapters.modules:
        raise ValueError("no adapters to write")
    if d.is_dir():
        check_write_target(d, format_.name)
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
    """The tensors of a safetensors file, all finite, with errors naming the file."""
    try:
        tensors = mx.load(str(p))
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{p}: cannot read the adapter weights ({e})") from None
    check_finite(tensors, str(p))
    return tensors
