"""The PEFT (Hugging Face) LoRA adapter format, with ``rank_pattern`` keys matched safely.

``adapter_model.safetensors`` with ``base_model.model.{path}.lora_A.weight (r, in)`` and
``...lora_B.weight (out, r)`` (the transposes of ours); ``adapter_config.json`` with
``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``,
``target_modules``, ``rank_pattern``, ``alpha_pattern``. DoRA (``use_dora: true``) adds
``base_model.model.{path}.lora_magnitude_vector (out,)``, the name PEFT saves it under
(our ``m``); ``init_lora_weights`` records how the adapter started (read and written,
never run). Per module
``scale = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), with ``r`` and ``alpha``
taken from the patterns where one matches.

Pattern keys come from untrusted files: they are matched by `layers.patterns` (PEFT's
rule for module paths, never as regular expressions) and a key it refuses is an
`AdapterError` naming the file and the key.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from ..layers.patterns import pattern_value
from ..layers.tree import lora_scale
from .adapter_set import AdapterSet, ModuleAdapter, attach_magnitudes, lora_pairs, most_common, split_magnitudes
from .checks import AdapterError, check_lora_tensor, check_rank, config_field, init_lora_weights_field, pattern_field
from .registry import AdapterFormat, load_tensors, read_json, register_format

__all__ = ["PEFT"]

_PREFIX = "base_model.model."
_MAGNITUDE = ".lora_magnitude_vector"  # PEFT drops the ".weight" of its DoRA module when saving
_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])\.weight$")
_NAMED = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_[AB]|lora_magnitude_vector)\.(?P<name>[^.]+)(?P<tail>\.weight)?$")


def _adapter_of(key: str) -> tuple[str, str]:
    """(adapter name, the key as PEFT saves it) of a tensor name: ``X.lora_A.voice.weight`` is
    adapter ``voice``'s ``X.lora_A.weight``; unnamed keys are the "default" adapter's."""
    m = _NAMED.match(key)
    if m is None:
        return "default", key
    path, kind, name, tail = m["path"], m["kind"], m["name"], m["tail"]
    if kind == "lora_magnitude_vector":
        return ("default" if tail is None and name == "weight" else name), path + _MAGNITUDE
    if tail is None:
        return "default", key  # X.lora_A.weight
    return name, f"{path}.{kind}.weight"


def _one_adapter(tensors: dict, adapter_name: str | None, where: str) -> dict:
    """The tensors of one adapter of a file that may hold several (PEFT names the others'
    ``lora_A.{name}.weight``): ``adapter_name``, else the default one, else the only one.
    Says which when the file holds several; refuses, listing them, when none fits."""
    sets: dict[str, dict] = {}
    for key, value in tensors.items():
        name, plain = _adapter_of(key)
        group = sets.setdefault(name, {})
        if plain in group:
            raise AdapterError(f"{where}: tensor {key!r} repeats {plain!r} of adapter {name!r}")
        group[plain] = value
    if len(sets) <= 1:
        name, chosen = next(iter(sets.items()), ("default", {}))
        if name != "default":
            warnings.warn(f"{where} holds one adapter, {name!r}: loaded it", stacklevel=4)
        return chosen
    wanted = adapter_name or "default"
    if wanted not in sets:
        raise AdapterError(
            f"{where}: holds adapters {sorted(sets)} and none named {wanted!r}; "
            "choose one by name (load_adapters(..., name=...), read_adapters(..., adapter_name=...))"
        )
    warnings.warn(f"{where} holds adapters {sorted(sets)}: loaded {wanted!r}", stacklevel=4)
    return sets[wanted]


def _read(d: Path, adapter_name: str | None = None) -> AdapterSet:
    where = str(d / PEFT.config_file)
    config = read_json(d / PEFT.config_file)
    peft_type = config_field(config, "peft_type", "str", where, "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{where}: peft_type {peft_type!r} is not LORA")
    use_dora = bool(config_field(config, "use_dora", "bool", where, False, nullable=True))
    default_r = config_field(config, "r", "rank", where)
    default_alpha = config_field(config, "lora_alpha", "float32", where)
    dropout = config_field(config, "lora_dropout", "number", where, 0.0)
    if not 0.0 <= dropout < 1.0:
        raise AdapterError(f"{where}: field 'lora_dropout' must be in [0, 1), got {dropout!r}")
    use_rslora = config_field(config, "use_rslora", "bool", where, False)
    init = init_lora_weights_field(config, where)
    rank_pattern = pattern_field(config, "rank_pattern", "rank", where)
    alpha_pattern = pattern_field(config, "alpha_pattern", "float32", where)
    if not isinstance(config.get("target_modules"), str):  # one string: a regex or "all-linear" (never run)
        config_field(config, "target_modules", "str list", where, None, nullable=True)
    weights = d / PEFT.weights_file
    tensors = {(k[len(_PREFIX) :] if k.startswith(_PREFIX) else k): v for k, v in load_tensors(weights).items()}
    tensors = _one_adapter(tensors, adapter_name, str(weights))
    tensors, magnitudes = split_magnitudes(tensors, _MAGNITUDE)
    modules = {}
    for path, ab in lora_pairs(tensors, _KEY, "peft", str(weights)).items():
        A, B = ab["a"], ab["b"]  # (r, in), (out, r)
        check_lora_tensor(f"{path}.lora_A.weight", A, str(weights))
        check_lora_tensor(f"{path}.lora_B.weight", B, str(weights))
        if A.shape[0] != B.shape[1] or A.shape[0] < 1:
            raise AdapterError(
                f"{weights}: {path}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not (r, in), (out, r)"
            )
        r = A.shape[0]
        from_pattern = pattern_value(rank_pattern, path, None)
        field, expected_r = ("r", default_r) if from_pattern is None else ("rank_pattern", from_pattern)
        check_rank(where, path, r, field, expected_r, str(weights))
        alpha = float(pattern_value(alpha_pattern, path, default_alpha))
        modules[path] = ModuleAdapter(A.T, B.T, lora_scale(r, alpha, use_rslora), alpha)
    modules = attach_magnitudes(modules, magnitudes, use_dora, _MAGNITUDE, str(weights))
    return AdapterSet(modules=modules, dropout=float(dropout), use_rslora=use_rslora, init_lora_weights=init)


def _config(adapters: AdapterSet) -> dict:
    mods = adapters.modules
    alphas = {p: m.alpha_value(adapters.use_rslora) for p, m in mods.items()}
    r = most_common(m.r for m in mods.values())
    alpha = most_common(alphas.values())
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": adapters.dropout,
        "use_rslora": adapters.use_rslora,
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in mods}),
        # full module paths: exact under PEFT's rule and under ours
        "rank_pattern": {p: m.r for p, m in mods.items() if m.r != r},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": adapters.init_lora_weights,
        "inference_mode": True,
        "use_dora": adapters.use_dora,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
    }


def _write(adapters: AdapterSet):
    tensors = {}
    for p, m in adapters.modules.items():
        tensors[f"{_PREFIX}{p}.lora_A.weight"] = m.lora_a.T
        tensors[f"{_PREFIX}{p}.lora_B.weight"] = m.lora_b.T
        if m.magnitude is not None:
            tensors[f"{_PREFIX}{p}{_MAGNITUDE}"] = m.magnitude
    return tensors, _config(adapters), {"format": "pt"}


PEFT = register_format(
    AdapterFormat(
        "peft",
        "adapter_model.safetensors",
        "adapter_config.json",
        read=_read,
        write=_write,
        aliases=("hf",),
        named=True,
        recognizes=lambda config: "peft_type" in config or "r" in config,  # PEFT's LoraConfig fields
    )
)
