"""Which samples make a batch, and how long a padded batch is: the rules every task's batches share.

- `batch_order`: the sample indices of the run's ``i``-th batch, a pure function of
  ``(seed, i)`` (each epoch a fresh seeded permutation), which is what makes resume exact;
- `rank_share`: the rows of a global batch one process takes under ``mlx.launch``;
- `padded_length`: the longest sequence rounded up to a multiple, so a compiled step sees
  few distinct shapes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["batch_order", "rank_share", "padded_length"]


def batch_order(num_samples: int, batch_size: int, seed: int, batch_index: int) -> np.ndarray:
    """Sample indices of the ``batch_index``-th batch of the run (a pure function of it).

    Each epoch is a fresh seeded permutation; ``batch_index`` counts batches from the start
    of training, so a resumed run asks for exactly the batches the interrupted one would.
    """
    per_epoch = -(-num_samples // batch_size)
    epoch, j = divmod(batch_index, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    return order[j * batch_size : (j + 1) * batch_size]


def rank_share(global_batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rows ``rank, rank + world_size, ...`` of a global batch: this process's part of it
    (its first row when a last, partial batch has fewer rows than processes)."""
    mine = global_batch[rank::world_size]
    return mine if len(mine) else global_batch[:1]


def padded_length(longest: int, pad_multiple: int, max_len: int | None = None) -> int:
    """``longest`` rounded up to a multiple of ``pad_multiple``, capped at ``max_len`` (never
    below ``longest``: a cap shorter than the data pads nothing)."""
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be at least 1, got {pad_multiple}")
    length = -(-longest // pad_multiple) * pad_multiple
    return max(longest, min(length, max_len)) if max_len is not None else length
