"""Named adapters from files and from each other: hot swap in place, and the weighted merge into a new adapter.

`hotswap_adapter` replaces an adapter's weights without changing any array's shape or
dtype, any layer or any Python value a traced function read: a function compiled with
the model's state as its inputs (``mx.compile(f, inputs=model.state)``, as mlx-lm's
trainer compiles) keeps running without a new trace, and the base weights are not
touched. PEFT's rules: an adapter of a smaller rank is zero-padded to the width the
adapter was given (`AdapterConfig.max_rank`; zero columns of ``lora_a`` and rows of
``lora_b`` add exactly nothing), a module the new adapter does not target gets a zero
adapter, and what cannot be done in place (a module the adapter has no layer on, a
larger rank, other shapes, LoRA for DoRA) raises saying why. The layer's ``scale`` is a
constant of the compiled graph, so a new scale is folded into ``lora_b``
(``lora_b * new_scale / scale``: the product is unchanged up to one float32 rounding).

`add_weighted_adapter` builds a new adapter from existing ones by a merge method
(`adapters.merge`, one pure function over `AdapterSet`s) and adds it to the model.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..layers.named import holders
from ..layers.tree import lora_layers
from . import manager
from .merge import merge_adapters
from .model_io import adapter_set_of, hooks_for, placement_plan
from .registry import read_adapters

__all__ = ["hotswap_adapter", "add_weighted_adapter"]


def _pad(array: mx.array, width: int, axis: int, dtype) -> mx.array:
    missing = width - array.shape[axis]
    if missing:
        shape = list(array.shape)
        shape[axis] = missing
        array = mx.concatenate([array, mx.zeros(shape, array.dtype)], axis=axis)
    return array.astype(dtype)


def hotswap_adapter(model: nn.Module, path: str | Path, name: str) -> nn.Module:
    """Put the adapter at ``path`` in place of adapter ``name``'s weights; returns ``model``.

    Every module is checked before any is changed. The dropout rate (a training setting)
    stays the layer's.
    """
    manager.check_name(model, name, exists=True)
    adapters, _ = read_adapters(path)
    rename = hooks_for(model).rename
    if rename is not None:
        adapters = rename(adapters, model)
    held = {p: holders(layer)[name] for p, layer in lora_layers(model) if name in holders(layer)}
    outside = sorted(set(adapters.modules) - set(held))
    if outside:
        raise ValueError(
            f"{path}: module {outside[0]!r} has no layer of adapter {name!r}: a swap cannot add a layer (the model's "
            f"graph would change); load it with load_adapters(model, path, name={name!r}) instead"
        )
    new = {}
    for p, h in held.items():
        width, (in_dims, out_dims) = h.lora_a.shape[1], (h.lora_a.shape[0], h.lora_b.shape[1])
        m = adapters.modules.get(p)
        if m is None:  # not targeted by the new adapter: a zero adapter (DoRA: m = ||W||, the base)
            zero_m = None if "m" not in h else mx.sqrt(h._base_sq_norms).astype(h.m.dtype)
            new[p] = (mx.zeros_like(h.lora_a), mx.zeros_like(h.lora_b), zero_m)
            continue
        why = None
        if (m.magnitude is not None) != ("m" in h):
            why = "DoRA for LoRA" if m.magnitude is not None else "LoRA for DoRA"
        elif (m.lora_a.shape[0], m.lora_b.shape[1]) != (in_dims, out_dims):
            why = f"(in, out) = ({m.lora_a.shape[0]}, {m.lora_b.shape[1]}), the layer's is ({in_dims}, {out_dims})"
        elif m.r > width:
            why = f"rank {m.r} > {width}, the width adapter {name!r} was given (add it with max_rank >= {m.r})"
        elif h.scale == 0 and m.scale != 0:
            why = "the layer's scale is 0, so a new scale cannot be folded into lora_b"
        if why:
            raise ValueError(f"{path}: cannot swap {p} in place: {why}")
        ratio = 1.0 if m.scale == h.scale else m.scale / h.scale
        lora_b = m.lora_b if ratio == 1.0 else m.lora_b.astype(mx.float32) * ratio
        magnitude = None if m.magnitude is None else m.magnitude.astype(h.m.dtype)
        new[p] = (_pad(m.lora_a, width, 1, h.lora_a.dtype), _pad(lora_b, width, 0, h.lora_b.dtype), magnitude)
    mx.eval([v for arrays in new.values() for v in arrays if v is not None])
    for p, (lora_a, lora_b, magnitude) in new.items():
        held[p].lora_a, held[p].lora_b = lora_a, lora_b
        if magnitude is not None:
            held[p].m = magnitude
    return model


def add_weighted_adapter(
    model: nn.Module, adapters, weights, name: str, combination_type: str = "svd", **options
) -> nn.Module:
    """Add adapter ``name``: ``adapters`` (names on the model) merged with ``weights`` by
    ``combination_type`` (PEFT's: linear, cat, svd, ties, dare_linear, dare_ties,
    magnitude_prune; ``options`` as `adapters.merge.merge_adapters` takes them), each
    module of each adapter with its own scale. Returns ``model``."""
    manager.check_name(model, name, exists=False)
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    for n in names:
        manager.check_name(model, n, exists=True)
    merged = merge_adapters(
        [adapter_set_of(model, n) for n in names], list(weights), combination_type=combination_type, **options
    )
    return manager.put_adapter(model, name, placement_plan(model, merged), merged.dropout)
