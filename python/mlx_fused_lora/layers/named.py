"""Several named adapters on one LoRA layer: where they are kept, which run, the stacked forward and fold.

A fused LoRA layer (`FusedLoRALinear`, `FusedDoRALinear`) keeps its first adapter as mlx-lm's
layer does: ``lora_a (in, r)``, ``lora_b (r, out)`` (DoRA: ``m``), ``scale``, ``dropout``, so a
one-adapter model has exactly mlx-lm's parameters and files. That adapter's name is
``layer.adapter_name`` ("default" unless set). Further adapters live beside it in
``layer.adapters`` (``{name: AdapterWeights}``, parameters ``...q_proj.adapters.voice.lora_a``),
each with its own rank, scale, dropout and DoRA magnitude; a layer an adapter does not
target simply lacks it. Each adapter's tensors stay separate (own freeze flags, own
gradients); stacking a layer's adapters for a mixed batch is a pad and a stack.

``layer.routing`` says what the layer runs: None is the plain path (its first adapter
alone, weight 1, trained); a `Routing` names the active adapters with their weights, or
none, or ``disabled``. It is a Python value read when the forward is traced, so
switching it inside a function under ``mx.compile`` traces both graphs.

- No adapter running: ``layer.linear(x)``, the base product alone (no rank-r work, no mask,
  no op call): what a DPO reference forward costs.
- One: the fused op with that adapter (``scale = weight * scale``); a DoRA adapter runs
  DoRA's forward.
- Several (LoRA only): ONE fused op over the concatenated rank, ``[A_1 ... A_n]`` and
  ``[w_1 s_1 B_1; ...; w_n s_n B_n]`` (float32, ``scale = 1``): the sum of their deltas, the
  gradients flowing back through the concatenation to each adapter. One call means one
  dropout mask and one rate: that of the adapters being trained (which must agree), else
  the largest active rate; frozen adapters in the stack share it while training.
  DoRA adapters are not stacked: each rescales the whole output by its own
  ``m / ||W + dW||``, which no shared product can do.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..ops.dora_norms import base_row_sq_norms
from .base import base_dims, init_lora_weights, start_adapter
from .fold import fold_lora
from .fused_dora_linear import FusedDoRALinear, adapted_norms, dora_product, quantization_args
from .fused_lora_linear import FusedLoRALinear, draw_dropout_key, lora_product

__all__ = [
    "DEFAULT_ADAPTER",
    "AdapterWeights",
    "new_adapter",
    "base_sq_norms",
    "Routing",
    "resident_name",
    "holders",
    "adapter_keys",
    "route",
    "one_rate",
    "layer_with",
    "decompose",
    "stacked_lora",
]

DEFAULT_ADAPTER = "default"


class AdapterWeights(nn.Module):
    """One named adapter of a layer: ``lora_a (in, r)``, ``lora_b (r, out)``, DoRA's ``m (out,)``
    with the frozen base's squared row norms (state, not a parameter); ``scale``, ``dropout``;
    ``lora_init``: the `LoRAInit` it started from, when not mlx-lm's default."""

    lora_init = None

    def __init__(self, lora_a, lora_b, scale: float, dropout: float = 0.0, m=None, base_sq_norms=None):
        super().__init__()
        self.lora_a, self.lora_b = lora_a, lora_b
        self.scale, self.dropout = float(scale), float(dropout)
        if m is not None:
            self.m = m
            self._base_sq_norms = base_sq_norms


def base_sq_norms(base: nn.Module) -> mx.array:
    """The squared row norms of a frozen base's weight (DoRA's fixed term), float32."""
    return base_row_sq_norms(base.weight, **quantization_args(base))


def new_adapter(
    base: nn.Module, rank: int, width: int, scale: float, dropout: float, dora: bool, init_lora=True
) -> AdapterWeights:
    """A new adapter for ``base``, started by PEFT's ``init_lora_weights`` value ``init_lora``
    (`base.start_adapter`: mlx-lm's by default, ``lora_b = 0``) and allocated ``width >= rank``
    wide: the columns of ``lora_a`` and rows of ``lora_b`` past ``rank`` are zeros, which add
    nothing and stay zero in training. An init that splits W leaves the new base in
    ``lora_init.base``, for the caller to put in place. DoRA's ``m`` starts as the adapted
    rows' norms (the base's, for mlx-lm's init)."""
    input_dims, output_dims = base_dims(base)
    weights = AdapterWeights(*init_lora_weights(input_dims, output_dims, rank), scale, dropout)
    started = start_adapter(weights, base, rank, scale, init_lora)
    if started is not None and started.changes_base:
        base = started.base
    if width > rank:
        weights.lora_a = mx.concatenate([weights.lora_a, mx.zeros((input_dims, width - rank))], axis=1)
        weights.lora_b = mx.concatenate([weights.lora_b, mx.zeros((width - rank, output_dims))], axis=0)
    if dora:
        norms = weights._base_sq_norms = base_sq_norms(base)
        started_at_w = started is None  # lora_b = 0: the adapted rows are the base's
        weights.m = (
            mx.sqrt(norms) if started_at_w else adapted_norms(base, weights.lora_a, weights.lora_b, norms, scale)
        )
    return weights


def resident_name(layer) -> str:
    """The name of the adapter a LoRA layer keeps as its own ``lora_a``/``lora_b``."""
    return getattr(layer, "adapter_name", DEFAULT_ADAPTER)


def holders(layer) -> dict:
    """``{name: holder}`` of every adapter on ``layer``, its own first; a holder has ``lora_a``,
    ``lora_b``, ``scale``, ``dropout`` (and ``m``): the layer itself or an `AdapterWeights`."""
    return {resident_name(layer): layer, **(layer["adapters"] if "adapters" in layer else {})}


def adapter_keys(holder) -> list[str]:
    """The trainable tensors of one adapter holder."""
    return [k for k in ("lora_a", "lora_b", "m") if k in holder]


@dataclass(frozen=True)
class Routing:
    """What one layer runs: ``active`` ((name, weight), model order) of the adapters it holds,
    ``disabled``, ``dropout`` (p of the one op call in training mode), ``trainable`` names."""

    active: tuple = ()
    disabled: bool = False
    dropout: float = 0.0
    trainable: frozenset = frozenset()

    def running(self) -> tuple:
        return () if self.disabled else self.active

    def forward(self, layer, x):
        active = self.running()
        if not active:
            return layer.linear(x)  # the base product alone: no rank-r work, no mask, no op
        held = holders(layer)
        p = self.dropout if layer.training else 0.0
        key = draw_dropout_key() if p > 0 else None
        if len(active) == 1:
            name, weight = active[0]
            h = held[name]
            if "m" in h:
                return dora_product(
                    layer.linear, x, h.lora_a, h.lora_b, h.m, h._base_sq_norms, scale=h.scale, dropout=p, key=key
                )
            return lora_product(layer.linear, x, h.lora_a, h.lora_b, scale=weight * h.scale, dropout=p, key=key)
        lora_a, lora_b = stacked_lora(held, active)
        return lora_product(layer.linear, x, lora_a, lora_b, scale=1.0, dropout=p, key=key)

    def fold(self, layer, *, dequantize: bool = False, name: str = "fuse", stacklevel: int = 3) -> nn.Module:
        """The base with the running adapters folded in: one `fold_lora` (the one fold)."""
        active = self.running()
        if not active:
            return layer.linear
        held = holders(layer)
        fold = dict(dequantize=dequantize, name=name, stacklevel=stacklevel + 1)
        if len(active) == 1:
            name, weight = active[0]
            h = held[name]
            return fold_lora(layer.linear, h.lora_a, h.lora_b, weight * h.scale, magnitude=h.get("m"), **fold)
        return fold_lora(layer.linear, *stacked_lora(held, active), 1.0, **fold)


def stacked_lora(held: dict, active: Sequence) -> tuple[mx.array, mx.array]:
    """``[A_1 ... A_n]`` (in, sum r) and ``[w_1 s_1 B_1; ...]`` (sum r, out), float32."""
    lora_a = mx.concatenate([held[n].lora_a.astype(mx.float32) for n, _ in active], axis=1)
    lora_b = mx.concatenate([held[n].lora_b.astype(mx.float32) * (w * held[n].scale) for n, w in active], axis=0)
    return lora_a, lora_b


def route(layer, active: Sequence, trainable: Collection[str], disabled: bool, where: str) -> Routing | None:
    """The `Routing` of ``layer`` for the model's ``active`` ((name, weight)), ``trainable``
    and ``disabled`` (None for the plain path); raises naming ``where`` what cannot run."""
    held = holders(layer)
    mine = tuple((n, float(w)) for n, w in active if n in held)
    trained = frozenset(n for n in trainable if n in held)
    first = resident_name(layer)
    if not disabled and mine == ((first, 1.0),) and trained == {first}:
        return None
    dora = [n for n, _ in mine if "m" in held[n]]
    if dora and len(mine) > 1:
        raise ValueError(
            f"{where}: DoRA adapter {dora[0]!r} cannot run stacked with {[n for n, _ in mine if n != dora[0]]}: "
            "DoRA rescales the layer's whole output by its own m / ||W + dW||, which one shared product "
            "cannot do; activate it alone"
        )
    if dora and mine[0][1] != 1.0:
        raise ValueError(
            f"{where}: DoRA adapter {dora[0]!r} takes weight 1 (a weight scales a LoRA delta), got {mine[0][1]}"
        )
    return Routing(mine, bool(disabled), one_rate(held, [n for n, _ in mine], trained, where), trained)


def one_rate(held: dict, names: Sequence[str], trained: Collection[str], where: str) -> float:
    """The dropout rate of one op call over adapters ``names`` of a layer: that of the ones
    being trained (which must agree, else a ValueError naming ``where``), else the largest."""
    rates = {held[n].dropout for n in names if n in trained}
    if len(rates) > 1:
        raise ValueError(
            f"{where}: the adapters being trained have different dropout rates "
            f"{ {n: held[n].dropout for n in names if n in trained} }; a stacked layer runs one op with one "
            "mask: train them one at a time or give them one rate"
        )
    return max(rates or {held[n].dropout for n in names}, default=0.0)


def layer_with(base: nn.Module, adapters: Sequence[tuple[str, AdapterWeights]]) -> nn.Module:
    """A fused LoRA layer around ``base`` holding ``adapters`` ((name, weights), at least one):
    the first as its own parameters (`FusedDoRALinear` if it is DoRA), the rest beside it."""
    (name, first), rest = adapters[0], adapters[1:]
    cls = FusedDoRALinear if "m" in first else FusedLoRALinear
    layer = cls.from_base(base, r=first.lora_a.shape[1], dropout=first.dropout, scale=first.scale)
    layer.lora_a, layer.lora_b, layer.lora_init = first.lora_a, first.lora_b, first.lora_init
    if "m" in first:
        layer.m = first.m
    if name != DEFAULT_ADAPTER:
        layer.adapter_name = name
    if rest:
        layer.adapters = dict(rest)
    return layer


def decompose(layer) -> list[tuple[str, AdapterWeights]]:
    """The adapters of a fused LoRA layer as (name, `AdapterWeights`), its own first."""
    out = []
    for name, h in holders(layer).items():
        if h is layer:
            h = AdapterWeights(layer.lora_a, layer.lora_b, layer.scale, layer.dropout, layer.get("m"))
            h.lora_init = layer.lora_init
            if "m" in layer:
                h._base_sq_norms = layer._base_sq_norms
        out.append((name, h))
    return out
