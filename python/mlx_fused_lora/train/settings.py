"""What a CSM fine-tuning run is: its settings (checked on entry) and its step count.

`TrainSettings` is recorded in every checkpoint; `resume.py` compares it with the
settings of a resumed run. `plan_steps` is the one rule for how long a run is:
``max_steps`` when it is given (the data is cycled as often as needed), else ``epochs``
passes over the training samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..layers.growth import rank_schedule
from ..layers.init import check_init
from ..layers.patterns import check_patterns

__all__ = ["TrainSettings", "RunPlan", "plan_steps", "finite_float32"]


FLOAT32_MAX = 3.4028234663852886e38  # the step computes in float32: 1e39 is finite as a double, inf there


def finite_float32(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= FLOAT32_MAX


def _finite(name: str, value: float, low: float | None = None, low_open: bool = False, high: float | None = None):
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
class TrainSettings:
    """Everything that shapes the optimization (recorded in every checkpoint)."""

    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: Sequence[str] = ("q_proj", "v_proj")
    target_layers: Sequence[int] | None = None
    lora_bias: bool = False
    learning_rate: float = 1e-4
    semantic_weight: float = 100.0
    acoustic_weight: float = 1.0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    warmup_steps: int | None = None  # None: 5% of the run's steps
    lr_schedule: str = "cosine"
    grad_accumulation_steps: int = 1
    decoder_fraction: float = 1 / 16
    seed: int = 42
    max_seq_len: int = 2048
    grad_checkpoint: bool = False
    lora_layer: str = "fused"  # "fused" | "plain" (mlx-lm's LoRALinear: the baseline)
    adapter_name: str = "default"  # the trained adapter's name (`adapters.list_adapters`)
    resume_adapter_file: str | None = None  # its starting weights (mlx-lm's flag); the run's rank and targets
    frozen_adapters: Sequence[str] = ()  # "NAME=PATH": loaded frozen, running stacked under the trained one
    init_lora_weights: bool | str = True  # PEFT's: how the adapter starts (`layers.init`)
    rank_pattern: dict | None = None  # {module-path pattern: rank} (`layers.patterns`)
    alpha_pattern: dict | None = None  # {module-path pattern: alpha}
    rank_schedule: str | None = None  # "rank:step,...": the adapter's rank grows (`layers.growth`)

    def __post_init__(self):
        if self.lora_layer not in ("fused", "plain"):
            raise ValueError(f"lora_layer must be 'fused' or 'plain', got {self.lora_layer!r}")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_schedule must be cosine, linear or constant, got {self.lr_schedule!r}")
        for name in ("lora_r", "grad_accumulation_steps", "max_seq_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _finite("learning_rate", self.learning_rate, 0.0, low_open=True)
        _finite("lora_alpha", self.lora_alpha, 0.0, low_open=True)
        _finite("lora_dropout", self.lora_dropout, 0.0, high=1.0)
        _finite("weight_decay", self.weight_decay, 0.0)
        _finite("max_grad_norm", self.max_grad_norm, 0.0)
        # the loss weights may be anything finite; NaN is left to the loss check, which
        # names the step (a NaN weight is how the tests provoke a non-finite loss)
        if not 0.0 < self.decoder_fraction <= 1.0:
            raise ValueError(f"decoder_fraction must be in (0, 1], got {self.decoder_fraction}")
        self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise ValueError("target_modules must name at least one projection")
        if self.target_layers is not None:
            self.target_layers = [int(i) for i in self.target_layers]
        self.frozen_adapters = list(self.frozen_adapters or ())
        for spec in self.frozen_adapters:
            name, sep, path = str(spec).partition("=")
            if not sep or not name or not path:
                raise ValueError(f"frozen adapter {spec!r} must be NAME=PATH")
            if name == self.adapter_name:
                raise ValueError(f"frozen adapter {name!r} has the trained adapter's name (--adapter-name)")
        if (self.frozen_adapters or self.adapter_name != "default") and self.lora_layer != "fused":
            raise ValueError("named and frozen adapters need the fused layers (lora_layer 'fused')")
        self.init_lora_weights = check_init(self.init_lora_weights, "--init-lora-weights")
        check_patterns(self.rank_pattern, self.alpha_pattern, "--rank-pattern / --alpha-pattern")
        self.rank_pattern, self.alpha_pattern = (
            dict(self.rank_pattern or {}) or None,
            dict(self.alpha_pattern or {}) or None,
        )
        if self.rank_schedule is not None:
            spec, rank = self.rank_schedule, self.lora_r
            self.rank_schedule = str(rank_schedule(spec, rank, self.init_lora_weights, self.rank_pattern))


@dataclass
class RunPlan:
    """How many optimizer steps the run has, and why (the first line a run prints)."""

    total_steps: int
    steps_per_epoch: float  # optimizer steps per pass over the training samples
    micro_per_epoch: int  # micro-batches per pass
    by: str  # "max_steps" | "epochs"

    def describe(self, start: int = 0) -> str:
        """The run's first line; ``start``: the step a resumed run continues from."""
        epochs = self.total_steps / self.steps_per_epoch
        if self.by == "max_steps":
            why = f"--max-steps; {epochs:.3g} epochs of {self.steps_per_epoch:.3g} steps, the data cycled as needed"
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
    num_train_samples: int, batch_size: int, world_size: int, accumulation: int, epochs: int, max_steps: int | None
) -> RunPlan:
    """``max_steps`` if given, else ``epochs`` passes (rounded up to whole optimizer steps)."""
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
        return RunPlan(int(max_steps), per_epoch, micro_per_epoch, "max_steps")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1 when max_steps is not given, got {epochs}")
    return RunPlan(-(-epochs * micro_per_epoch // accumulation), per_epoch, micro_per_epoch, "epochs")
