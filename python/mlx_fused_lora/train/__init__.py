"""LoRA fine-tuning of CSM: a generic training loop, the CSM task on it, checkpoints, CLI and demo.

- `loop.py`: `train` for any MLX model (compiled step, accumulation, clipping,
  data-parallel averaging, checkpoint/validation/metrics hooks, tqdm progress).
- `CSMLoRATrainer` (`csm_task.py`): ``prepare_data``, ``train``, ``save_lora_weights``,
  ``load_lora_weights``, ``generate_sample``; `settings.py`: its settings and step count;
  `resume.py`: the output folder's rules and resume's checks; `model_setup.py`: the model
  with its LoRA layers; `outputs.py`: adapter and merged-model files; `sampling.py`.
- `data.py`: files -> segments -> ``[T, 33]`` frames; `loss.py`: the CSM loss;
  `checkpoint.py`: atomic, verified checkpoints; `metrics.py` + `plot.py`: metrics.jsonl
  and the loss curve; `distributed.py`: data parallel.
- ``mlx-fused-lora finetune`` (`cli.py`, `cli_args.py`), ``mlx-fused-lora demo`` (`demo.py`) and
  ``mlx-fused-lora generate`` (`generate.py`: named adapters, one per voice, on one base).
"""

from .checkpoint import TrainingCheckpointError, load_checkpoint, save_checkpoint
from .csm_task import CSMLoRATrainer
from .data import DataReport, DataSpec, build_dataset
from .loop import LoopSettings, NonFiniteLossError, TrainResult, train
from .loss import csm_loss
from .settings import TrainSettings

__all__ = [
    "CSMLoRATrainer",
    "TrainSettings",
    "LoopSettings",
    "train",
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
