"""Which adapter each row takes, as the GPU op's products need it.

One object for both ops: the single-adapter op is the case n = 1 without ids (every row
on adapter 0, with the op's scale), where every helper below is the identity or the
plain product, and ``groups`` is None (the kernels run with MIXED = 0). With ids:

- ``ids``: each row's adapter, clamped into [0, n) (every gather stays in bounds); the
  rows on the base alone (-1) and the rows with an id outside [-1, n) take no adapter:
  their rank-r term is 0, or NaN for an out-of-range id (``multipliers(forward=True)``),
  so a bad id shows in y instead of reading out of bounds (checking it would need the
  ids on the host, a synchronization), and their rows add nothing to any gradient;
- ``groups``: the rows grouped by adapter on the device (``grouping.Groups``), for the
  kernels; built when first asked for (a lazy graph: evaluated only if a kernel runs);
- the concatenated rank: n adapters as one of rank n*r, ``spread`` putting row i's r
  values in its adapter's block of n*r (zeros elsewhere) and ``own`` taking that block
  back, so that the products the op leaves to MLX's GEMMs are single GEMMs over all n
  adapters (B (n, r, N) is (n*r, N) as it is; A needs one copy, (K, n*r)).
"""

import mlx.core as mx

from .. import reference
from .grouping import Groups

F32 = mx.float32


class AdapterRows:
    """The adapter of each row of an (M, K) x: `routing` = (scales (n,) float32, ids (M,)
    int32) of the mixed op's slots (each adapter's multiplier `scale` * scales[i]), or
    empty for the single-adapter op (every row on adapter 0, multiplier `scale`)."""

    def __init__(self, scale, routing):
        self.mixed = bool(routing)
        self.scale = scale
        self._groups = None
        if not self.mixed:
            self.count = 1
            return
        scales, ids = routing
        self.count = scales.shape[0]
        self.adapter_multipliers = (scale * scales).astype(F32)
        self._raw_ids = ids
        self.ids, self.onehot, known = reference.routes(ids, self.count)
        self.bad = ~known & (ids != -1)
        self._multipliers = mx.where(known, self.adapter_multipliers[self.ids], 0.0)

    @property
    def groups(self):
        """The rows grouped by adapter (None for the single-adapter op)."""
        if self.mixed and self._groups is None:
            self._groups = Groups(self._raw_ids, self.count)
        return self._groups

    def kernel_scales(self):
        """The multipliers as the low_rank_grad kernel takes them."""
        return self.adapter_multipliers if self.mixed else self.scale

    def multipliers(self, forward):
        """Each row's multiplier (M,) float32: its adapter's, 0 on the base alone, NaN for
        an out-of-range id in the forward (0 in the backward)."""
        return mx.where(self.bad, mx.nan, self._multipliers) if forward else self._multipliers

    def spread(self, values, multiply, forward=False):
        """(M, r) -> (M, n*r): row i's values (times its multiplier where `multiply`) in
        its adapter's block, zeros in the others (a bad id's forward row: NaN in all)."""
        if not self.mixed:
            return values * self.scale if multiply else values
        if multiply:
            values = values * self.multipliers(forward)[:, None]
        return reference.spread(values, self.onehot | self.bad[:, None] if forward else self.onehot)

    def own(self, spread):
        """(M, n*r) -> (M, r): each row's block (adapter 0's for a row on no adapter)."""
        return reference.own(spread, self.ids, self.count) if self.mixed else spread

    a_concat = staticmethod(reference.a_concat)  # (n, K, r) -> (K, n*r); (K, r) as is
    b_concat = staticmethod(reference.b_concat)  # (n, r, N) -> (n*r, N); (r, N) as is

    @staticmethod
    def a_split(d_concat, like):
        """The inverse of a_concat for a gradient: (K, n*r) -> (n, K, r) like `like`."""
        if like.ndim == 2:
            return d_concat
        n, k, r = like.shape
        return d_concat.reshape(k, n, r).transpose(1, 0, 2)

    @staticmethod
    def gathered(rows, stacked, ids):
        """rows (M, r_in) @ stacked[ids[i]] per row by MLX's gather_mm (stacked in rows'
        dtype: gather_mm would promote to the wider of the two, copying x). MLX 0.32's CPU
        gather_mm takes float32 only: on the CPU (this path runs there only in the tests)
        half-precision operands go through float32 and the result is rounded back."""
        if rows.dtype != F32 and mx.default_device() == mx.cpu:
            return AdapterRows.gathered(rows.astype(F32), stacked.astype(F32), ids).astype(rows.dtype)
        m, out = rows.shape[0], stacked.shape[-1]
        return mx.gather_mm(rows[:, None, :], stacked, rhs_indices=ids).reshape(m, out)
