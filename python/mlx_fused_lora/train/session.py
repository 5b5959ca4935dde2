"""One run of a task on the loop: resumed from its checkpoint, checkpointed with its record, metered in ``metrics.jsonl``.

Every task (the CSM task, the preference task) brings its model, optimizer, loss, batches
and settings; `run` does the rest the same way for all of them:

- resume: the checkpoint is loaded and verified (`checkpoint.load_checkpoint`), compared
  with this run (`resume.check_resume`: the task's ``must_match`` settings and the base
  model refused when they differ, other changes stated) and restored all or nothing;
- checkpoints every ``save_every`` steps and at the end (rank 0 writes), each recording
  the step, the data position, the run's facts, the settings, the base model and the
  random key (`trainer_state`); the newest ``keep`` are kept;
- ``metrics.jsonl`` continued without duplicates across resumes (`metrics.MetricsLog`);
- the loop itself (`loop.train`): compiled step, accumulation, clipping, data-parallel
  averaging, validation, progress, Ctrl-C.

The task keeps the output folder's lock and rules (`resume.output_dir_lock`,
`resume.prepare_output_dir`) around the call, and writes its own outputs after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import loop
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import World
from .metrics import METRICS, MetricsLog
from .plan import RunPlan
from .resume import check_resume, restore

__all__ = ["RunSpec", "run_facts", "trainer_state", "resume", "run", "METRICS", "KEEP_CHECKPOINTS"]

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 3


@dataclass
class RunSpec:
    """What a run is, as its checkpoints record it and a resumed run is compared with."""

    output_dir: Path
    plan: RunPlan
    batch_size: int
    num_train_samples: int
    settings: dict  # the task's settings (asdict): recorded, compared on resume
    model_record: dict  # `resume.model_record` of the base model
    must_match: dict  # setting -> its flag: settings a resumed run must share with its checkpoint
    model_flag: str  # the flag naming the base model, for resume's message
    grad_accumulation_steps: int = 1
    max_grad_norm: float = 0.0
    seed: int = 0
    val_every: int = 0
    save_every: int = 0
    report_every: int = 0


def run_facts(spec: RunSpec, world: World) -> dict:
    """What fixes the data order and the schedule (recorded, and compared on resume)."""
    return {
        "total_steps": spec.plan.total_steps,
        "batch_size": spec.batch_size,
        "world_size": world.size,
        "num_train_samples": spec.num_train_samples,
    }


def trainer_state(spec: RunSpec, world: World, step: int, record: dict | None = None) -> dict:
    """A checkpoint's record of the run at ``step`` (after the step: the random key is the one
    the next step would start from, though the loop re-seeds it per step), with the task's own
    ``record`` (e.g. the rank a growing adapter has reached)."""
    micro = step * spec.grad_accumulation_steps
    per_epoch = spec.plan.micro_per_epoch
    return {
        "step": step,
        "epoch": micro // per_epoch,
        "batch_in_epoch": micro % per_epoch,
        "micro_batches_done": micro,
        **run_facts(spec, world),
        "rng_key": [int(v) for v in np.array(mx.random.state[0]).reshape(-1)],
        **(record or {}),
        "settings": spec.settings,
        "model": spec.model_record,
    }


def resume(path, model, optimizer, spec: RunSpec, world: World, before_restore=None) -> tuple[int, Path]:
    """Load, check and restore the checkpoint at ``path``; returns ``(its step, its folder)``.
    ``before_restore(state, optimizer)`` readies the model for the checkpoint's tensors (a
    grown rank) from its record."""
    adapters, opt_state, state = load_checkpoint(path)
    notes = check_resume(
        state, spec.settings, spec.model_record, run_facts(spec, world), spec.must_match, spec.model_flag
    )
    if before_restore is not None:
        before_restore(state, optimizer)
    restore(model, optimizer, adapters, opt_state, state["checkpoint_dir"])
    if notes and world.is_main:
        log.warning("resuming with changed settings: %s", "; ".join(notes))
    log.info("resumed from %s at step %d", state["checkpoint_dir"], state["step"])
    return int(state["step"]), Path(state["checkpoint_dir"])


def run(
    model,
    optimizer,
    loss_fn: Callable,
    batches: Callable,
    spec: RunSpec,
    *,
    world: World,
    schedule: Callable | None = None,
    aux_names: Sequence[str] = (),
    evaluate: Callable[[], float] | None = None,
    resume_from: str | Path | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[Path], None] | None = None,
    prepare_step: Callable[[int], bool] | None = None,
    record: Callable[[], dict] | None = None,
    before_restore: Callable[[dict, object], None] | None = None,
) -> tuple[loop.TrainResult, MetricsLog, int]:
    """Resume (when ``resume_from`` is given), train to ``spec.plan.total_steps`` on the loop,
    checkpointing into ``spec.output_dir / "checkpoints"``; returns ``(result, metrics, start)``.

    ``on_checkpoint(path)`` hears of each checkpoint: the one resumed from, then every one
    written (a task remembers the newest for its Ctrl-C message). ``prepare_step`` is the
    loop's (a rank growth before a step); ``record()`` adds the task's fields to every
    checkpoint's record and ``before_restore(state, optimizer)`` reads them on resume.
    """
    start, resumed = resume(resume_from, model, optimizer, spec, world, before_restore) if resume_from else (0, None)
    if resumed is not None and on_checkpoint is not None:
        on_checkpoint(resumed)
    ckpt_root = spec.output_dir / "checkpoints"
    metrics = MetricsLog(spec.output_dir / METRICS, start, enabled=world.is_main)

    def save(step: int) -> Path | None:
        if not world.is_main:
            return None
        adapters = dict(tree_flatten(model.trainable_parameters()))
        opt_state = dict(tree_flatten(optimizer.state))
        state = trainer_state(spec, world, step, record() if record is not None else None)
        path = save_checkpoint(ckpt_root, step, adapters, opt_state, state, KEEP_CHECKPOINTS)
        log.info("checkpoint %s", path)
        if on_checkpoint is not None:
            on_checkpoint(path)
        return path

    settings = loop.LoopSettings(
        steps=spec.plan.total_steps,
        start_step=start,
        grad_accumulation_steps=spec.grad_accumulation_steps,
        max_grad_norm=spec.max_grad_norm,
        seed=spec.seed,
        val_every=spec.val_every,
        save_every=spec.save_every,
        report_every=spec.report_every,
    )
    result = loop.train(
        model,
        optimizer,
        loss_fn,
        batches,
        settings,
        world=world,
        schedule=schedule,
        aux_names=aux_names,
        evaluate=evaluate,
        save=save,
        metrics=metrics,
        progress=progress,
        last_checkpoint=resumed,
        prepare_step=prepare_step,
    )
    return result, metrics, start
