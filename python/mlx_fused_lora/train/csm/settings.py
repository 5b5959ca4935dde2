"""What a CSM fine-tuning run is: its settings, checked on entry and recorded in every checkpoint.

`resume.check_resume` compares them with a resumed run's; `MUST_MATCH` names those that fix
what the adapters are (a change is refused), the rest only steer the optimization.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...layers.growth import rank_schedule
from ...layers.init import check_init, init_changes_base
from ...layers.patterns import check_patterns
from ..plan import check_finite

__all__ = ["TrainSettings", "MUST_MATCH"]

# settings a resumed run must share with its checkpoint, and the flag that sets each
MUST_MATCH = {
    "lora_r": "--lora-r",
    "lora_alpha": "--lora-alpha",
    "target_modules": "--target-modules",
    "target_layers": "--target-layers",
    "lora_bias": "--lora-bias",
    "init_lora_weights": "--init-lora-weights",
    "rank_pattern": "--rank-pattern",
    "alpha_pattern": "--alpha-pattern",
    "rank_schedule": "--rank-schedule",
    "adapter_per_speaker": "--adapter-per-speaker",
}


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
    adapter_per_speaker: bool = False  # one adapter per speaker of the data (`speakers`), trained in one run

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
        check_finite("learning_rate", self.learning_rate, 0.0, low_open=True)
        check_finite("lora_alpha", self.lora_alpha, 0.0, low_open=True)
        check_finite("lora_dropout", self.lora_dropout, 0.0, high=1.0)
        check_finite("weight_decay", self.weight_decay, 0.0)
        check_finite("max_grad_norm", self.max_grad_norm, 0.0)
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
        if self.adapter_per_speaker:
            others = {
                "--adapter-name": self.adapter_name != "default",
                "--resume-adapter-file": self.resume_adapter_file,
                "--frozen-adapters": self.frozen_adapters,
                "--rank-schedule": self.rank_schedule,
                "--lora-layer plain": self.lora_layer != "fused",
            }
            given = [flag for flag, value in others.items() if value]
            if given:
                raise ValueError(
                    f"--adapter-per-speaker trains adapters named speaker_<id>, one per speaker, on fused layers: "
                    f"it takes no {', '.join(given)}"
                )
        self.init_lora_weights = check_init(self.init_lora_weights, "--init-lora-weights")
        if self.adapter_per_speaker and init_changes_base(self.init_lora_weights):
            raise ValueError(
                f"--init-lora-weights {self.init_lora_weights} replaces the base weights, which every speaker's "
                "adapter runs on: not with --adapter-per-speaker"
            )
        check_patterns(self.rank_pattern, self.alpha_pattern, "--rank-pattern / --alpha-pattern")
        self.rank_pattern, self.alpha_pattern = (
            dict(self.rank_pattern or {}) or None,
            dict(self.alpha_pattern or {}) or None,
        )
        if self.rank_schedule is not None:
            spec, rank = self.rank_schedule, self.lora_r
            self.rank_schedule = str(rank_schedule(spec, rank, self.init_lora_weights, self.rank_pattern))
