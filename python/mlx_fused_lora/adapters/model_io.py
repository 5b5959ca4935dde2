"""Adapters to and from a model: save its LoRA layers, load adapters into it all-or-nothing.

Works for any MLX model whose adapted modules are LoRA layers (`FusedLoRALinear`,
`PlainLoRALinear` or mlx-lm's `LoRALinear`): module paths are the model's own
(``model.layers.0.self_attn.q_proj`` for an mlx-lm model). A model family whose adapters
circulate under other names (CSM's Hugging Face and torchtune names) registers
`ModelAdapterHooks` for its class: a ``rename`` from those names to its own, applied on
load, and ``extra`` config fields written on save. This module knows layers, not models.

Adapters whose init split W (PiSSA, OLoRA: `layers.init`) run on the residual base that
init made. `save_adapters` records the init; with ``convert_to_lora`` it writes them as
plain LoRA of the original weights instead (`init_conversion`). `load_adapters` does what
PEFT does with a file that records such an init: it splits the base it loads onto again
(the trained adapter then runs on that residual, which is the trained model when the base
is the original one), unless the layer there already started from that init.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..layers import FusedDoRALinear, FusedLoRALinear
from ..layers.base import base_dims
from ..layers.init import LoRAInit, init_changes_base, init_lora, is_default_init
from ..layers.named import DEFAULT_ADAPTER, holders, resident_name
from ..layers.tree import freeze_all_but_lora, is_lora_layer, lora_dropout_p, lora_layers
from . import manager
from .adapter_set import AdapterSet, ModuleAdapter
from .checks import AdapterError
from .init_conversion import convert_to_lora as convert_set
from .registry import adapter_dir, detect_adapter_format, get_format, read_adapters, write_adapters

__all__ = [
    "ModelAdapterHooks",
    "register_model_hooks",
    "save_adapters",
    "load_adapters",
    "convert_adapter",
]

Rename = Callable[[AdapterSet, nn.Module], AdapterSet]


@dataclass(frozen=True)
class ModelAdapterHooks:
    """What a model family adds: ``rename`` (foreign module paths -> the model's, on load;
    it may also transform tensors, e.g. permute rows) and ``extra`` config fields (on save)."""

    rename: Rename | None = None
    extra: dict = field(default_factory=dict)


_HOOKS: list[tuple[type, ModelAdapterHooks]] = []


def register_model_hooks(model_class: type, hooks: ModelAdapterHooks) -> None:
    """Use ``hooks`` for models that are instances of ``model_class`` (re-registering replaces)."""
    _HOOKS[:] = [(c, h) for c, h in _HOOKS if c is not model_class]
    _HOOKS.append((model_class, hooks))


MOE_ADAPTERS = (
    "a mixture-of-experts LoRA layer (per-expert lora_a (E, r, in), lora_b (E, out, r)): these adapter "
    "files hold linear layers' adapters. Save and load a mixture-of-experts model's adapters as mlx-lm does "
    "(its trainer writes adapters.safetensors; mlx_lm.tuner.utils.load_adapters reads it, fused after "
    "mlx_fused_lora.patch_mlx_lm())"
)


def hooks_for(model: nn.Module) -> ModelAdapterHooks:
    """The hooks registered for ``model``'s class (the last registered wins), else none."""
    for cls, hooks in reversed(_HOOKS):
        if isinstance(model, cls):
            return hooks
    return ModelAdapterHooks()


def adapter_set_of(model: nn.Module, name: str | None = None) -> AdapterSet:
    """The adapter ``name`` of the model's LoRA layers (None: each layer's own, the one
    adapter of a single-adapter model)."""
    layers = [(p, layer) for p, layer in lora_layers(model) if name is None or name in holders(layer)]
    if not layers:
        raise ValueError("the model has no LoRA layers to save" if name is None else f"no layer holds adapter {name!r}")
    held = {p: layer if name is None else holders(layer)[name] for p, layer in layers}
    for path, h in held.items():
        if h.lora_a.ndim != 2:
            raise ValueError(f"{path}: {MOE_ADAPTERS}")
    config = manager.registry(model).configs.get(name) if name is not None else None
    settings = config or getattr(model, "lora_settings", None)
    use_rslora = bool(getattr(settings, "use_rslora", False))
    alpha = getattr(settings, "alpha", None)
    dropouts = {lora_dropout_p(h) for h in held.values()}
    if len(dropouts) > 1:
        warnings.warn(f"LoRA layers have different dropouts {sorted(dropouts)}; saving the largest", stacklevel=3)
    trained_biases = [
        path
        for path, layer in layers
        if "bias" in layer.linear and "bias" in dict(tree_flatten(layer.linear.trainable_parameters()))
    ]
    if trained_biases:
        warnings.warn(f"trainable biases ({trained_biases[0]}, ...) are not saved with the adapters", stacklevel=3)
    modules = {path: ModuleAdapter(h.lora_a, h.lora_b, float(h.scale), alpha, h.get("m")) for path, h in held.items()}
    num_layers = None
    if hasattr(model, "layers") and isinstance(model.layers, list):
        idx = [int(p.split("layers.", 1)[1].split(".", 1)[0]) for p in modules if "layers." in p]
        if idx:
            num_layers = len(model.layers) - min(idx)
    inits = {_init_of(h) for h in held.values()}
    if len(inits) > 1:
        raise ValueError(
            f"the adapter's modules started from different inits {sorted(map(str, inits))}: no one "
            "init_lora_weights can be recorded for them"
        )
    extra = dict(hooks_for(model).extra)
    return AdapterSet(modules, max(dropouts), use_rslora, num_layers, extra, init_lora_weights=inits.pop())


def _init_of(holder) -> bool | str:
    init = getattr(holder, "lora_init", None)
    return True if init is None else init.init_lora_weights


def _initial_set(model: nn.Module, name: str | None, source) -> AdapterSet:
    """The adapter as its init made it (before training): from the layers (``source`` True),
    or the file at ``source`` (PEFT's ``path_initial_model_for_weight_conversion``)."""
    if source is not True:
        initial, _ = read_adapters(source)
        rename = hooks_for(model).rename
        return rename(initial, model) if rename is not None else initial
    modules = {}
    for path, layer in lora_layers(model):
        h = layer if name is None else holders(layer).get(name)
        init = getattr(h, "lora_init", None)
        if init is not None and init.changes_base:
            modules[path] = ModuleAdapter(init.lora_a, init.lora_b, float(h.scale))
    return AdapterSet(modules)


def _to_write(model: nn.Module, name: str | None, convert_to_lora, alone: bool) -> AdapterSet:
    """Adapter ``name``'s set, converted to plain LoRA of the original weights when asked and its
    init split W (an adapter written ``alone`` with another init: refused, saying why)."""
    adapters = adapter_set_of(model, name)
    if not convert_to_lora or (not alone and not init_changes_base(adapters.init_lora_weights)):
        return adapters
    return convert_set(adapters, _initial_set(model, name, convert_to_lora))


def save_adapters(
    model: nn.Module, path: str | Path, format: str = "mlx-lm", *, name: str | None = None, convert_to_lora=None
) -> Path:
    """Write the model's adapters to directory ``path`` in ``format``; returns the weights
    file (the default adapter's, or the first written).

    ``format``: ``mlx-lm`` (default), ``peft`` or ``csm-cli``. ``name``: that adapter alone,
    in ``path`` itself. Without it, every adapter in PEFT's named-adapter layout: "default"
    in ``path``, each other one in ``path/<name>/`` (a model with one adapter, "default",
    writes just ``path``, as before).

    ``convert_to_lora``: an adapter whose init split W (PiSSA, OLoRA) is written as plain LoRA
    of the original weights, rank 2r (`convert_to_lora`), which loads anywhere on the original
    model. ``True`` takes the initial adapter each layer kept from its init; a path takes it
    from the adapter saved right after the init (PEFT's ``path_initial_model_for_weight_conversion``).
    """
    fmt = get_format(format).name
    if name is not None:
        return write_adapters(_to_write(model, name, convert_to_lora, True), path, fmt)
    names = manager.list_adapters(model)
    if names in ([], [DEFAULT_ADAPTER]):
        return write_adapters(_to_write(model, None, convert_to_lora, True), path, fmt)
    written = [write_adapters(_to_write(model, n, convert_to_lora, False), _named_dir(path, n), fmt) for n in names]
    return written[names.index(DEFAULT_ADAPTER)] if DEFAULT_ADAPTER in names else written[0]


def _named_dir(path: str | Path, name: str) -> Path:
    """Where adapter ``name`` lives in PEFT's layout: "default" in ``path``, others in ``path/name``."""
    return Path(path) if name == DEFAULT_ADAPTER else Path(path) / name


def placement_plan(
    model: nn.Module, adapters: AdapterSet, where: str = "adapter"
) -> list[tuple[str, nn.Module, nn.Module, ModuleAdapter]]:
    """(path, module, base, adapter) for every adapter, all checked; raises before any change.

    ``where`` (the adapter file, when there is one) is named in every error."""
    modules = dict(model.named_modules())
    missing = sorted(p for p in adapters.modules if p not in modules)
    if missing:
        p = missing[0]
        near = difflib.get_close_matches(p, [k for k in modules if k], n=3, cutoff=0.6)
        raise AdapterError(
            f"{where}: adapter module {p!r} is not in the model ({len(missing)} of {len(adapters.modules)} "
            f"modules are not; nearest in the model: {near or 'none'}): was the adapter saved for another model?"
        )
    plan = []
    for p, m in adapters.modules.items():
        module = modules[p]
        base = module.linear if is_lora_layer(module) else module
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise AdapterError(f"{where}: adapter module {p!r} is a {type(base).__name__}, not a linear layer")
        in_dims, out_dims = base_dims(base)
        if m.lora_a.shape[0] != in_dims or m.lora_b.shape[1] != out_dims:
            raise AdapterError(
                f"{where}: adapter {p}: lora_a {tuple(m.lora_a.shape)} / lora_b {tuple(m.lora_b.shape)} "
                f"do not fit a linear of (in, out) = ({in_dims}, {out_dims}); expected "
                f"({in_dims}, r) and (r, {out_dims})"
            )
        plan.append((p, module, base, m))
    return plan


def load_adapters(
    model: nn.Module, path: str | Path, *, rename: Rename | None = None, name: str | None = None
) -> nn.Module:
    """Load adapters (format detected from the file names) into ``model``, in place.

    All or nothing: the files are read and every tensor and config field checked (names,
    shapes, dtypes, finiteness, field types), and every adapter is matched to its module,
    before the model is touched; any problem raises and leaves the model as it was.
    Each adapted module is wrapped in `FusedLoRALinear` (`FusedDoRALinear` for DoRA
    adapters), or, if it already is a LoRA layer of that kind, has its
    ``lora_a``/``lora_b``/``scale`` (and ``m``) replaced. The base is frozen and the
    adapters left trainable. ``rename`` maps the file's module paths to the model's
    (default: the hook registered for the model's class, if any). Raises `AdapterError`
    naming the adapter file and the module the model lacks (with the nearest names it has),
    or the module or tensor that does not fit.

    ``name``: load as the named adapter ``name`` (`adapters.manager`): read from
    ``path/<name>/`` when that folder holds an adapter (PEFT's named-adapter layout), else
    from ``path`` (a PEFT file holding several adapters gives the one called ``name``, else
    its default). The adapter becomes exactly the file's: replaced where the model has it,
    added otherwise (active if it is the model's first). A model holding named adapters
    loads a file without ``name`` as "default" the same way.
    """
    source = _named_dir(path, name) if name is not None and _holds_adapter(_named_dir(path, name)) else path
    adapters, fmt = read_adapters(source, adapter_name=name)
    where = str(adapter_dir(Path(source)) / get_format(fmt).weights_file)
    rename = rename or hooks_for(model).rename
    if rename is not None:
        try:
            adapters = rename(adapters, model)
        except (KeyError, ValueError) as e:  # a hook names the module; the file is ours to name
            raise AdapterError(f"{where}: {e.args[0] if e.args else e}") from None
    plan = placement_plan(model, adapters, where)
    plain = name is None and manager.is_plain(model)
    plan, inits = _split_again(model, plan, adapters.init_lora_weights, where, name if not plain else None)
    if not plain:
        return manager.put_adapter(model, name or DEFAULT_ADAPTER, plan, adapters.dropout, inits=inits)
    # Build every new layer before assigning anything: constructing one cannot fail halfway.
    # A LoRA layer of the other kind (LoRA <-> DoRA), or whose base was split again, is rebuilt.
    cls = FusedDoRALinear if adapters.use_dora else FusedLoRALinear
    layers = [
        module
        if p not in inits and is_lora_layer(module) and ("m" in module) == adapters.use_dora
        else cls.from_base(base, r=m.r, dropout=adapters.dropout)
        for p, module, base, m in plan
    ]
    replacements = []
    for (p, module, _, m), layer in zip(plan, layers, strict=True):
        layer.lora_a = m.lora_a
        layer.lora_b = m.lora_b
        layer.scale = m.scale
        if p in inits:
            layer.lora_init = inits[p]
        if m.magnitude is not None:
            layer.m = m.magnitude
        if layer is not module:
            replacements.append((p, layer))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    freeze_all_but_lora(model)
    mx.eval(model.parameters())
    return model


def _split_again(model, plan: list, init, where: str, name: str | None) -> tuple[list, dict[str, LoRAInit]]:
    """PEFT's rule for a file recording an init that split W (pissa, pissa_niter_N, olora): split
    each module's base again, so the adapter runs on the residual it was trained on when the
    base is the original weight; a layer that already started from that init keeps its base.
    A LoftQ file is loaded as is (its base is the quantized one LoftQ made), with a warning
    where it lands on a dense base. Returns the plan with the new bases, and the inits by path."""
    if init is False or is_default_init(init) or init in ("gaussian", "eva"):  # the base as it was
        return plan, {}
    try:
        init_changes_base(init)
    except ValueError:
        warnings.warn(
            f"{where} records init_lora_weights={init!r}, an init this package does not know: loaded as is; if "
            "that init changed the base weights, load the adapter on the base it made",
            stacklevel=3,
        )
        return plan, {}
    started = {
        p: holders(module).get(name or resident_name(module)) for p, module, _, _ in plan if is_lora_layer(module)
    }
    started = {p: getattr(h, "lora_init", None) for p, h in started.items()}
    todo = [(p, base, m) for p, _, base, m in plan if getattr(started.get(p), "init_lora_weights", None) != init]
    if init == "loftq":
        dense = [p for p, base, _ in todo if not isinstance(base, nn.QuantizedLinear)]
        if dense:
            warnings.warn(
                f"{where} records init_lora_weights='loftq': it was fitted to the quantized base LoftQ made, and "
                f"{len(dense)} of its modules land on a dense base here (e.g. {dense[0]}); start the model with "
                "the same init first (apply_lora / linear_to_lora_layers with init_lora_weights='loftq')",
                stacklevel=3,
            )
        return plan, {}
    others = [n for n in manager.list_adapters(model) if n != (name or DEFAULT_ADAPTER)]
    if todo and others:
        raise AdapterError(
            f"{where} records init_lora_weights={init!r}: loading it splits the base weights again, which the "
            f"model's adapters {others} run on too; load it into a model without them, or save it with "
            "convert_to_lora=True first"
        )
    inits = {p: init_lora(base, m.r, m.scale, init) for p, base, m in todo}
    if inits:
        randomized = " (randomized: not exactly the split it was trained on)" if init.startswith("pissa_niter_") else ""
        warnings.warn(
            f"{where} records init_lora_weights={init!r}: split the base weight of {len(inits)} modules again, "
            f"as PEFT does{randomized}; on the original model this gives the trained one",
            stacklevel=3,
        )
    plan = [(p, module, inits[p].base if p in inits else base, m) for p, module, base, m in plan]
    return plan, inits


def _holds_adapter(path: Path) -> bool:
    try:
        detect_adapter_format(path)
    except (OSError, ValueError):
        return False
    return True


def convert_adapter(in_path: str | Path, out_path: str | Path, to: str, *, from_format: str | None = None) -> Path:
    """Convert an adapter directory between formats without a model; returns the weights file.

    ``to``: ``peft``, ``mlx-lm`` or ``csm-cli``. Tensors are transposed exactly; ``alpha``
    is carried through (mlx-lm gets it as an extra field) so PEFT -> mlx-lm -> PEFT
    reproduces the same tensors and per-module scales.
    """
    source, target = adapter_dir(Path(in_path)), Path(out_path)
    if target.exists() and os.path.samefile(source, target):
        raise ValueError(f"{out_path} is the folder of the input adapter {in_path}: convert into another folder")
    adapters, detected = read_adapters(in_path)
    if from_format is not None and get_format(from_format).name != detected:
        raise ValueError(f"{in_path} holds a {detected} adapter, not {from_format}")
    return write_adapters(adapters, out_path, get_format(to).name)
