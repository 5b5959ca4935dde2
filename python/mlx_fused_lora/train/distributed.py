"""Data-parallel training over ``mx.distributed`` (run under ``mlx.launch``).

Every rank holds the whole model and walks the same global batch order; rank ``r`` takes
rows ``r, r + world, ...`` of each global batch (``batch_size`` per rank). Gradients are
averaged across ranks inside the compiled step (``nn.average_gradients``), so every rank
applies the same update and the adapters stay identical. Only rank 0 writes files.

    mlx.launch -n 2 --python "$(which python)" "$(which mlx-fused-lora)" finetune ...
"""

from __future__ import annotations

import mlx.core as mx

__all__ = ["World", "init_world"]


class World:
    def __init__(self, group=None):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, x: mx.array) -> mx.array:
        """Mean of ``x`` over ranks (identity on one rank)."""
        if self.size == 1:
            return x
        return mx.distributed.all_sum(x, group=self.group, stream=mx.cpu) / self.size

    def barrier(self) -> None:
        if self.size > 1:
            mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=self.group, stream=mx.cpu))


def init_world() -> World:
    """The launched group when there is one (``mlx.launch``), else a single process."""
    if not mx.distributed.is_available():
        return World(None)
    group = mx.distributed.init()
    return World(group if group.size() > 1 else None)
