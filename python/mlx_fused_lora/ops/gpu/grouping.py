"""The rows of a mixed-adapter batch grouped by adapter on the device, for the GPU kernels.

The kernels that take a row tile or a row split at a time (down_proj, low_rank_grad,
down_grad) want every tile and split to hold rows of one adapter: then each reads its
adapter's index once, where it starts, and keeps its shared A/B tiles and register tiles
as the single-adapter op does (``bodies.py``). Nothing is copied: the kernels read x,
dY and the per-row arrays through a row order, and write per-row outputs back in place.

- classes: adapter + 1 per row, 0 for the rows on the base alone (id -1, and ids outside
  [-1, n), which the op turns into NaN rows: never an adapter read out of bounds);
- ``order``: the rows class by class, each class in row order: an argsort of
  ``class * M + row`` (keys unique, so the order does not depend on the sort's stability:
  deterministic), M int32s;
- counts per class (an integer scatter-add: exact) and their offsets (a cumsum);
- per segment length L: the segments' offsets (a cumsum of ceil(count / L)) and the table
  of segments, (first position, end position, adapter) each, by the ``row_segments``
  kernel (a binary search per entry), ``geometry.table_size`` entries.

Passes: none over x, dY or the adapters; a few over M int32s (the classes, the keys, the
sort, the scatter) and over n-sized arrays: about a dozen small launches (fused by
``mx.compile`` on a GPU), counted as such by the cost model (``costs.GROUPING``).
"""

import functools

import mlx.core as mx

from . import geometry

I32 = mx.int32


def _order_and_counts(ids, count):
    m = ids.shape[0]
    classes = mx.where((ids >= 0) & (ids < count), ids + 1, 0)
    key_type = mx.uint32 if (count + 1) * m < 2**32 else mx.uint64
    key = classes.astype(key_type) * m + mx.arange(m, dtype=key_type)
    order = mx.argsort(key).astype(I32)
    counts = mx.zeros((count + 1,), dtype=I32).at[classes].add(1)
    return order, counts


@functools.cache
def _compiled(count):
    return mx.compile(lambda ids: _order_and_counts(ids, count))


def offsets(sizes):
    """[0, s_0, s_0 + s_1, ...]: where each class starts, then the total (int32)."""
    return mx.concatenate([mx.zeros((1,), dtype=I32), mx.cumsum(sizes).astype(I32)])


class Groups:
    """The rows of a batch grouped by adapter (see the module doc): ``order`` (M,) int32,
    ``counts`` (n + 1,) rows per class, and one table of segments per segment length."""

    def __init__(self, ids, count):
        self.rows, self.count = ids.shape[0], count
        # one fused graph on a GPU (retraced per M); MLX's CPU compile runs a C++
        # compiler, so the CPU stream (the tests) runs the ops one by one
        run = _compiled(count) if mx.default_device() != mx.cpu else (lambda i: _order_and_counts(i, count))
        self.order, self.counts = run(ids)
        self.row_off = offsets(self.counts)
        self._tables = {}

    def table(self, kernels, length):
        """(segments, bounds) for segments of at most `length` rows: segments
        (``geometry.table_size``, 3) int32, bounds (n + 2,) int32, class c's segments
        being [bounds[c], bounds[c + 1]) (class 0: the rows on the base alone, c > 0:
        adapter c - 1)."""
        if length not in self._tables:
            seg_off = offsets((self.counts + (length - 1)) // length)
            size = geometry.table_size(self.rows, self.count, length)
            self._tables[length] = kernels.row_segments(self.row_off, seg_off, length, size), seg_off
        return self._tables[length]
