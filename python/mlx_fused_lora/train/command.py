"""A training command's life outside the loop: one-line errors, Ctrl-C at any moment, the line for a finished run.

`run_command` runs a command's body the same way for every training command
(``finetune``, ``lm_lora --train-mode dpo``): logging set up from ``--log-level`` /
``--debug``; an expected error (ValueError, RuntimeError, OSError, ImportError: their
messages name the problem) is one line and exit status 1, anything else one line saying
it was unexpected; Ctrl-C outside the training loop (which saves and returns by itself) is
one line naming the moment and the newest checkpoint, exit status 130. ``--debug`` lets
the traceback through. `finished_line` is what a resumed run that has nothing left to do
prints instead of loading anything.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .metrics import METRICS, recorded_losses

__all__ = ["run_command", "one_line", "finished_line", "print_summary", "EXPECTED_ERRORS"]

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


def finished_line(recorded: dict, total: int, wanted: Sequence[Path], out: Path, more: str) -> str | None:
    """What to print when the checkpoint ``recorded`` (`resume.recorded_state`) is at the
    run's last step ``total`` and every file ``wanted`` is there; None when anything is
    left to do. ``more``: the flag that would make the run longer."""
    step = recorded["step"]
    if step < total or not all(p.is_file() for p in wanted):
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
