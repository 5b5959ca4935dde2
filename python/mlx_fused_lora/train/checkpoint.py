"""Training checkpoints that a crash cannot half-write, and that are checked on load.

A checkpoint is a directory ``checkpoints/step_00000123/`` with ``adapters.safetensors``
(the trainable parameters), ``optimizer.safetensors`` (the optimizer state, its step count
included), ``trainer_state.json`` (step, data position, seed, random key, settings) and
``manifest.json`` (each file's size and sha256), written last. It is built in a hidden
temporary directory, every file fsynced, and renamed into place; then ``checkpoints/latest``
(the name of the newest) is replaced by the same write-then-rename. A process killed at
any moment leaves either the previous checkpoint or the new one, never a mix.

`load_checkpoint` refuses a directory whose manifest is missing or whose files differ from
it in size or hash, or whose tensors are not all finite (`TrainingCheckpointError`, naming
the file). `save_checkpoint` refuses to write non-finite tensors at all, and prunes only
checkpoints older than the one it wrote: the newest is never deleted and ``latest`` never
names a missing directory (a later-numbered checkpoint of another run is left alone).
`clean_stale_temporaries` removes what a killed write left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from ..adapters.checks import non_finite_names
from .write_errors import mlx_write_error, named_write_errors

__all__ = [
    "TrainingCheckpointError",
    "MANIFEST",
    "save_checkpoint",
    "load_checkpoint",
    "resolve_checkpoint",
    "atomic_write_dir",
    "atomic_write_text",
    "sha256_file",
    "non_finite_names",
    "list_checkpoints",
    "clean_stale_temporaries",
    "NonFiniteCheckpointError",
]

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT_VERSION = 1


class TrainingCheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, truncated or corrupt."""


class NonFiniteCheckpointError(TrainingCheckpointError):
    """Tensors to be saved (or loaded) hold NaN or inf."""


def _step_of(path: Path) -> int | None:
    try:
        return int(path.name[len("step_") :])
    except ValueError:
        return None


def list_checkpoints(root: str | Path) -> list[Path]:
    """The ``step_*`` directories under ``root``, oldest step first."""
    root = Path(root)
    found = [p for p in root.glob("step_*") if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=_step_of)


def clean_stale_temporaries(root: str | Path) -> list[Path]:
    """Remove ``.tmp-*`` / ``.old-*`` leftovers of killed writes under ``root``; returns them."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = list(root.glob(".tmp-*")) + list(root.glob(".old-step_*"))
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported on every platform; the renames are still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, fsync it, rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def atomic_write_dir(target: str | Path, write: Callable[[Path], object]) -> list[Path]:
    """Run ``write(tmp_dir)``, then move each file it made into ``target`` by rename.

    For output files with fixed names (adapters, merged weights): each file is replaced
    whole, so a reader never sees a partly written one.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            write(tmp)
        except RuntimeError as e:  # MLX's writer names no file: the newest one is the one it was writing
            newest = max(tmp.iterdir(), key=lambda f: f.stat().st_mtime_ns, default=None)
            err = mlx_write_error(e, newest, target / newest.name) if newest is not None else None
            if err is None:
                raise
            raise OSError(err.errno, f"cannot write {err.filename}: {err.strerror}", err.filename) from None
        moved = []
        for f in sorted(tmp.iterdir()):
            _fsync_file(f)
            try:
                os.replace(f, target / f.name)
            except OSError as e:  # name the file the user sees, not the temporary one
                raise OSError(e.errno, f"cannot write {target / f.name}: {e.strerror}", str(target / f.name)) from None
            moved.append(target / f.name)
        _fsync_dir(target)
        return moved
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(
    root: str | Path,
    step: int,
    adapters: dict[str, mx.array],
    optimizer_state: dict[str, mx.array],
    trainer_state: dict,
    keep_last: int = 3,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; returns its directory.

    Refuses (`NonFiniteCheckpointError`) when a tensor holds NaN or inf: a checkpoint is
    always one a run can continue from. Keeps the newest ``keep_last`` checkpoints up to
    ``step`` (0: all).
    """
    bad = non_finite_names(adapters) + non_finite_names(optimizer_state)
    if bad:
        raise NonFiniteCheckpointError(
            f"not writing checkpoint step {step}: {len(bad)} tensors hold NaN or inf ({', '.join(bad[:3])})"
        )
    root = Path(root)
    try:
        return _write_checkpoint(root, step, adapters, optimizer_state, trainer_state, keep_last)
    except OSError as e:  # a failed write leaves the previous checkpoint, and `latest`, usable
        where = e.filename or root
        raise OSError(
            e.errno, f"cannot write checkpoint step {step} in {root}: {e.strerror} ({where})", str(where)
        ) from None


def _write_checkpoint(root: Path, step: int, adapters, optimizer_state, trainer_state, keep_last) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_files(tmp, final, step, adapters, optimizer_state, trainer_state)
    except BaseException:  # a full disk, Ctrl-C: free the space, leave the previous checkpoint as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # a rerun of the same step: move the old one aside first
        old = root / f".old-step_{step:08d}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    _prune(root, step, keep_last)
    return final


def _write_files(tmp: Path, final: Path, step: int, adapters, optimizer_state, trainer_state) -> None:
    """The checkpoint's files in ``tmp``, fsynced, the manifest last; errors name the file in ``final``."""
    for name, tensors in (("adapters.safetensors", adapters), ("optimizer.safetensors", optimizer_state)):
        with named_write_errors(tmp / name, final / name):
            mx.save_safetensors(str(tmp / name), tensors)
    with open(tmp / "trainer_state.json", "w") as f:
        json.dump(trainer_state, f, indent=2, sort_keys=True)
    files = {}
    for p in sorted(tmp.iterdir()):
        _fsync_file(p)
        files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _prune(root: Path, step: int, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints with a step up to ``step``.

    Only older ones are candidates: the one just written survives, ``latest`` (which
    names it) never dangles, and a higher-numbered checkpoint is not this run's to delete.
    """
    if keep_last <= 0:
        return
    older = [p for p in list_checkpoints(root) if _step_of(p) <= step]
    for p in older[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory ``path`` names: itself, or the latest under it.

    Accepts a ``step_*`` directory, a ``checkpoints`` directory, or a run's output
    directory (which holds ``checkpoints/``).
    """
    path = Path(path)
    if (path / MANIFEST).exists() or path.name.startswith("step_"):
        return path
    for root in (path, path / "checkpoints"):
        latest = root / LATEST
        if latest.is_file() and (root / latest.read_text().strip()).is_dir():
            return root / latest.read_text().strip()
        steps = [p for p in list_checkpoints(root) if (p / MANIFEST).exists()]
        if steps:
            return steps[-1]
    raise TrainingCheckpointError(f"no checkpoint at {path} (expected a step_* directory or a 'latest' file)")


def load_checkpoint(path: str | Path) -> tuple[dict, dict, dict]:
    """``(adapters, optimizer_state, trainer_state)`` of a verified checkpoint."""
    ckpt = resolve_checkpoint(path)
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        raise TrainingCheckpointError(
            f"checkpoint {ckpt} has no {MANIFEST}: it is incomplete (its write was interrupted) or not a checkpoint"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise TrainingCheckpointError(f"checkpoint {ckpt}: unreadable {MANIFEST} ({e})") from None
    for name in ("adapters.safetensors", "optimizer.safetensors", "trainer_state.json"):
        if name not in files:
            raise TrainingCheckpointError(f"checkpoint {ckpt}: {MANIFEST} does not list {name}")
    for name, meta in files.items():
        p = ckpt / name
        if not p.is_file():
            raise TrainingCheckpointError(f"checkpoint {ckpt}: {name} is missing")
        size = p.stat().st_size
        if size != meta["size"]:
            raise TrainingCheckpointError(
                f"checkpoint {ckpt}: {name} is {size} bytes, the manifest says {meta['size']} "
                "(truncated or overwritten); refusing to resume from it"
            )
        digest = sha256_file(p)
        if digest != meta["sha256"]:
            raise TrainingCheckpointError(
                f"checkpoint {ckpt}: {name} has sha256 {digest[:16]}..., the manifest says "
                f"{meta['sha256'][:16]}... (corrupt); refusing to resume from it"
            )
    adapters = mx.load(str(ckpt / "adapters.safetensors"))
    optimizer_state = mx.load(str(ckpt / "optimizer.safetensors"))
    bad = non_finite_names(adapters) + non_finite_names(optimizer_state)
    if bad:
        raise NonFiniteCheckpointError(
            f"checkpoint {ckpt}: {len(bad)} tensors hold NaN or inf ({', '.join(bad[:3])}); refusing to resume from it"
        )
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    trainer_state["checkpoint_dir"] = str(ckpt)
    return adapters, optimizer_state, trainer_state
