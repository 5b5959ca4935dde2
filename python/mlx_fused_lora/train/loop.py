"""The training loop for any MLX model: a compiled step, accumulation, clipping, data-parallel averaging, hooks.

In the spirit of mlx-lm's ``tuner.trainer.train``: the caller brings the model (its
trainable parameters are what is trained), an optimizer, a loss function
``loss_fn(model, *inputs) -> (loss, aux)`` (``aux`` a tuple of scalars named by
``aux_names``), and ``batches(i) -> (inputs, tokens)`` giving the ``i``-th micro-batch
of the run (a pure function of ``i``, which is what makes resume exact). Checkpoints,
validation and metrics come in as hooks; the loop owns the order of events:

1. before step ``s`` the MLX random state is re-seeded from ``(seed, s, rank)``; the
   compiled step threads that state, so dropout and any sampling in the loss are a
   function of the step (MLX 0.32's ``mx.random.state`` cannot be assigned from Python,
   so re-seeding is how a resumed run gets the same randomness);
2. ``grad_accumulation_steps`` micro-batches, gradients averaged over ranks, clipped to
   ``max_grad_norm``, one optimizer update;
3. a non-finite loss stops the run (`NonFiniteLossError`, naming the newest good
   checkpoint); the trained tensors are checked before every checkpoint, so none holds
   a NaN;
4. metrics (a log line every ``report_every`` steps too), progress (tqdm), validation every ``val_every`` steps, a checkpoint every
   ``save_every`` steps and always at the end; Ctrl-C finishes the step, checkpoints and
   returns with ``interrupted=True`` (a second Ctrl-C waits for that checkpoint: interrupt.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..adapters.checks import non_finite_names
from .distributed import World, init_world
from .interrupt import StopOnInterrupt
from .metrics import MetricsLog

__all__ = ["LoopSettings", "TrainResult", "NonFiniteLossError", "make_schedule", "step_seed", "build_step", "train"]

log = logging.getLogger(__name__)

Batch = tuple[tuple, float]  # (the loss function's inputs after the model, tokens in them)


class NonFiniteLossError(RuntimeError):
    """The loss or the trained tensors became NaN or infinite; no checkpoint holds them."""


@dataclass
class LoopSettings:
    steps: int  # optimizer steps of the whole run (a resumed run included)
    start_step: int = 0  # steps already done (the resumed checkpoint's)
    grad_accumulation_steps: int = 1
    max_grad_norm: float = 0.0  # 0: no clipping
    seed: int = 0
    val_every: int = 0  # 0: validate only at the end
    save_every: int = 0  # 0: checkpoint only at the end
    report_every: int = (
        0  # a log line of the step's metrics every N steps (0: none; the bar and metrics.jsonl have them)
    )


@dataclass
class TrainResult:
    steps: int = 0
    final_loss: float = float("nan")
    val_loss: float | None = None
    steps_per_s: float = 0.0
    step_time_s: float = 0.0  # mean wall time of a step, compile steps excluded when there are others
    tokens_per_s: float = 0.0
    peak_memory_mb: float = 0.0
    interrupted: bool = False
    losses: list = field(default_factory=list)
    outputs: list = field(default_factory=list)  # every file or folder the run wrote
    checkpoint: Path | None = None  # the newest checkpoint this run wrote


def make_schedule(lr: float, total_steps: int, warmup_steps: int, kind: str):
    """Linear warmup over ``warmup_steps``, then ``kind`` decay to 10% of ``lr`` at the end.

    Warmup step ``i`` (0-based) runs at ``lr * (i + 1) / warmup_steps``: the first step
    already learns, and the last warmup step is at the peak.
    """
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "cosine":
        main = optim.cosine_decay(lr, decay_steps, end=lr * 0.1)
    elif kind == "linear":
        main = optim.linear_schedule(lr, lr * 0.1, decay_steps)
    elif kind == "constant":
        main = lambda step: mx.array(lr, dtype=mx.float32)
    else:
        raise ValueError(f"lr_schedule must be cosine, linear or constant, got {kind!r}")
    if warmup_steps <= 0:
        return main
    warm = lambda step: lr * (mx.array(step, dtype=mx.float32) + 1.0) / warmup_steps
    return optim.join_schedules([warm, main], [warmup_steps])


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.default_rng([seed, step, rank]).integers(0, 2**31 - 1))


def build_step(model: nn.Module, optimizer, loss_fn: Callable, settings: LoopSettings, world: World):
    """The compiled micro-step: ``(inputs, prev_grad, do_update) -> (loss, aux, norm, grad)``.

    Gradients add up over micro-batches; on the last one they are averaged over ranks and
    micro-batches, clipped and applied (``grad`` comes back None).
    """
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]
    accumulation, max_norm = settings.grad_accumulation_steps, settings.max_grad_norm

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, prev_grad, do_update):
        (loss, aux), grad = value_and_grad(model, *inputs)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        norm = mx.array(0.0)
        if do_update:
            if world.size > 1:
                grad = nn.average_gradients(grad, group=world.group)
            if accumulation > 1:
                grad = tree_map(lambda g: g / accumulation, grad)
            if max_norm > 0:
                grad, norm = optim.clip_grad_norm(grad, max_norm)
            optimizer.update(model, grad)
            grad = None
        return loss, aux, norm, grad

    return step


def _where_good(checkpoints: list[tuple[int, Path]], up_to: int) -> str:
    """The newest checkpoint of step <= ``up_to`` (its parameters gave a finite loss)."""
    good = [path for step, path in checkpoints if step <= up_to]
    if not good:
        return "No checkpoint holds this run's progress yet (none was written before it went wrong)."
    return f"The newest good checkpoint is {good[-1]} (resume from it with a lower --learning-rate or --max-grad-norm)."


def _non_finite_loss(loss: float, step: int, checkpoints: list[tuple[int, Path]]) -> NonFiniteLossError:
    """Step ``step``'s loss came from the parameters after step ``step - 1``: a checkpoint of
    that step holds finite tensors that already give this loss, so it is not a good one."""
    msg = f"the loss became {loss} at step {step}; stopping without saving."
    diverged = [path for k, path in checkpoints if k == step - 1]
    if diverged:
        msg += f" Checkpoint {diverged[-1]} already gives this loss (its tensors are finite, the run had diverged)."
    return NonFiniteLossError(f"{msg} {_where_good(checkpoints, step - 2)}")


def _check_finite(model: nn.Module, optimizer, step: int, checkpoints: list[tuple[int, Path]]) -> None:
    tensors = dict(tree_flatten(model.trainable_parameters()))
    tensors.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    bad = non_finite_names(tensors)
    if bad:
        raise NonFiniteLossError(
            f"after step {step}, {len(bad)} of {len(tensors)} trained tensors hold NaN or inf "
            f"(e.g. {', '.join(bad[:3])}); stopping without writing a checkpoint of them. "
            + _where_good(checkpoints, step - 1)
        )


def train(
    model: nn.Module,
    optimizer,
    loss_fn: Callable,
    batches: Callable[[int], Batch],
    settings: LoopSettings,
    *,
    world: World | None = None,
    schedule: Callable | None = None,
    aux_names: Sequence[str] = (),
    evaluate: Callable[[], float] | None = None,
    save: Callable[[int], Path | None] | None = None,
    metrics: MetricsLog | None = None,
    progress: bool = True,
    last_checkpoint: Path | None = None,
    prepare_step: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Run steps ``settings.start_step .. settings.steps``; returns the `TrainResult`.

    ``save(step)`` writes a checkpoint and returns its path (None on ranks that do not
    write); ``evaluate()`` gives the validation loss; ``last_checkpoint`` is the one the
    run resumed from (at ``start_step``). ``prepare_step(step)`` runs before each step (a
    rank growth, `layers.growth`); it returns True when it changed the trained arrays' shapes,
    so the compiled step traces again and that step is not timed. A non-finite loss or
    trained tensor raises `NonFiniteLossError` naming the newest checkpoint whose parameters
    gave a finite loss.
    """
    world = world or init_world()
    s, start = settings, settings.start_step
    A = s.grad_accumulation_steps
    step_fn = build_step(model, optimizer, loss_fn, s, world)
    result = TrainResult(steps=start, checkpoint=None)
    model.train()

    checkpoints = [(start, last_checkpoint)] if last_checkpoint is not None else []  # (step, path), oldest first

    def checkpoint(step: int) -> None:
        _check_finite(model, optimizer, step, checkpoints)
        if save is not None:
            path = save(step)
            if path is not None:
                checkpoints.append((step, path))
                result.checkpoint = path

    tty = sys.stderr.isatty()
    bar = tqdm(
        total=s.steps,
        initial=min(start, s.steps),
        unit="step",
        disable=not (progress and world.is_main),
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.1 if tty else 30.0,  # a log file gets a line every 30 s, not a flood
    )
    # log lines during the loop go through tqdm.write, so they do not cut the bar
    redirect = logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext()
    redirect.__enter__()
    mx.reset_peak_memory()
    timed_steps, timed_s, timed_tokens, seen_shapes = 0, 0.0, 0.0, set()
    all_steps, all_s, all_tokens = 0, 0.0, 0.0
    val_loss, validated_at = None, None
    # Ctrl-C from here to the closing checkpoint: finish the step and save; a second one
    # waits for the save (interrupt.py).
    stop = StopOnInterrupt().__enter__()
    try:
        for step in range(start, s.steps):
            if stop.requested:
                result.interrupted = True
                break
            t0 = time.perf_counter()
            reshaped = bool(prepare_step(step)) if prepare_step is not None else False
            mx.random.seed(step_seed(s.seed, step, world.rank))
            grad, shapes, outs, tokens = None, [], [], 0.0
            for a in range(A):
                inputs, n_tokens = batches(step * A + a)
                shapes.append(tuple(tuple(x.shape) for x in inputs))
                loss, aux, norm, grad = step_fn(inputs, grad, a == A - 1)
                mx.eval(loss, aux, norm, grad, model.state, optimizer.state)
                outs.append((loss, *aux))
                tokens += float(n_tokens)
            means = [world.mean(mx.mean(mx.stack([o[i] for o in outs]))).item() for i in range(len(outs[0]))]
            loss = means[0]
            dt = time.perf_counter() - t0
            if not math.isfinite(loss):
                raise _non_finite_loss(loss, step + 1, checkpoints)
            tokens *= world.size
            all_steps, all_s, all_tokens = all_steps + 1, all_s + dt, all_tokens + tokens
            traced = reshaped or not all(sh in seen_shapes for sh in shapes)
            if not traced:  # steps that compiled a new graph are not timed
                timed_steps, timed_s, timed_tokens = timed_steps + 1, timed_s + dt, timed_tokens + tokens
            seen_shapes.update(shapes)
            done = step + 1
            lr = float(schedule(mx.array(step))) if schedule is not None else float(optimizer.learning_rate)
            entry = {"step": done, "loss": loss, **dict(zip(aux_names, means[1:], strict=False))}
            entry.update(
                learning_rate=lr,
                grad_norm=norm.item(),
                step_time_s=dt,
                tokens_per_s=tokens / dt,
                peak_memory_mb=mx.get_peak_memory() / 2**20,
            )
            if metrics is not None:
                metrics.write(entry)
            if s.report_every and done % s.report_every == 0 and world.is_main:
                shown = {k: v for k, v in entry.items() if k != "step" and (k != "grad_norm" or s.max_grad_norm > 0)}
                log.info("step %d: %s", done, ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
            result.losses.append((done, loss))
            result.steps, result.final_loss = done, loss
            bar.update(1)
            bar.set_postfix_str(
                f"loss {loss:.4f} lr {lr:.2e} {entry['tokens_per_s']:.0f} tok/s peak {entry['peak_memory_mb']:.0f} MiB",
                refresh=False,
            )
            if s.val_every and done % s.val_every == 0 and evaluate is not None:
                val_loss, validated_at = evaluate(), done
                if metrics is not None:
                    metrics.write({"step": done, "val_loss": val_loss})
                log.info("step %d: validation loss %.4f", done, val_loss)
            if s.save_every and done % s.save_every == 0 and done < s.steps:
                checkpoint(done)
        if result.interrupted:
            log.info("interrupted: saving a checkpoint at step %d", result.steps)
        saved = bool(checkpoints) and checkpoints[-1][0] == result.steps  # by --save-every, or resumed
        if (result.steps > start or result.interrupted) and not saved:
            stop.saving = True
            checkpoint(result.steps)
        result.interrupted = result.interrupted or stop.requested  # pressed during the closing save
    finally:
        stop.__exit__(None, None, None)
        redirect.__exit__(None, None, None)
        bar.close()
    if result.steps == start and metrics is not None:  # nothing ran (a finished run resumed): report the record
        recorded = metrics.last_loss()
        result.final_loss = recorded if recorded is not None else result.final_loss
        val_loss = metrics.val_loss_at(start)
        validated_at = start if val_loss is not None else None
    if not result.interrupted and evaluate is not None and validated_at != result.steps:
        val_loss = evaluate()
        if metrics is not None:
            metrics.write({"step": result.steps, "val_loss": val_loss})
    result.val_loss = val_loss
    result.peak_memory_mb = mx.get_peak_memory() / 2**20
    # steady-state speed; a run too short to have steps without compilation reports all its steps
    n, secs, toks = (timed_steps, timed_s, timed_tokens) if timed_steps else (all_steps, all_s, all_tokens)
    if n and secs > 0:
        result.step_time_s, result.steps_per_s, result.tokens_per_s = secs / n, n / secs, toks / secs
    return result
