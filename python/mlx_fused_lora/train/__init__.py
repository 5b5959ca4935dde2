"""Training on one generic loop: the loop, checkpoints, metrics, resume and run rules, data parallel; each task in its own room.

- `loop.py`: `train` for any MLX model (compiled step, accumulation, clipping,
  data-parallel averaging, checkpoint/validation/metrics hooks, tqdm progress, Ctrl-C);
  `session.py`: one run of a task on it (resume, checkpoints with the run's record,
  ``metrics.jsonl``); `plan.py`: how long a run is; `batching.py`: which samples make a
  batch and how long it is padded.
- `checkpoint.py`: atomic, verified checkpoints; `resume.py`: the output folder's rules
  and resume's checks; `metrics.py` + `plot.py`: ``metrics.jsonl`` and the loss curve;
  `distributed.py`: data parallel; `interrupt.py`: Ctrl-C in the loop; `write_errors.py`:
  a full disk named; `cli_args.py` + `command.py`: what every training command shares
  (flags, YAML config, one-line errors).
- The tasks: `csm/` (CSM fine-tuning: ``mlx-fused-lora finetune``, ``demo``,
  ``generate``) and `preference/` (DPO, IPO, hinge, ORPO on any mlx-lm model:
  ``python -m mlx_fused_lora.lm_lora --train-mode dpo``).
- ``mlx-fused-lora example`` (`example.py`): the CSM example (`csm/example.py`) or the LLM
  one (`lm_example.py`: a tiny Llama, SFT and preference data; `tiny_tokenizer.py`).
"""

from .checkpoint import TrainingCheckpointError, load_checkpoint, save_checkpoint
from .loop import LoopSettings, NonFiniteLossError, TrainResult, train

__all__ = [
    "LoopSettings",
    "train",
    "TrainResult",
    "NonFiniteLossError",
    "TrainingCheckpointError",
    "save_checkpoint",
    "load_checkpoint",
]
