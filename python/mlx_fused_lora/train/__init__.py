"""LoRA fine-tuning of CSM: data path, loss, trainer, checkpoints, CLI and demo.

- `CSMLoRATrainer` (`trainer.py`): ``prepare_data``, ``train``, ``save_lora_weights``,
  ``load_lora_weights``, ``generate_sample``.
- `data.py`: files -> segments -> ``[T, 33]`` frames; `loss.py`: the CSM loss;
  `checkpoint.py`: atomic, verified checkpoints; `distributed.py`: data parallel.
- ``mlx-fused-lora finetune`` (`cli.py`) and ``mlx-fused-lora demo`` (`demo.py`).
"""

from .checkpoint import TrainingCheckpointError, load_checkpoint, save_checkpoint
from .data import DataReport, DataSpec, build_dataset
from .loss import csm_loss
from .trainer import CSMLoRATrainer, NonFiniteLossError, TrainResult, TrainSettings

__all__ = [
    "CSMLoRATrainer",
    "TrainSettings",
    "TrainResult",
    "NonFiniteLossError",
    "TrainingCheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "DataReport",
    "DataSpec",
    "build_dataset",
    "csm_loss",
]
