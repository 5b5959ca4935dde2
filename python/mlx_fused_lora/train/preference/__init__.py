"""Preference training's own room: DPO (sigmoid / cDPO, IPO, hinge) and ORPO losses.

- `losses.py`: `dpo_loss`, `orpo_loss` on per-sequence log-probs, each formula with its
  source, returning TRL's metric names (`REWARD_METRICS`, `ORPO_METRICS`).

The generic training loop stays `train/loop.py`.
"""

from .losses import DPO_LOSS_TYPES, ORPO_METRICS, REWARD_METRICS, dpo_loss, orpo_loss

__all__ = ["DPO_LOSS_TYPES", "REWARD_METRICS", "ORPO_METRICS", "dpo_loss", "orpo_loss"]
