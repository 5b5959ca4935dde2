"""Mixed-adapter batches on a model: ``with mixed_batch(model, ids): model(x)`` runs each row on its own named adapter.

Decision (how the ids reach the layers): set on the model for the calls inside a ``with``
block, not passed through the model's forward. mlx-lm's models (and CSM) take no such
argument, and threading one through every block of every architecture would mean a fork
of each; a context manager works on any model as it is, and under ``mx.compile`` the ids
can be a traced input: enter the block inside the compiled function,
``mx.compile(lambda x, ids: step(x, ids))`` with ``with mixed_batch(model, ids):`` in the
step, and new ids reuse the compiled graph. The layers read the ids when the forward is
traced (`layers.mixed.MixedRouting`), as they read `set_adapter`'s choice.

- ``ids``: an integer mx.array indexing `list_adapters(model)` (the order adapters were
  added), per sequence (``(B,)`` for a ``(B, T)`` batch) or per token (``(B, T)``), -1 for
  the base model; or a list with one adapter name (or None: the base) per sequence
  (`adapter_ids`).
- Every adapter the model holds can be picked, each at its own scale, whatever
  `set_adapter` made active; gradients reach the adapters that are trainable
  (`set_adapter(model, names)` trains all of ``names``; ``trainable=`` names them for the
  block). Under `disable_adapters` every row runs the base model.
- Every LoRA layer must be a fused linear one (`FusedLoRALinear`, `FusedDoRALinear`): a
  layer that cannot route rows (mlx-lm's own layers, a mixture-of-experts layer) is
  refused, naming it. Don't add, delete or activate adapters inside the block: on exit each
  layer gets back the routing it had when the block began.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import mlx.core as mx
import mlx.nn as nn

from ..layers import FusedDoRALinear, FusedLoRALinear
from ..layers.mixed import MixedRouting
from ..layers.named import adapter_keys, holders
from ..layers.tree import lora_layers
from .manager import check_name, list_adapters, registry

__all__ = ["adapter_ids", "mixed_batch", "trained_adapters"]


def adapter_ids(model: nn.Module, names: Sequence) -> mx.array:
    """Ids (int32, one per entry) of adapter ``names`` in the model's order (`list_adapters`);
    None is -1, the base model; an int is taken as an id already."""
    known = list_adapters(model)
    out = []
    for name in names:
        if isinstance(name, int) and not isinstance(name, bool):
            out.append(name)
            continue
        if name is not None:
            check_name(model, name, exists=True)
        out.append(-1 if name is None else known.index(name))
    return mx.array(out, dtype=mx.int32)


def _as_ids(model, ids) -> mx.array:
    if isinstance(ids, mx.array):
        if not mx.issubdtype(ids.dtype, mx.integer):
            raise ValueError(f"mixed_batch: `adapter_ids` must be an integer array, got {ids.dtype}")
        return ids.astype(mx.int32)
    if isinstance(ids, (list, tuple)):
        return adapter_ids(model, ids)
    raise ValueError(
        f"mixed_batch: `adapter_ids` must be an integer mx.array or a list of adapter names, got {type(ids).__name__}"
    )


def _set_trainable(layers, trainable) -> None:
    """Unfreeze the adapters ``trainable`` on every layer, freeze the others (bases stay frozen)."""
    for _, layer in layers:
        for name, holder in holders(layer).items():
            if name in trainable:
                holder.unfreeze(keys=adapter_keys(holder), recurse=False)
            else:
                holder.freeze(keys=adapter_keys(holder), recurse=False)


def _check_names(model, names) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        check_name(model, name, exists=True)
    return names


@contextmanager
def trained_adapters(model: nn.Module, names):
    """Within the block the adapters ``names`` (any of the model's, active or not) are the
    trainable parameters and every other adapter is frozen; on exit the freeze flags are
    the model's adapters' again (`set_adapter`'s). For a run training several adapters by
    mixed batches: enter it before ``nn.value_and_grad`` (or a compiled step) reads the
    trainable parameters. DoRA adapters, which cannot be active together, train together
    this way."""
    names = _check_names(model, names)
    layers = lora_layers(model)
    _set_trainable(layers, frozenset(names))
    try:
        yield model
    finally:
        _set_trainable(layers, registry(model).trainable)


@contextmanager
def mixed_batch(model: nn.Module, ids, *, trainable=None):
    """Within the block, each row (or sequence) of the model's input runs on adapter ``ids``
    (see the module docstring); on exit the layers run as the model's adapters say again.

    ``trainable``: the adapters that train within the block (`trained_adapters`; the block
    must then begin before ``nn.value_and_grad`` reads the trainable parameters). None: the
    model's trainable adapters (`set_adapter`'s); their dropout rate is the op's."""
    ids = _as_ids(model, ids)
    reg = registry(model)
    trainable = None if trainable is None else _check_names(model, trainable)
    layers = lora_layers(model)
    for path, layer in layers:
        if not isinstance(layer, (FusedLoRALinear, FusedDoRALinear)):
            raise TypeError(
                f"mixed_batch: {path} is a {type(layer).__name__}; a mixed batch needs fused linear LoRA layers "
                "(FusedLoRALinear, FusedDoRALinear), which route each row to its adapter"
            )
    if reg.disabled:
        yield model
        return
    saved = [(layer, layer.routing) for _, layer in layers]
    names = tuple(reg.configs)
    trained = reg.trainable if trainable is None else frozenset(trainable)
    for path, layer in layers:
        routing = MixedRouting(ids, names, trained, path)
        layer.routing = routing if layer.training else routing.with_stack(layer)
    try:
        with trained_adapters(model, trainable) if trainable is not None else nullcontext():
            yield model
    finally:
        for layer, routing in saved:
            layer.routing = routing
