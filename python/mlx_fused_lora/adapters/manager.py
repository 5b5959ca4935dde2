"""Many named adapters on one model, in PEFT's words: add, list, activate with weights, delete, switch off.

Works on any MLX model (CSM, any mlx-lm model) whose adapted modules are fused LoRA
layers; the per-layer storage and the stacked forward are `layers.named`. The adapter
every existing entry point makes (`apply_lora`, `linear_to_lora_layers`, `load_adapters`)
is named "default", as in PEFT. The model keeps a small registry: the adapters' names in
the order they were added (an adapter's index in `list_adapters` is the id a mixed batch
will use), their configs, which run with which weights, which are trained, and whether
all are switched off. Every change is checked on every layer before any layer changes.

- `add_adapter(model, name, config)`: a new adapter on the modules its config targets,
  initialised as mlx-lm does (``lora_b = 0``: it changes nothing yet) or by the config's
  ``init_lora_weights`` (`layers.init`), each module at the rank and alpha of its config's
  patterns. As in PEFT it is not made active, unless it is the model's first. An init that
  replaces the base weight (PiSSA, OLoRA, LoftQ) is refused beside other adapters: they run
  on that base too.
- `set_adapter(model, names, weights=None, trainable=None)`: the adapters that run (one or
  several, stacked in one op call per layer), their weights, and which of them train
  (default: all active ones); every other adapter is frozen.
- `disable_adapters(model)`: a context manager under which every layer runs its base
  product alone. It is read when a forward is traced, so inside a function under
  ``mx.compile`` a policy and a reference forward can share one compiled graph.
- `delete_adapter`, `list_adapters`, `active_adapters`, `using_adapters` (a context
  manager for one call, e.g. generation), `fuse_adapters` (fold a weighted set into
  the base through the one fold).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..layers import FusedDoRALinear, FusedLoRALinear
from ..layers.init import init_changes_base, warn_base_changed
from ..layers.named import (
    DEFAULT_ADAPTER,
    AdapterWeights,
    adapter_keys,
    base_sq_norms,
    decompose,
    holders,
    layer_with,
    new_adapter,
    route,
)
from ..layers.patterns import check_patterns, parse_pattern
from ..layers.tree import fuse_lora_layers, is_lora_layer, lora_layers
from .config import AdapterConfig

__all__ = [
    "AdapterRegistry",
    "list_adapters",
    "active_adapters",
    "add_adapter",
    "delete_adapter",
    "set_adapter",
    "disable_adapters",
    "using_adapters",
    "fuse_adapters",
    "put_adapter",
]

_ATTR = "_adapter_registry"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_BLOCK = re.compile(r"^(?P<stack>(?:.+\.)?layers)\.(?P<index>\d+)\.")


@dataclass
class AdapterRegistry:
    """A model's adapters: ``configs`` in the order added (None: read from a file), which run
    (``active``: (name, weight)), which train, and whether all are switched off."""

    configs: dict = field(default_factory=dict)
    active: tuple = ()
    trainable: frozenset = frozenset()
    disabled: bool = False


def registry(model: nn.Module) -> AdapterRegistry:
    """The model's registry; for a model made by the single-adapter entry points, inferred
    from its LoRA layers (their adapters all active and trained)."""
    reg = getattr(model, _ATTR, None)
    if reg is None:  # kept on the model by the first change made here
        names = list(dict.fromkeys(n for _, layer in lora_layers(model) for n in holders(layer)))
        reg = AdapterRegistry({n: None for n in names}, tuple((n, 1.0) for n in names), frozenset(names))
    return reg


def list_adapters(model: nn.Module) -> list[str]:
    """The model's adapters' names, in the order they were added."""
    return list(registry(model).configs)


def is_plain(model: nn.Module) -> bool:
    """True for a model with no adapter or one, "default", running alone as the single-adapter
    layers run it (no routing on any layer)."""
    return list_adapters(model) in ([], [DEFAULT_ADAPTER]) and all(
        getattr(layer, "routing", None) is None for _, layer in lora_layers(model)
    )


def active_adapters(model: nn.Module) -> list[tuple[str, float]]:
    """(name, weight) of the adapters that run (empty while `disable_adapters` holds)."""
    reg = registry(model)
    return [] if reg.disabled else list(reg.active)


def check_name(model, name, *, exists: bool):
    names = list_adapters(model)
    if exists and name not in names:
        raise KeyError(f"no adapter named {name!r}; the model has {names}")
    if not exists:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"adapter name must be letters, digits, '_' and '-' (not first), got {name!r}")
        if name in names:
            raise ValueError(f"the model already has an adapter named {name!r}; delete_adapter it first")


def _routes(layers: list, reg: AdapterRegistry) -> list:
    """The `Routing` of each (path, layer) under ``reg``; raises on the first that cannot run."""
    routes = []
    for path, layer in layers:
        routing = route(layer, reg.active, reg.trainable, reg.disabled, path)
        if routing is not None and not isinstance(layer, (FusedLoRALinear, FusedDoRALinear)):
            raise TypeError(
                f"{path} is a {type(layer).__name__}: named, stacked or disabled adapters need fused layers"
            )
        routes.append(routing)
    return routes


def _apply(model: nn.Module, reg: AdapterRegistry, *, freeze: bool = True) -> None:
    """Route every LoRA layer and (``freeze``) set its adapters' freeze flags; all checked
    before any is set."""
    layers = lora_layers(model)
    routes = _routes(layers, reg)
    for (_, layer), routing in zip(layers, routes, strict=True):
        if isinstance(layer, (FusedLoRALinear, FusedDoRALinear)):
            layer.routing = routing
        for name, holder in holders(layer).items() if freeze else ():
            if name in reg.trainable:
                holder.unfreeze(keys=adapter_keys(holder), recurse=False)
            else:
                holder.freeze(keys=adapter_keys(holder), recurse=False)
    setattr(model, _ATTR, reg)


def _base_of(module):
    return module.linear if is_lora_layer(module) else module


def _restructure(model: nn.Module, reg: AdapterRegistry, changes: dict, bases: dict | None = None) -> None:
    """Rebuild the layers at ``changes`` ({path: [(name, AdapterWeights)]}, any order; [] gives
    the bare base) with their adapters in the registry's order, around ``bases[path]`` where
    given (an init's new base), then route the model."""
    order = {n: i for i, n in enumerate(reg.configs)}
    modules = dict(model.named_modules())
    updates = []
    for path, items in changes.items():
        old = modules[path]
        items = sorted(items, key=lambda item: order[item[0]])
        base = (bases or {}).get(path) or _base_of(old)
        new = layer_with(base, items) if items else base
        new.train(old.training)
        updates.append((path, new))
    after = {**dict(lora_layers(model)), **dict(updates)}
    _routes([(p, m) for p, m in after.items() if is_lora_layer(m)], reg)  # checked before any change
    if updates:
        model.update_modules(tree_unflatten(updates))
    _apply(model, reg)


def _layer_adapters(module) -> list:
    return decompose(module) if is_lora_layer(module) else []


def _targets(model: nn.Module, config: AdapterConfig, where: str) -> list[str]:
    """Paths of the linear modules ``config`` targets (``keys`` by PEFT's path-ending rule,
    ``num_layers`` counted from the end of each ``layers`` list)."""
    patterns = [parse_pattern(k, "keys", where) for k in config.keys] if config.keys else None
    modules = list(model.named_modules())
    depth = {}
    for path, _ in modules:
        if m := _BLOCK.match(path):
            depth[m["stack"]] = max(depth.get(m["stack"], 0), int(m["index"]) + 1)
    lora_paths = {p for p, m in modules if is_lora_layer(m)}
    out = []
    for path, module in modules:
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        if parent in lora_paths or ".adapters." in f".{path}.":
            continue  # a LoRA layer's own base, or a named adapter's weights
        if not (isinstance(module, (nn.Linear, nn.QuantizedLinear)) or path in lora_paths):
            continue
        block = _BLOCK.match(path)
        if config.num_layers and block and int(block["index"]) < depth[block["stack"]] - config.num_layers:
            continue
        if patterns is None and not block:
            continue  # mlx-lm's default: every linear inside the blocks
        if patterns is not None and not any(p.matches(path) for p in patterns):
            continue
        out.append(path)
    return out


def add_adapter(model: nn.Module, name: str, config) -> nn.Module:
    """Add adapter ``name`` built from ``config`` (an `AdapterConfig` or a dict of mlx-lm's
    ``lora_parameters`` keys, see `AdapterConfig`); returns ``model``.

    The targeted linears become fused LoRA layers (the base frozen) or gain the adapter
    beside theirs. It runs once activated (`set_adapter`), unless it is the model's first.
    """
    check_name(model, name, exists=False)
    where = f"add_adapter({name!r})"
    config = AdapterConfig.parse(config, where)
    paths = _targets(model, config, where)
    if not paths:
        raise ValueError(f"{where}: keys {config.keys} with num_layers {config.num_layers} match no linear module")
    reg = registry(model)
    first = not reg.configs
    if not first and init_changes_base(config.init_lora_weights):
        raise ValueError(
            f"{where}: init_lora_weights {config.init_lora_weights!r} replaces the base weight of every module it "
            f"adapts, which the model's adapters {list(reg.configs)} run on too: only a model's first adapter may "
            "start that way (fuse or delete the others first)"
        )
    check_patterns(config.rank_pattern, config.alpha_pattern, where, paths)
    modules = dict(model.named_modules())
    changes, bases = {}, {}
    for path in paths:
        module = modules[path]
        if is_lora_layer(module) and not isinstance(module, (FusedLoRALinear, FusedDoRALinear)):
            raise TypeError(f"{where}: {path} is a {type(module).__name__}; named adapters need fused layers")
        rank, scale, width = config.module_rank_scale(path)
        weights = new_adapter(
            _base_of(module), rank, width, scale, config.dropout, config.use_dora, config.init_lora_weights
        )
        if weights.lora_init is not None and weights.lora_init.changes_base:
            bases[path] = weights.lora_init.base
        changes[path] = [*_layer_adapters(module), (name, weights)]
    if first:
        model.freeze()
    reg = replace(reg, configs={**reg.configs, name: config})
    if first:
        reg = replace(reg, active=((name, 1.0),), trainable=frozenset([name]))
    _restructure(model, reg, changes, bases)
    mx.eval(model.parameters())
    warn_base_changed(config.init_lora_weights, len(bases))
    return model


def put_adapter(model: nn.Module, name: str, plan: Sequence, dropout: float, config=None, inits=None) -> nn.Module:
    """Make adapter ``name`` exactly ``plan`` ((path, module, base, `ModuleAdapter`), checked
    by the caller): replaced where it exists, added otherwise. Activation is kept; a
    model's first adapter becomes active and trained. ``inits``: {path: `LoRAInit`} of the
    modules whose base an init split again (the plan holds the new base)."""
    reg = registry(model)
    first = not reg.configs
    reg = replace(reg, configs={**reg.configs, name: config})
    if first:
        reg = replace(reg, active=((name, 1.0),), trainable=frozenset([name]))
        model.freeze()
    inits = inits or {}
    changes = {p: [(n, w) for n, w in _layer_adapters(m) if n != name] for p, m in _holding(model, name)}
    for path, module, base, m in plan:
        norms = None if m.magnitude is None else base_sq_norms(base)
        weights = AdapterWeights(m.lora_a, m.lora_b, m.scale, dropout, m.magnitude, norms)
        prior = holders(module).get(name) if is_lora_layer(module) else None  # its init's residual stays the base
        weights.lora_init = inits.get(path, getattr(prior, "lora_init", None))
        kept = changes[path] if path in changes else [(n, w) for n, w in _layer_adapters(module) if n != name]
        changes[path] = [*kept, (name, weights)]
    _restructure(model, reg, changes, {p: base for p, _, base, _ in plan if p in inits})
    mx.eval(model.parameters())
    return model


def _holding(model, name) -> list[tuple[str, nn.Module]]:
    return [(p, layer) for p, layer in lora_layers(model) if name in holders(layer)]


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer (a layer left with none becomes its base).

    If it was the only active one, the first remaining adapter is activated (PEFT's rule),
    with a warning naming it.
    """
    check_name(model, name, exists=True)
    reg = registry(model)
    configs = {n: c for n, c in reg.configs.items() if n != name}
    active = tuple((n, w) for n, w in reg.active if n != name)
    trainable = reg.trainable - {name}
    if not active and reg.active and configs:
        nxt = next(iter(configs))
        warnings.warn(f"deleted the active adapter {name!r}; {nxt!r} is active now", stacklevel=2)
        active, trainable = ((nxt, 1.0),), frozenset([nxt])
    changes = {p: [(n, w) for n, w in decompose(layer) if n != name] for p, layer in _holding(model, name)}
    _restructure(model, AdapterRegistry(configs, active, trainable, reg.disabled), changes)
    if not configs:
        delattr(model, _ATTR)


def _weights_of(names, weights) -> list[float]:
    if weights is None:
        return [1.0] * len(names)
    if isinstance(weights, dict):
        extra = sorted(set(weights) - set(names))
        if extra:
            raise ValueError(f"weights name adapters {extra} that are not being set active {names}")
        weights = [weights.get(n, 1.0) for n in names]
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"got {len(weights)} weights for {len(names)} adapters {names}")
    for n, w in zip(names, weights, strict=True):
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not abs(w) < 3.4e38:
            raise ValueError(f"weight of adapter {n!r} must be a finite number, got {w!r}")
    return [float(w) for w in weights]


def set_adapter(model: nn.Module, names, weights=None, *, trainable=None) -> None:
    """Run ``names`` (one name, a list, [] for none, or {name: weight}), with per-adapter
    ``weights`` (a list or {name: weight}; default 1), and train ``trainable`` (default: all
    of ``names``).

    Several adapters on a layer run as one op over their concatenated rank; the others are
    frozen. Raises, changing nothing, on an unknown name, DoRA adapters stacked or weighted,
    or trained adapters whose dropout rates differ (`layers.named.route`).
    """
    if isinstance(names, dict):
        if weights is not None:
            raise ValueError("give the weights in the dict of names or as weights=, not both")
        names, weights = list(names), list(names.values())
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        check_name(model, n, exists=True)
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names repeat: {names}")
    trainable = names if trainable is None else [trainable] if isinstance(trainable, str) else list(trainable)
    stray = [n for n in trainable if n not in names]
    if stray:
        raise ValueError(f"trainable adapters {stray} are not among the active {names}: only active adapters train")
    reg = registry(model)
    new = replace(
        reg, active=tuple(zip(names, _weights_of(names, weights), strict=True)), trainable=frozenset(trainable)
    )
    _apply(model, new)


@contextmanager
def disable_adapters(model: nn.Module):
    """Within the block every LoRA layer runs its base product alone (no adapter, no mask,
    no op call); on exit the adapters run again. Usable inside a traced function."""
    reg = registry(model)
    _apply(model, replace(reg, disabled=True), freeze=False)
    try:
        yield model
    finally:
        _apply(model, reg, freeze=False)


@contextmanager
def using_adapters(model: nn.Module, names, weights=None):
    """Within the block ``names`` run with ``weights`` (as `set_adapter`, none trained);
    then the model's previous adapters, weights and trainable set again. ``names=None``:
    no change (the adapters the model runs)."""
    if names is None:
        yield model
        return
    reg = registry(model)
    set_adapter(model, names, weights, trainable=[])
    try:
        yield model
    finally:
        _apply(model, reg)


def fuse_adapters(model: nn.Module, names=None, weights=None, *, dequantize: bool = False) -> nn.Module:
    """Fold ``names`` with ``weights`` (default: the active adapters) into the base weights
    through the one fold (`layers.fold.fold_lora`: one call per layer over the concatenated
    rank) and remove every adapter layer, as PEFT's ``merge_and_unload``; returns ``model``."""
    if names is not None:
        set_adapter(model, names, weights)
    fuse_lora_layers(model, dequantize=dequantize)
    if hasattr(model, _ATTR):
        delattr(model, _ATTR)
    return model
