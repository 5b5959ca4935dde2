"""What a preference run is: its settings, checked on entry and recorded in every checkpoint.

Defaults are mlx-lm's where mlx-lm has the setting (``mlx_lm.lora``: rank 8, scale 20,
dropout 0, the last 16 blocks, Adam at 1e-5, a constant rate) and mlx-lm-lora's for what
only it has (``beta`` 0.1, the ``sigmoid`` loss). `MUST_MATCH` names the settings a resumed
run must share with its checkpoint (they fix what the adapter is); the others only steer
the optimization, and a change is stated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..plan import check_finite
from .losses import DPO_LOSS_TYPES

__all__ = ["PreferenceSettings", "MUST_MATCH", "TRAIN_MODES", "OPTIMIZERS", "LR_SCHEDULES"]

TRAIN_MODES = ("dpo", "orpo")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "linear")
MUST_MATCH = {
    "fine_tune_type": "--fine-tune-type",
    "num_layers": "--num-layers",
    "lora_rank": "lora_parameters.rank",
    "lora_scale": "lora_parameters.scale",
    "lora_keys": "lora_parameters.keys",
}


@dataclass
class PreferenceSettings:
    """Everything that shapes a preference run's optimization (recorded in every checkpoint)."""

    train_mode: str = "dpo"  # dpo | orpo
    loss_type: str = "sigmoid"  # DPO's: sigmoid | ipo | hinge
    beta: float = 0.1  # DPO's beta, ORPO's lambda
    label_smoothing: float = 0.0  # cDPO's epsilon (sigmoid only)
    fine_tune_type: str = "lora"  # lora | dora
    num_layers: int = 16  # the last n blocks adapted; -1: all
    lora_rank: int = 8
    lora_scale: float = 20.0
    lora_dropout: float = 0.0
    lora_keys: Sequence[str] | None = None  # paths within a block; None: every linear (mlx-lm's)
    learning_rate: float = 1e-5
    optimizer: str = "adam"
    lr_schedule: str = "constant"  # then decay to 10 % of the rate at the end (loop.make_schedule)
    warmup_steps: int = 0
    max_grad_norm: float = 0.0  # 0: no clipping (mlx-lm clips nothing)
    grad_accumulation_steps: int = 1
    seed: int = 0
    max_seq_len: int = 2048
    reference_model_path: str | None = None  # None: the model with its adapters off
    precompute_reference: bool = False
    grad_checkpoint: bool = False
    resume_adapter_file: str | None = None

    def __post_init__(self):
        for name, value, allowed in (
            ("train_mode", self.train_mode, TRAIN_MODES),
            ("loss_type", self.loss_type, DPO_LOSS_TYPES),
            ("fine_tune_type", self.fine_tune_type, ("lora", "dora")),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("lr_schedule", self.lr_schedule, LR_SCHEDULES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        for name in ("lora_rank", "grad_accumulation_steps", "max_seq_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check_finite("beta", self.beta, 0.0, low_open=True)
        check_finite("label_smoothing", self.label_smoothing, 0.0, high=0.5)
        check_finite("learning_rate", self.learning_rate, 0.0, low_open=True)
        check_finite("lora_scale", self.lora_scale, 0.0, low_open=True)
        check_finite("lora_dropout", self.lora_dropout, 0.0, high=1.0)
        check_finite("max_grad_norm", self.max_grad_norm, 0.0)
        if self.label_smoothing and (self.train_mode != "dpo" or self.loss_type != "sigmoid"):
            raise ValueError("label_smoothing (cDPO) applies to DPO's sigmoid loss only")
        if self.train_mode == "orpo" and (self.reference_model_path or self.precompute_reference):
            raise ValueError("ORPO has no reference model: --reference-model-path and --precompute-reference are DPO's")
        if self.lora_keys is not None:
            self.lora_keys = sorted(str(k) for k in self.lora_keys)

    @property
    def lora_parameters(self) -> dict:
        """mlx-lm's ``lora_parameters`` (what `layers.linear_to_lora_layers` takes)."""
        params = {"rank": self.lora_rank, "scale": self.lora_scale, "dropout": self.lora_dropout}
        return params if self.lora_keys is None else {**params, "keys": list(self.lora_keys)}
