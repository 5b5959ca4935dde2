"""Preference training's own room: DPO (sigmoid / cDPO, IPO, hinge) and ORPO on the generic loop, for any mlx-lm model.

- `task.py`: `PreferenceTrainer` (the model with fused LoRA / DoRA / QLoRA layers, the
  pairs, the loss, training through `train.session`, the adapter as mlx-lm writes it);
  `settings.py`: `PreferenceSettings`; `cli.py`: ``python -m mlx_fused_lora.lm_lora
  --train-mode dpo|orpo``;
- `reference.py`: DPO's reference (the model with its adapters off, a reference adapter,
  or a second model); `precompute.py`: its log-probs computed once and kept
  (``--precompute-reference``);
- `losses.py`: `dpo_loss`, `orpo_loss` on per-sequence log-probs, each formula with its
  source, returning TRL's metric names (`REWARD_METRICS`, `ORPO_METRICS`);
- `logps.py`: `sequence_logps` (a ``[2B, T]`` batch's summed response log-probs, the
  shift by one done there only) and `split_pairs` (chosen rows, then rejected rows);
- `data.py`: ``prompt`` / ``chosen`` / ``rejected`` (``system``) JSONL rows, the chat
  template or plain concatenation, response masks, padded batches as a pure function of
  ``(seed, batch index)``.
"""

from .data import (
    EncodedPair,
    PreferenceDataError,
    PreferenceReport,
    PreferenceRow,
    collate_pairs,
    encode_pair,
    load_pairs,
    pair_batch,
    read_rows,
)
from .logps import sequence_logps, split_pairs
from .losses import DPO_LOSS_TYPES, ORPO_METRICS, REWARD_METRICS, dpo_loss, orpo_loss
from .settings import PreferenceSettings
from .task import PreferenceTrainer

__all__ = [
    "PreferenceTrainer",
    "PreferenceSettings",
    "DPO_LOSS_TYPES",
    "REWARD_METRICS",
    "ORPO_METRICS",
    "dpo_loss",
    "orpo_loss",
    "sequence_logps",
    "split_pairs",
    "PreferenceDataError",
    "PreferenceRow",
    "EncodedPair",
    "PreferenceReport",
    "read_rows",
    "encode_pair",
    "load_pairs",
    "collate_pairs",
    "pair_batch",
]
