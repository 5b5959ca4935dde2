"""A training command's life outside the loop: one-line errors, Ctrl-C at any moment, the line for a finished run.

`run_command` runs a command's body the same way for every training command
(``finetune``, ``lm_lora --train-mode dpo``): logging set up from ``--log-level`` /
``--debug``; an expected error (ValueError, RuntimeError, OSError, ImportError: their
messages name the problem) is one line and exit status 1, anything else one line saying
it was unexpected; Ctrl-C outside the training loop (which saves and returns by itself) is
one line naming the moment and the newest checkpoint, exit status 130. ``--debug`` lets
the traceback through. `train_in_folder` is a training command's body around its task:
the ``--resume-from`` said first, the output folder locked, a finished run's line instead of
anything loaded (`finished_line`, `run_length`), the closing summary (`print_summary`), the
exit status.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .distributed import World, init_world
from .metrics import METRICS, recorded_losses
from .plan import plan_steps
from .resume import check_resume_from, output_dir_lock, recorded_state

__all__ = [
    "run_command",
    "one_line",
    "train_in_folder",
    "run_length",
    "finished_line",
    "print_summary",
    "EXPECTED_ERRORS",
]

EXPECTED_ERRORS = (ValueError, RuntimeError, OSError, ImportError)  # their messages name the problem


def one_line(e: BaseException) -> str:
    """An exception as one line: the message, and the file for an OSError."""
    if isinstance(e, OSError) and e.strerror:
        msg = e.strerror
        if e.filename and str(e.filename) not in msg:
            msg = f"{e.filename}: {msg}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


def _interrupted(run: dict) -> str:
    trainer = run["trainer"]
    stage = trainer.stage if trainer is not None else run["stage"]
    saved = getattr(trainer, "last_checkpoint", None)
    if saved is None:
        return f"interrupted (Ctrl-C) while {stage}; nothing of this run was saved"
    return f"interrupted (Ctrl-C) while {stage}; the newest checkpoint is {saved} (--resume-from continues from it)"


def run_command(args, body: Callable[[dict], int], log: logging.Logger) -> int:
    """``body(run)`` with the rules above; ``run`` is a dict the body keeps up to date:
    ``run["stage"]`` (what it is doing) until it has a ``run["trainer"]`` whose own
    ``stage`` and ``last_checkpoint`` say so."""
    logging.basicConfig(
        level=logging.DEBUG if args.debug else getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    run = {"stage": "starting", "trainer": None}
    try:
        return body(run)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and returns itself)
        if args.debug:
            raise
        log.error("%s", _interrupted(run))
        return 130
    except Exception as e:
        if args.debug:
            raise
        expected = isinstance(e, EXPECTED_ERRORS)
        kind = "" if expected else f"unexpected {type(e).__name__}: "
        hint = "" if expected else " (run with --debug for the traceback)"
        log.error("%s%s%s", kind, one_line(e), hint)
        return 1


def train_in_folder(
    out: Path,
    resume_from: str | None,
    finished: Callable[[dict, int], str | None],
    train: Callable[[World, dict | None], object],
) -> int:
    """A training command's body: ``--resume-from`` checked before anything else, ``out``
    locked for the run (one run per folder), ``finished(recorded, world_size)`` printed
    instead of anything loaded when it says the resumed run has nothing left to do, else
    ``train(world, recorded)`` (a `loop.TrainResult`) and its summary. Returns the exit
    status: 0, or 130 when interrupted."""
    check_resume_from(resume_from)  # a mistyped path is said before anything else
    world = init_world()
    with output_dir_lock(out, world.is_main):  # one run per folder, before anything is written
        recorded = recorded_state(Path(resume_from)) if resume_from else None
        line = finished(recorded, world.size) if recorded is not None else None
        if line is not None:  # nothing to do: no model load, no data read
            if world.is_main:
                print(line)
            return 0
        result = train(world, recorded)
    if world.is_main:
        print_summary(result)
    return 130 if result.interrupted else 0


def run_length(
    recorded: dict, steps: int | None, batch_size: int, world_size: int, accumulation: int, epochs
) -> int | None:
    """The run's length in steps: ``steps`` when given, else ``epochs`` passes over the number
    of training samples the checkpoint ``recorded``; None when the record cannot say."""
    if steps is not None:
        return steps
    try:
        n = int(recorded["num_train_samples"])
        return plan_steps(n, batch_size, world_size, accumulation, epochs, None).total_steps
    except (KeyError, TypeError, ValueError):
        return None  # the normal path reads the data and says what is wrong


def finished_line(recorded: dict, total: int | None, wanted: Sequence[Path], out: Path, more: str) -> str | None:
    """What to print when the checkpoint ``recorded`` (`resume.recorded_state`) is at the
    run's last step ``total`` and every file ``wanted`` is there; None when anything is
    left to do. ``more``: the flag that would make the run longer."""
    step = recorded["step"]
    if total is None or step < total or not all(p.is_file() for p in wanted):
        return None
    loss, val = recorded_losses(out / METRICS, step)
    record = "".join(f", {name} {v:.4f}" for name, v in (("loss", loss), ("validation loss", val)) if v is not None)
    return (
        f"already finished: {recorded['checkpoint_dir']} is step {step} of {total}{record}; its outputs are "
        f"in {out}. Nothing to train (a larger {more} would continue it)"
    )


def print_summary(result) -> None:
    """The closing lines of a run (a `loop.TrainResult`): steps, loss, validation loss, speed and
    peak memory, then one ``wrote PATH`` line per file or folder written."""
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    speed = f", {result.steps_per_s:.2f} steps/s" if result.steps_per_s > 0 else ""
    peak = f", peak {result.peak_memory_mb:.1f} MiB" if result.losses else ""  # no step, no figure
    print(
        f"{'interrupted' if result.interrupted else 'done'}: {result.steps} steps, loss {result.final_loss:.4f}"
        f"{val}{speed}{peak}"
    )
    for p in result.outputs:
        print(f"wrote {p}")
