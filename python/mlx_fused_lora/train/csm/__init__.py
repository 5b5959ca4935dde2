"""The CSM fine-tuning task on the generic loop: `CSMLoRATrainer`, its data, loss, outputs and commands.

- `task.py`: `CSMLoRATrainer` (``prepare_data``, ``train``, ``save_lora_weights``,
  ``load_lora_weights``, ``generate_sample``); `settings.py`: `TrainSettings`;
  `model_setup.py`: the model with its LoRA layers; `outputs.py`: adapter and merged-model
  files; `sampling.py`: a sample from the fine-tuned model.
- `data.py`: files -> segments -> ``[T, 33]`` frames; `audio.py`: WAV and Mimi codes;
  `tokenizer.py`: the text column's tokenizer; `loss.py`: the CSM loss.
- Commands: ``mlx-fused-lora finetune`` (`cli.py`), ``demo`` (`demo.py`), ``generate``
  (`generate.py`); `example.py` and `synthetic.py`: the tiny model and data they run on.
"""

from .data import DataReport, DataSpec, build_dataset
from .loss import csm_loss
from .settings import TrainSettings
from .task import DEFAULT_SAMPLE_PROMPT, CSMLoRATrainer

__all__ = [
    "CSMLoRATrainer",
    "DEFAULT_SAMPLE_PROMPT",
    "TrainSettings",
    "DataReport",
    "DataSpec",
    "build_dataset",
    "csm_loss",
]
