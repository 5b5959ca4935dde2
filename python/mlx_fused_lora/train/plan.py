"""How long a run is, and the number checks every task's settings share.

`plan_steps` is the one rule for a run's length: ``max_steps`` when it is given (the data
is cycled as often as needed), else ``epochs`` passes over the training samples; `RunPlan`
says which, in the run's first line. `finite_float32` / `check_finite` refuse a setting the
float32 step cannot hold, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RunPlan", "plan_steps", "finite_float32", "check_finite"]


FLOAT32_MAX = 3.4028234663852886e38  # the step computes in float32: 1e39 is finite as a double, inf there


def finite_float32(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= FLOAT32_MAX


def check_finite(name: str, value: float, low: float | None = None, low_open: bool = False, high: float | None = None):
    """A clear error naming the setting when ``value`` is not a finite float32 number in range."""
    ok = finite_float32(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high
    if not ok:
        bound = ""
        if low is not None:
            bound = f" {'>' if low_open else '>='} {low}"
        if high is not None:
            bound += f"{' and' if bound else ''} < {high}"
        raise ValueError(f"{name} must be a finite (float32) number{bound}, got {value!r}")


@dataclass
class RunPlan:
    """How many optimizer steps the run has, and why (the first line a run prints)."""

    total_steps: int
    steps_per_epoch: float  # optimizer steps per pass over the training samples
    micro_per_epoch: int  # micro-batches per pass
    by: str  # "max_steps" | "epochs"
    steps_flag: str = "--max-steps"  # the command's flag for a run's length in steps (lm_lora: --iters)

    def describe(self, start: int = 0) -> str:
        """The run's first line; ``start``: the step a resumed run continues from."""
        epochs = self.total_steps / self.steps_per_epoch
        if self.by == "max_steps":
            why = (
                f"{self.steps_flag}; {epochs:.3g} epochs of {self.steps_per_epoch:.3g} steps, the data cycled as needed"
            )
        else:
            why = f"{epochs:.3g} epochs (--epochs) of {self.steps_per_epoch:.3g} steps"
        if start >= self.total_steps:
            return (
                f"nothing left to train: the checkpoint is at step {start} of the run's {self.total_steps} ({why}); "
                "writing the outputs it lacks"
            )
        if start > 0:
            return f"training steps {start + 1} to {self.total_steps}, resuming at step {start} ({why})"
        return f"training {self.total_steps} steps ({why})"


def plan_steps(
    num_train_samples: int,
    batch_size: int,
    world_size: int,
    accumulation: int,
    epochs: int,
    max_steps: int | None,
    steps_flag: str = "--max-steps",
) -> RunPlan:
    """``max_steps`` if given, else ``epochs`` passes (rounded up to whole optimizer steps);
    ``steps_flag`` names the command's flag for ``max_steps`` in the run's first line."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_train_samples < 1:
        raise ValueError("no training samples")
    if batch_size * world_size > num_train_samples:  # mlx-lm refuses a batch larger than the data too
        per_step = f" on {world_size} processes ({batch_size * world_size} samples per batch)" if world_size > 1 else ""
        fits = num_train_samples // world_size
        fix = f"use --batch-size {fits} or less, or more data" if fits else "use fewer processes or more data"
        raise ValueError(
            f"--batch-size {batch_size}{per_step} is more than the {num_train_samples} training samples: {fix}"
        )
    micro_per_epoch = -(-num_train_samples // (batch_size * world_size))
    per_epoch = micro_per_epoch / accumulation
    if max_steps is not None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        return RunPlan(int(max_steps), per_epoch, micro_per_epoch, "max_steps", steps_flag)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1 when max_steps is not given, got {epochs}")
    return RunPlan(-(-epochs * micro_per_epoch // accumulation), per_epoch, micro_per_epoch, "epochs", steps_flag)
