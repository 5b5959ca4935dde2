"""The mlx-lm adapter format, and the CSM fine-tuning CLI's (mlx-lm's under other names).

- ``mlx-lm``: ``adapters.safetensors`` with ``{path}.lora_a (in, r)``,
  ``{path}.lora_b (r, out)`` (and ``{path}.m (out,)`` for DoRA);
  ``adapter_config.json`` with ``fine_tune_type: "lora"`` (or ``"dora"``),
  ``num_layers`` and ``lora_parameters {rank, scale, dropout, keys}`` as mlx-lm reads
  them. Extra fields mlx-lm ignores keep what its schema cannot say: ``lora_parameters.alpha``,
  ``use_rslora``, and ``scale_pattern`` / ``alpha_pattern`` / ``rank_pattern`` (exact module
  paths, never patterns) for modules whose scale, alpha or rank differs from the common one.
  Read too: PEFT's ``rank_pattern`` / ``alpha_pattern`` / ``init_lora_weights`` inside
  ``lora_parameters``, where ``python -m mlx_fused_lora.lm_lora`` (mlx-lm's trainer, which saves
  its arguments) keeps them: patterns matched by PEFT's rule, each module's scale
  ``alpha / r`` from them (the common alpha ``lora_parameters.alpha``, else ``scale * rank``).
  PEFT's ``init_lora_weights`` is written when the adapter did not start from the default
  init. Every field is checked against the tensors on reading (`checks`): ranks equal to the
  tensors', scales finite in float32, every pattern naming a module the tensors hold.
- ``csm-cli``: the file names the original CSM fine-tuning CLI writes,
  ``fine_tuned_model.safetensors`` + ``fine_tuned_model_metadata.json``; tensors named
  as in mlx-lm, metadata as mlx-lm's ``adapter_config.json`` plus
  ``"adapter_format": "csm-cli"``.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..layers.patterns import module_rank_scale
from .adapter_set import AdapterSet, ModuleAdapter, attach_magnitudes, lora_pairs, most_common, split_magnitudes
from .checks import (
    AdapterError,
    check_lora_pair,
    check_module_paths,
    check_rank,
    config_field,
    init_lora_weights_field,
    pattern_field,
)
from .registry import AdapterFormat, load_tensors, read_json, register_format

__all__ = ["MLX_LM", "CSM_CLI"]

_MLX_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[ab])$")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def _module_map(config: dict, name: str, kind: str, where: str) -> dict:
    """``config[name]``: an object of exact module paths to values of ``kind`` (may be absent)."""
    values = config_field(config, name, "dict", where, {})
    for path in values:
        config_field(values, path, kind, f"{where}: {name}")
    return values


def _block_key(path: str) -> str:
    """mlx-lm's key for a module: its path inside a block (``self_attn.q_proj``), or the path."""
    m = _LAYER_INDEX.search(path)
    return m.group(2) if m else path


def _read(d: Path, fmt: AdapterFormat) -> AdapterSet:
    where = str(d / fmt.config_file)
    config = read_json(d / fmt.config_file)
    ftype = config_field(config, "fine_tune_type", "str", where, "lora")
    if ftype not in ("lora", "dora"):
        raise AdapterError(f"{where}: fine_tune_type {ftype!r} is not supported (lora or dora)")
    params = config_field(config, "lora_parameters", "dict", where)
    pwhere = f"{where}: lora_parameters"
    scale = config_field(params, "scale", "float32", pwhere)
    rank = config_field(params, "rank", "rank", pwhere, None)
    dropout = config_field(params, "dropout", "number", pwhere, 0.0)
    if not 0.0 <= dropout < 1.0:
        raise AdapterError(f"{pwhere}: field 'dropout' must be in [0, 1), got {dropout!r}")
    default_alpha = config_field(params, "alpha", "float32", pwhere, None, nullable=True)
    config_field(params, "keys", "str list", pwhere, None, nullable=True)  # mlx-lm's; module paths, unused here
    use_rslora = config_field(config, "use_rslora", "bool", where, False)
    num_layers = config_field(config, "num_layers", "int", where, None, nullable=True)
    if num_layers is not None and num_layers < -1:
        raise AdapterError(f"{where}: field 'num_layers' must be -1 (all) or more, got {num_layers}")
    scale_pattern = _module_map(config, "scale_pattern", "float32", where)
    alpha_pattern = _module_map(config, "alpha_pattern", "float32", where)
    rank_pattern = _module_map(config, "rank_pattern", "rank", where)
    patterns = {f: params.get(f) for f in ("rank_pattern", "alpha_pattern")}  # PEFT's, as lm_lora saves them
    pattern_field(params, "rank_pattern", "rank", pwhere)
    pattern_field(params, "alpha_pattern", "float32", pwhere)
    tensors_where = str(d / fmt.weights_file)
    tensors, magnitudes = split_magnitudes(load_tensors(d / fmt.weights_file), ".m")
    modules = {}
    for path, ab in lora_pairs(tensors, _MLX_KEY, fmt.name, tensors_where).items():
        check_lora_pair(path, ab["a"], ab["b"], tensors_where)
        module_scale = scale
        if path in rank_pattern:
            check_rank(where, path, ab["a"].shape[1], f"rank_pattern[{path!r}]", rank_pattern[path], tensors_where)
        elif rank is not None:
            expected, module_scale = module_rank_scale(
                path,
                rank,
                scale,
                patterns["rank_pattern"],
                patterns["alpha_pattern"],
                alpha=default_alpha,
                use_rslora=use_rslora,
            )
            field = "lora_parameters.rank" if expected == rank else "lora_parameters.rank_pattern"
            check_rank(where, path, ab["a"].shape[1], field, expected, tensors_where)
        modules[path] = ModuleAdapter(
            ab["a"], ab["b"], float(scale_pattern.get(path, module_scale)), alpha_pattern.get(path, default_alpha)
        )
    for name, pattern in (
        ("scale_pattern", scale_pattern),
        ("alpha_pattern", alpha_pattern),
        ("rank_pattern", rank_pattern),
    ):
        check_module_paths(where, name, pattern, modules)
    modules = attach_magnitudes(modules, magnitudes, ftype == "dora", ".m", tensors_where)
    extra = {"model_type": config_field(config, "model_type", "str", where)} if "model_type" in config else {}
    init = init_lora_weights_field(config, where, init_lora_weights_field(params, pwhere))
    return AdapterSet(modules, float(dropout), use_rslora, num_layers, extra, init_lora_weights=init)


def _mlx_lm_keys(paths) -> tuple[list[str], int | None]:
    """mlx-lm's ``keys`` (paths inside a block, or full paths) and a ``num_layers`` guess."""
    keys = {_block_key(p) for p in paths}
    indices = [int(m.group(1)) for p in paths if (m := _LAYER_INDEX.search(p))]
    num_layers = (max(indices) - min(indices) + 1) if indices else 0
    return sorted(keys), num_layers


def _config(adapters: AdapterSet) -> dict:
    mods = adapters.modules
    rank = most_common(m.r for m in mods.values())
    scale = most_common(m.scale for m in mods.values())
    alphas = {p: m.alpha_value(adapters.use_rslora) for p, m in mods.items()}
    alpha = most_common(alphas.values())
    keys, num_layers = _mlx_lm_keys(mods)
    config = {
        "fine_tune_type": "dora" if adapters.use_dora else "lora",
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
    patterns = {
        "scale_pattern": {p: m.scale for p, m in mods.items() if m.scale != scale},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha},
        "rank_pattern": {p: m.r for p, m in mods.items() if m.r != rank},
    }
    config.update({name: pattern for name, pattern in patterns.items() if pattern})
    if adapters.init_lora_weights is not True:
        config["init_lora_weights"] = adapters.init_lora_weights
    config.update(adapters.extra)
    return config


def _tensors(adapters: AdapterSet) -> dict:
    tensors = {}
    for p, m in adapters.modules.items():
        tensors[f"{p}.lora_a"] = m.lora_a
        tensors[f"{p}.lora_b"] = m.lora_b
        if m.magnitude is not None:
            tensors[f"{p}.m"] = m.magnitude
    return tensors


def _is_mlx_lm_config(config: dict) -> bool:
    """mlx-lm's config holds ``lora_parameters`` (or at least its ``fine_tune_type``)."""
    return "lora_parameters" in config or "fine_tune_type" in config


def _write_mlx_lm(adapters: AdapterSet):
    return _tensors(adapters), _config(adapters), {"format": "mlx"}


def _write_csm_cli(adapters: AdapterSet):
    return _tensors(adapters), {**_config(adapters), "adapter_format": "csm-cli"}, {"format": "mlx"}


MLX_LM = register_format(
    AdapterFormat(
        "mlx-lm",
        "adapters.safetensors",
        "adapter_config.json",
        read=lambda d: _read(d, MLX_LM),
        write=_write_mlx_lm,
        aliases=("mlx", "mlx_lm"),
        recognizes=_is_mlx_lm_config,
    )
)
CSM_CLI = register_format(
    AdapterFormat(
        "csm-cli",
        "fine_tuned_model.safetensors",
        "fine_tuned_model_metadata.json",
        read=lambda d: _read(d, CSM_CLI),
        write=_write_csm_cli,
        aliases=("csm",),
        recognizes=_is_mlx_lm_config,
    )
)
