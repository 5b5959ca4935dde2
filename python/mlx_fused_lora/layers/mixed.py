"""Mixed-adapter batches through a model's layers: each row (or sequence) on its own named adapter, one op call per layer.

A `MixedRouting` on a fused LoRA layer (set by `adapters.mixed_batch` for the length of a
``with`` block, in place of the layer's `named.Routing`) runs the layer's named adapters
as ONE mixed op call (`ops.fused_lora_linear` / `fused_qlora_linear` with ``adapter_ids``):

- ``ids`` index the MODEL's adapters (``names``, the order of `list_adapters`), per row of
  the layer's input (``x.shape[:-1]``) or per sequence (``x.shape[:-2]``); -1 is the base
  alone. The layer stacks the adapters it holds in that order, ``lora_a (n, K, r)``,
  ``lora_b (n, r, N)``, smaller ranks padded with zeros (exact: the padding adds nothing
  and gets zero gradients), and maps the model's ids to its own slots; a row whose adapter
  this layer does not hold runs the base alone here (-1). An id out of range stays out of
  range, so the op reports it at evaluation (naming the layer's own slot count when the
  layer holds fewer adapters than the model).
- Each adapter runs alone on its rows, at its own ``scale`` (weights of `set_adapter` are
  for stacking, not for a mixed batch); gradients flow to each adapter from its rows only.
- Dropout: one op call, one mask, one rate: that of the adapters being trained (which must
  agree), else the largest (`named.one_rate`).
- DoRA adapters are handled: a DoRA row is rescaled by its adapter's ``m / ||W + dW_i||``
  (the op runs without the bias, a per-adapter factor table ``(n + 1, N)`` with ones for
  LoRA adapters and -1 rows is gathered per row or per sequence, then the bias is added):
  one gather and multiply over the output, and the norms of every DoRA adapter held.
- Cost: stacking copies every adapter the layer holds (``n * r * (K + N)`` values) per
  call. In eval mode `adapters.mixed_batch` stacks once when the block starts and the
  forward reuses it while the adapters' arrays are the same objects (a hot swap, a
  ``load_weights`` or a gradient transform gives new ones: restacked, not stored);
  in training mode every call stacks, so gradients reach each adapter.
- `fold` refuses: a mixed batch has no single weight to fold into.

A model that reshapes its batch inside (CSM's decoder runs one sequence per frame) maps
the ids for the part that does with `mapped_ids`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn

from .fused_dora_linear import adapted_norms
from .fused_lora_linear import draw_dropout_key, lora_product
from .named import holders, one_rate

__all__ = ["MixedRouting", "Stacked", "stack_adapters", "mapped_ids", "mixed_routings"]


@dataclass(frozen=True, eq=False)
class Stacked:
    """A layer's adapters stacked for the mixed op, and the arrays they were made from."""

    sources: tuple
    lora_a: mx.array  # (n, K, r)
    lora_b: mx.array  # (n, r, N)
    scales: tuple  # n floats
    factors: mx.array | None  # (n + 1, N) float32: DoRA's m / ||W + dW_i|| (ones for LoRA and -1), or None

    def fresh(self, layer, names) -> bool:
        """Whether the layer's adapters (and base) are still the very arrays stacked."""
        now = _sources(layer, names)
        return len(now) == len(self.sources) and all(a is b for a, b in zip(now, self.sources, strict=True))


def _sources(layer, names) -> tuple:
    held = holders(layer)
    return (layer.linear.weight, *(a for n in names for a in (held[n].lora_a, held[n].lora_b, held[n].get("m"))))


def _widened(a: mx.array, dtype, axis: int, rank: int) -> mx.array:
    """``a`` in ``dtype``, zero-padded along ``axis`` to ``rank``; no op where it already is
    (each is a node of every training step's graph, and of its backward)."""
    a = a if a.dtype == dtype else a.astype(dtype)
    if a.shape[axis] == rank:
        return a
    return mx.pad(a, [(0, rank - a.shape[axis]) if i == axis else (0, 0) for i in range(2)])


def stack_adapters(layer, names) -> Stacked:
    """The adapters ``names`` of ``layer`` (in that order) stacked, ranks padded to the largest."""
    held = [holders(layer)[n] for n in names]
    rank = max(h.lora_a.shape[1] for h in held)
    dtype = mx.result_type(*(h.lora_a for h in held), *(h.lora_b for h in held))
    lora_a = mx.stack([_widened(h.lora_a, dtype, 1, rank) for h in held])
    lora_b = mx.stack([_widened(h.lora_b, dtype, 0, rank) for h in held])
    factors = None
    if any("m" in h for h in held):
        ones = mx.ones((lora_b.shape[-1],), dtype=mx.float32)
        factors = mx.stack(
            [
                h.m.astype(mx.float32) / adapted_norms(layer.linear, h.lora_a, h.lora_b, h._base_sq_norms, h.scale)
                if "m" in h
                else ones
                for h in held
            ]
            + [ones]
        )
    return Stacked(_sources(layer, names), lora_a, lora_b, tuple(float(h.scale) for h in held), factors)


@dataclass(frozen=True, eq=False)
class MixedRouting:
    """A mixed batch on one layer: ``ids`` over the model's adapters ``names``; ``trainable``
    names; ``where`` the layer's path (for errors); ``stacked`` the eval-mode stack, if made."""

    ids: mx.array
    names: tuple
    trainable: frozenset = frozenset()
    where: str = "layer"
    stacked: Stacked | None = None

    def held(self, layer) -> list[str]:
        """The adapters of ``layer`` in the model's order."""
        mine = holders(layer)
        return [n for n in self.names if n in mine]

    def with_stack(self, layer) -> MixedRouting:
        """This routing with the layer's adapters stacked now (lazily: nothing is computed yet)."""
        return replace(self, stacked=stack_adapters(layer, self.held(layer)))

    def local_ids(self, held: list[str]) -> mx.array:
        """The model's ids as this layer's slots: -1 where it lacks the adapter; out of range kept out of range."""
        ids = self.ids.astype(mx.int32)
        if list(self.names) == held:
            return ids
        count = len(self.names)
        table = mx.array([held.index(n) if n in held else -1 for n in self.names], dtype=mx.int32)
        inside = (ids >= 0) & (ids < count)
        return mx.where(inside, table[mx.clip(ids, 0, count - 1)], mx.where(ids >= count, len(held), ids))

    def forward(self, layer, x):
        held = self.held(layer)
        shape = tuple(self.ids.shape)
        if shape != tuple(x.shape[:-1]) and (x.ndim < 2 or shape != tuple(x.shape[:-2])):
            raise ValueError(
                f"{self.where}: mixed_batch's adapter_ids have shape {shape}, which is neither this layer's rows "
                f"{tuple(x.shape[:-1])} nor its sequences {tuple(x.shape[:-2])}: a model that reshapes its batch "
                "maps the ids for that part (layers.mixed.mapped_ids)"
            )
        stacked = self.stacked
        if stacked is None or layer.training or not stacked.fresh(layer, held):
            stacked = stack_adapters(layer, held)
        ids = self.local_ids(held)
        p = one_rate(holders(layer), held, self.trainable, self.where) if layer.training else 0.0
        key = draw_dropout_key() if p > 0 else None
        args = dict(scale=list(stacked.scales), dropout=p, key=key, adapter_ids=ids)
        if stacked.factors is None:
            return lora_product(layer.linear, x, stacked.lora_a, stacked.lora_b, **args)
        out = lora_product(layer.linear, x, stacked.lora_a, stacked.lora_b, with_bias=False, **args)
        slot = mx.where((ids < 0) | (ids >= len(held)), len(held), ids)  # -1 (and a bad id) -> the ones row
        factor = stacked.factors[slot]
        if shape != tuple(x.shape[:-1]):
            factor = mx.expand_dims(factor, -2)  # per sequence: one factor row for all its rows
        out = factor.astype(x.dtype) * out
        return out + layer.linear.bias if "bias" in layer.linear else out

    def fold(self, layer, **_):
        raise ValueError(f"{self.where}: a mixed batch has no one weight to fold into: fuse outside mixed_batch")


def mixed_routings(model: nn.Module) -> list[tuple[nn.Module, MixedRouting]]:
    """(layer, routing) of every layer of ``model`` running a mixed batch now."""
    return [(m, m.routing) for _, m in model.named_modules() if isinstance(getattr(m, "routing", None), MixedRouting)]


@contextmanager
def mapped_ids(modules, mapping: Callable[[mx.array], mx.array]):
    """Within the block, the layers of ``modules`` (a module or several) running a mixed batch
    take ``mapping(ids)`` as their ids: for a part of a model that reshapes the batch (e.g.
    ``lambda ids: mx.repeat(ids, frames)`` where each sequence becomes ``frames`` rows).
    Nothing happens where no mixed batch runs."""
    modules = modules if isinstance(modules, (list, tuple)) else [modules]
    changed = [(layer, routing) for m in modules for layer, routing in mixed_routings(m)]
    for layer, routing in changed:
        layer.routing = replace(routing, ids=mapping(routing.ids))
    try:
        yield
    finally:
        for layer, routing in changed:
            layer.routing = routing
