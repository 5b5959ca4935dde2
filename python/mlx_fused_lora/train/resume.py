"""The output folder's rules and resume's checks: what a run may write over and continue from.

- One run writes to an output folder at a time (`output_dir_lock`, on `run_lock`): a
  second one is refused at once, naming the first one's pid.
- A new run refuses an output folder that already holds checkpoints (another run's)
  unless it resumes from one of them (``--resume-from``) or is told to delete them
  (``--overwrite``: the checkpoints and every output of that run, sample included); a
  folder that is a file or cannot be written is a clear error. A ``--resume-from`` that
  does not exist is said first.
- Leftovers of killed writes (``.tmp-*``) are removed at start.
- Resume refuses a checkpoint whose LoRA shape (rank, alpha, targets, layers, bias) or
  base model differs from this run's, with one message naming every difference: those
  adapters cannot continue as a different adapter. Other changed settings (learning rate,
  step count, batch size, ...) are allowed and stated in a warning.
- A checkpoint is validated in full (names, shapes, dtypes) before any tensor is assigned.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from ..run_lock import run_lock
from .checkpoint import (
    LATEST,
    TrainingCheckpointError,
    clean_stale_temporaries,
    list_checkpoints,
    resolve_checkpoint,
)

__all__ = [
    "OutputDirError",
    "ResumeMismatchError",
    "output_dir_lock",
    "check_resume_from",
    "recorded_state",
    "prepare_output_dir",
    "model_record",
    "check_resume",
    "restore",
]

log = logging.getLogger(__name__)


class OutputDirError(ValueError):
    """The output folder cannot be used (a file, unwritable, or another run's checkpoints)."""


class ResumeMismatchError(TrainingCheckpointError):
    """The checkpoint's adapters or base model differ from this run's."""


def _fail_io(what: str, path: Path, e: OSError):
    raise OutputDirError(f"cannot {what} --output-dir {path}: {e.strerror or e}") from None


def _check_not_a_file(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"--output-dir {output_dir} is a file, not a folder")


@contextlib.contextmanager
def output_dir_lock(output_dir: Path, is_main: bool):
    """Hold ``output_dir``'s run lock (the main rank: the one that writes) for the block.

    Raises `FolderInUseError` naming the run that holds it, `OutputDirError` when the
    folder is a file or cannot be created or written."""
    _check_not_a_file(output_dir)
    if not is_main:
        yield
        return
    with contextlib.ExitStack() as stack:
        existed = output_dir.is_dir()
        try:
            stack.enter_context(run_lock(output_dir, "--output-dir"))  # FolderInUseError passes through
        except OSError as e:
            _fail_io("write to" if existed else "create", output_dir, e)
        yield


def check_resume_from(resume_from: Path | None) -> None:
    """A ``--resume-from`` that does not exist, said before anything else is checked."""
    if resume_from is not None and not Path(resume_from).exists():
        raise TrainingCheckpointError(f"--resume-from {resume_from} does not exist")


def recorded_state(resume_from: Path) -> dict | None:
    """The trainer state the checkpoint at ``resume_from`` records (unverified: for deciding
    early whether anything is left to do; resuming verifies it in full), or None."""
    try:
        ckpt = resolve_checkpoint(resume_from)
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError, TrainingCheckpointError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return None
    return {**state, "checkpoint_dir": str(ckpt)}


def prepare_output_dir(
    output_dir: Path, resume_from: Path | None, overwrite: bool, is_main: bool, output_names: Sequence[str] = ()
) -> None:
    """Check (every rank) and set up (the main rank) ``output_dir`` for a run; ``--overwrite``
    deletes an earlier run's checkpoints and its outputs, the files ``output_names`` names."""
    check_resume_from(resume_from)
    _check_not_a_file(output_dir)
    ckpt_root = output_dir / "checkpoints"
    existing = list_checkpoints(ckpt_root)
    resuming_here = False
    if resume_from is not None and existing:
        try:
            resuming_here = resolve_checkpoint(resume_from).resolve().parent == ckpt_root.resolve()
        except TrainingCheckpointError:
            resuming_here = False  # load_checkpoint names the problem later
    if existing and not resuming_here and not overwrite:
        raise OutputDirError(
            f"--output-dir {output_dir} holds another run's checkpoints ({existing[0].name} .. {existing[-1].name}): "
            f"pass --resume-from {output_dir} to continue that run, --overwrite to delete them and start anew, "
            "or choose another --output-dir"
        )
    if not is_main:
        return
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail_io("create", output_dir, e)
    probe = output_dir / f".tmp-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        _fail_io("write to", output_dir, e)
    stale = clean_stale_temporaries(output_dir) + clean_stale_temporaries(ckpt_root)
    if stale:
        log.info("removed %d leftovers of interrupted writes: %s", len(stale), ", ".join(p.name for p in stale))
    if existing and overwrite and not resuming_here:
        outputs = [output_dir / n for n in output_names if (output_dir / n).is_file()]
        for p in existing:
            shutil.rmtree(p)
        (ckpt_root / LATEST).unlink(missing_ok=True)
        for p in outputs:
            p.unlink()
        log.warning(
            "--overwrite: deleted the previous run in %s: %d checkpoints%s",
            output_dir,
            len(existing),
            "".join(f", {p.name}" for p in outputs),
        )


def model_record(model: nn.Module, config: dict) -> dict:
    """What identifies the base model: its config and a fingerprint of its weights.

    The fingerprint hashes the first 64 values of every base (non-LoRA) tensor: cheap,
    and different for any other checkpoint of the same architecture.
    """
    h = hashlib.sha256()
    for name, v in sorted(tree_flatten(model.parameters())):
        if ".lora_" in name or name.startswith("lora_"):
            continue
        head = v.reshape(-1)[:64]
        h.update(name.encode())
        h.update(memoryview(head.astype(mx.float32)))
    # through JSON, so it compares equal to the record read back from a checkpoint
    return json.loads(json.dumps({"config": config, "fingerprint": h.hexdigest()[:32]}))


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return a is not None and b is not None and list(a) == list(b)
    return a == b


def check_resume(
    state: dict, settings: dict, model: dict, run: dict, must_match: dict[str, str], model_flag: str
) -> list[str]:
    """Refuse a checkpoint made for other adapters or another model; return the other changes.

    ``state`` is the checkpoint's trainer state; ``settings`` this run's settings as a
    dict; ``model`` its `model_record`; ``run`` this run's ``total_steps``, ``batch_size``,
    ``world_size`` and ``num_train_samples``; ``must_match`` maps each setting that fixes
    what the adapters are (a change is refused) to the flag that sets it; ``model_flag`` is the
    flag naming the base model.
    """
    ckpt = state.get("checkpoint_dir", "the checkpoint")
    old = state.get("settings", {})
    refused = []
    for k, flag in must_match.items():
        if k in old and not _same(old[k], settings.get(k)):
            refused.append(f"{flag} {settings.get(k)} (the checkpoint has {old[k]})")
    old_model = state.get("model")
    if old_model is not None:
        if old_model.get("config") != model["config"]:
            refused.append("the model's config (architecture) differs from the checkpoint's base model")
        elif old_model.get("fingerprint") != model["fingerprint"]:
            refused.append(f"{model_flag} holds other weights than the checkpoint's base model")
    if refused:
        raise ResumeMismatchError(
            f"cannot resume from {ckpt}: " + "; ".join(refused) + ". Resume with the checkpoint's settings "
            "and model, or start a new run in another --output-dir"
        )
    notes = []
    for k, v in settings.items():
        if k in old and k not in must_match and not _same(old[k], v):
            notes.append(f"{k} {old[k]} -> {v}")
    if "total_steps" in state and state["total_steps"] != run["total_steps"]:
        notes.append(
            f"total steps {state['total_steps']} -> {run['total_steps']} (the learning-rate schedule is rebuilt "
            "for the new length, so the run differs from an uninterrupted one)"
        )
    for k in ("batch_size", "world_size", "num_train_samples"):
        if k in state and state[k] != run[k]:
            notes.append(f"{k} {state[k]} -> {run[k]} (the data order differs from the interrupted run)")
    return notes


def restore(model: nn.Module, optimizer, adapters: dict, opt_state: dict, ckpt: str) -> None:
    """Assign a checkpoint's adapters and optimizer state, all or nothing.

    Every trainable parameter and optimizer-state entry must be present with the same
    shape and dtype; only then is anything assigned.
    """
    problems = []
    for k, v in tree_flatten(model.trainable_parameters()):
        got = adapters.get(k)
        if got is None:
            problems.append(f"lacks adapter {k}")
        elif got.shape != v.shape or got.dtype != v.dtype:
            problems.append(f"adapter {k} is {got.dtype} {tuple(got.shape)}, the model's is {v.dtype} {tuple(v.shape)}")
    for k, v in tree_flatten(optimizer.state):
        got = opt_state.get(k)
        if got is None:
            problems.append(f"lacks optimizer state {k}")
        elif got.shape != v.shape:
            problems.append(f"optimizer state {k} is {tuple(got.shape)}, expected {tuple(v.shape)}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise TrainingCheckpointError(f"checkpoint {ckpt}: " + "; ".join(problems[:3]) + more)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    model.load_weights([(k, adapters[k]) for k in trainable], strict=False)
    optimizer.state = tree_map_with_path(lambda path, _: opt_state[path], optimizer.state)
    mx.eval(model.parameters(), optimizer.state)
