"""The trainer's public names where they were first published (the code lives in csm_task, loop, settings)."""

from .csm_task import DEFAULT_SAMPLE_PROMPT, CSMLoRATrainer
from .loop import NonFiniteLossError, TrainResult, make_schedule
from .model_setup import grad_checkpoint_blocks, use_plain_lora_layers
from .settings import TrainSettings

__all__ = [
    "TrainSettings",
    "TrainResult",
    "NonFiniteLossError",
    "CSMLoRATrainer",
    "DEFAULT_SAMPLE_PROMPT",
    "use_plain_lora_layers",
    "grad_checkpoint_blocks",
    "make_schedule",
]
