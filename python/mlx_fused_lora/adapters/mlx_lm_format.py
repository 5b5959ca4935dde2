"""LoRA adapter files in three formats, read into and written from one `AdapterSet`.

An `AdapterSet` maps a module path (``model.layers.3.self_attn.q_proj``,
``backbone.layers.0.mlp.up_proj``) to ``lora_a (in, r)``, ``lora_b (r, out)`` and the
multiplier ``scale``, so the module's output is ``x @ W.T + scale * (x @ lora_a) @ lora_b``.

Formats (a directory each):

- ``mlx-lm``: ``adapters.safetensors`` with ``{path}.lora_a (in, r)``,
  ``{path}.lora_b (r, out)``; ``adapter_config.json`` with ``fine_tune_type: "lora"``,
  ``num_layers`` and ``lora_parameters {rank, scale, dropout, keys}`` as mlx-lm reads
  them. Extra fields mlx-lm ignores keep what its schema cannot say: ``lora_parameters.alpha``,
  ``use_rslora``, and ``scale_pattern`` / ``alpha_pattern`` for modules whose scale or
  alpha differs from the common one.
- ``peft``: ``adapter_model.safetensors`` with ``base_model.model.{path}.lora_A.weight
  (r, in)`` and ``...lora_B.weight (out, r)`` (the transposes); ``adapter_config.json``
  with ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``,
  ``target_modules``, ``rank_pattern``, ``alpha_pattern``. Per module
  ``scale = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), with ``r`` and
  ``alpha`` taken from the patterns where one matches (PEFT's rule: a pattern matches a
  path equal to it or ending in ``.{pattern}``).
- ``csm-cli``: the file names the original CSM fine-tuning CLI writes,
  ``fine_tuned_model.safetensors`` + ``fine_tuned_model_metadata.json``; tensors named
  as in mlx-lm, metadata as mlx-lm's ``adapter_config.json`` plus
  ``"adapter_format": "csm-cli"``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

__all__ = [
    "FORMATS",
    "ModuleAdapter",
    "AdapterSet",
    "detect_adapter_format",
    "read_adapters",
    "write_adapters",
]

FORMATS = ("mlx-lm", "peft", "csm-cli")
_FILES = {
    "mlx-lm": ("adapters.safetensors", "adapter_config.json"),
    "peft": ("adapter_model.safetensors", "adapter_config.json"),
    "csm-cli": ("fine_tuned_model.safetensors", "fine_tuned_model_metadata.json"),
}
_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight$")
_MLX_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[ab])$")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The LoRA multiplier: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def alpha_for(r: int, scale: float, use_rslora: bool) -> float:
    """An ``alpha`` with ``lora_scale(r, alpha) == scale`` exactly (nearest float search)."""
    alpha = scale * (math.sqrt(r) if use_rslora else r)
    candidates = [alpha, math.nextafter(alpha, math.inf), math.nextafter(alpha, -math.inf)]
    for a in candidates:
        if lora_scale(r, a, use_rslora) == scale:
            return a
    return alpha


@dataclass
class ModuleAdapter:
    lora_a: mx.array  # (in, r)
    lora_b: mx.array  # (r, out)
    scale: float
    alpha: float | None = None  # as recorded by the source, when it recorded one

    @property
    def r(self) -> int:
        return self.lora_a.shape[1]

    def alpha_value(self, use_rslora: bool) -> float:
        if self.alpha is not None and lora_scale(self.r, self.alpha, use_rslora) == self.scale:
            return self.alpha
        return alpha_for(self.r, self.scale, use_rslora)


@dataclass
class AdapterSet:
    modules: dict[str, ModuleAdapter]
    dropout: float = 0.0
    use_rslora: bool = False
    num_layers: int | None = None  # mlx-lm's: adapted blocks counted from the last
    extra: dict = field(default_factory=dict)  # passed through (e.g. model_type)


# -- detection --


def _adapter_dir(path: Path) -> Path:
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    raise FileNotFoundError(f"no adapter at {path}")


def detect_adapter_format(path: str | Path) -> str:
    """``mlx-lm``, ``peft`` or ``csm-cli``, from the file names in ``path`` (a dir or file)."""
    path = Path(path)
    if path.is_file():
        for fmt, (weights, _) in _FILES.items():
            if path.name == weights:
                return fmt
        raise ValueError(
            f"{path.name} is not an adapter weights file; expected one of {[w for w, _ in _FILES.values()]}"
        )
    d = _adapter_dir(path)
    found = [fmt for fmt, (weights, _) in _FILES.items() if (d / weights).exists()]
    if len(found) == 1:
        return found[0]
    if not found:
        hint = (
            " (adapter_model.bin is PyTorch pickle: convert it to safetensors)"
            if (d / "adapter_model.bin").exists()
            else ""
        )
        raise FileNotFoundError(f"no adapter in {d}: expected one of {[w for w, _ in _FILES.values()]}{hint}")
    raise ValueError(f"{d} holds adapters in several formats {found}; pass the weights file")


# -- reading --


def _pattern_value(patterns: dict, path: str, default):
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", path):
            return value
    return default


def _read_json(p: Path) -> dict:
    if not p.exists():
        raise FileNotFoundError(f"missing {p.name} beside the adapter weights in {p.parent}")
    with open(p) as f:
        return json.load(f)


def _pairs(tensors: dict, key_re: re.Pattern, fmt: str) -> dict[str, dict[str, mx.array]]:
    pairs: dict[str, dict[str, mx.array]] = {}
    for key, value in tensors.items():
        m = key_re.match(key)
        if not m:
            raise ValueError(f"{fmt} adapter key {key!r} is not a LoRA A/B weight (unsupported)")
        pairs.setdefault(m.group("path"), {})[m.group("ab").lower()] = value
    for path, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            missing = "lora_b" if "a" in ab else "lora_a"
            raise ValueError(f"{fmt} adapter has no {missing} for {path}")
    return pairs


def _read_mlx_like(d: Path, fmt: str) -> AdapterSet:
    weights_name, config_name = _FILES[fmt]
    config = _read_json(d / config_name)
    ftype = config.get("fine_tune_type", "lora")
    if ftype != "lora":
        raise ValueError(f"{d / config_name}: fine_tune_type {ftype!r} is not supported (lora only)")
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or "scale" not in params:
        raise KeyError(f"{d / config_name}: lora_parameters.scale is missing")
    use_rslora = bool(config.get("use_rslora", False))
    scale_pattern = config.get("scale_pattern", {})
    alpha_pattern = config.get("alpha_pattern", {})
    default_alpha = params.get("alpha")
    modules = {}
    for path, ab in _pairs(mx.load(str(d / weights_name)), _MLX_KEY, fmt).items():
        a, b = ab["a"], ab["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"{path}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} are not (in, r), (r, out)")
        modules[path] = ModuleAdapter(
            a,
            b,
            float(scale_pattern.get(path, params["scale"])),
            alpha_pattern.get(path, default_alpha),
        )
    return AdapterSet(
        modules=modules,
        dropout=float(params.get("dropout", 0.0)),
        use_rslora=use_rslora,
        num_layers=config.get("num_layers"),
        extra={k: config[k] for k in ("model_type",) if k in config},
    )


def _read_peft(d: Path) -> AdapterSet:
    weights_name, config_name = _FILES["peft"]
    config = _read_json(d / config_name)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{d / config_name}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise ValueError(f"{d / config_name}: DoRA adapters are not supported")
    for k in ("r", "lora_alpha"):
        if k not in config:
            raise KeyError(f"{d / config_name}: {k!r} is missing")
    use_rslora = bool(config.get("use_rslora", False))
    tensors = {
        (k[len(_PEFT_PREFIX) :] if k.startswith(_PEFT_PREFIX) else k): v
        for k, v in mx.load(str(d / weights_name)).items()
    }
    modules = {}
    for path, ab in _pairs(tensors, _PEFT_KEY, "peft").items():
        A, B = ab["a"], ab["b"]  # (r, in), (out, r)
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"{path}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not (r, in), (out, r)")
        r = A.shape[0]
        expected_r = int(_pattern_value(config.get("rank_pattern"), path, config["r"]))
        if r != expected_r:
            raise ValueError(f"{path}.lora_A.weight has rank {r} but the config (r / rank_pattern) says {expected_r}")
        alpha = float(_pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"]))
        modules[path] = ModuleAdapter(A.T, B.T, lora_scale(r, alpha, use_rslora), alpha)
    return AdapterSet(
        modules=modules,
        dropout=float(config.get("lora_dropout", 0.0)),
        use_rslora=use_rslora,
    )


def read_adapters(path: str | Path) -> tuple[AdapterSet, str]:
    """Read an adapter directory (or its weights file); returns (adapters, format)."""
    path = Path(path)
    fmt = detect_adapter_format(path)
    d = _adapter_dir(path)
    return (_read_peft(d) if fmt == "peft" else _read_mlx_like(d, fmt)), fmt


# -- writing --


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _mlx_lm_keys(paths) -> tuple[list[str], int | None]:
    """mlx-lm's ``keys`` (paths inside a block, or full paths) and a ``num_layers`` guess."""
    keys, indices = set(), []
    for p in paths:
        m = _LAYER_INDEX.search(p)
        if m:
            indices.append(int(m.group(1)))
            keys.add(m.group(2))
        else:
            keys.add(p)
    num_layers = (max(indices) - min(indices) + 1) if indices else 0
    return sorted(keys), num_layers


def _mlx_lm_config(adapters: AdapterSet) -> dict:
    mods = adapters.modules
    if not mods:
        raise ValueError("no adapters to write")
    rank = _most_common(m.r for m in mods.values())
    scale = _most_common(m.scale for m in mods.values())
    alphas = {p: m.alpha_value(adapters.use_rslora) for p, m in mods.items()}
    alpha = _most_common(alphas.values())
    keys, num_layers = _mlx_lm_keys(mods)
    config = {
        "fine_tune_type": "lora",
        "num_layers": adapters.num_layers if adapters.num_layers is not None else num_layers,
        "lora_parameters": {
            "rank": rank,
            "scale": scale,
            "dropout": adapters.dropout,
            "keys": keys,
            "alpha": alpha,
        },
        "use_rslora": adapters.use_rslora,
    }
    scale_pattern = {p: m.scale for p, m in mods.items() if m.scale != scale}
    alpha_pattern = {p: a for p, a in alphas.items() if a != alpha}
    if scale_pattern:
        config["scale_pattern"] = scale_pattern
    if alpha_pattern:
        config["alpha_pattern"] = alpha_pattern
    config.update(adapters.extra)
    return config


def _peft_config(adapters: AdapterSet) -> dict:
    mods = adapters.modules
    if not mods:
        raise ValueError("no adapters to write")
    alphas = {p: m.alpha_value(adapters.use_rslora) for p, m in mods.items()}
    r = _most_common(m.r for m in mods.values())
    alpha = _most_common(alphas.values())
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": adapters.dropout,
        "use_rslora": adapters.use_rslora,
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in mods}),
        "rank_pattern": {p: m.r for p, m in mods.items() if m.r != r},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
    }


def write_adapters(adapters: AdapterSet, path: str | Path, fmt: str) -> Path:
    """Write ``adapters`` into directory ``path`` in format ``fmt``; returns the weights file."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown adapter format {fmt!r}; expected one of {FORMATS}")
    d = Path(path)
    if d.suffix == ".safetensors":
        raise ValueError(f"{d}: pass a directory; the file names are fixed by the format")
    d.mkdir(parents=True, exist_ok=True)
    weights_name, config_name = _FILES[fmt]
    if fmt == "peft":
        tensors = {}
        for p, m in adapters.modules.items():
            tensors[f"{_PEFT_PREFIX}{p}.lora_A.weight"] = m.lora_a.T
            tensors[f"{_PEFT_PREFIX}{p}.lora_B.weight"] = m.lora_b.T
        config = _peft_config(adapters)
        metadata = {"format": "pt"}
    else:
        tensors = {}
        for p, m in adapters.modules.items():
            tensors[f"{p}.lora_a"] = m.lora_a
            tensors[f"{p}.lora_b"] = m.lora_b
        config = _mlx_lm_config(adapters)
        if fmt == "csm-cli":
            config["adapter_format"] = "csm-cli"
        metadata = {"format": "mlx"}
    # safetensors wants contiguous row-major data; the transposes above are views.
    tensors = {k: mx.contiguous(v) for k, v in tensors.items()}
    mx.save_safetensors(str(d / weights_name), tensors, metadata=metadata)
    with open(d / config_name, "w") as f:
        json.dump(config, f, indent=2)
    return d / weights_name
