"""Validation of untrusted adapter files: config field types and LoRA tensors.

Every reader checks what it takes from a file here, before anything is built from it,
so a bad file fails with one error naming the file, the field or tensor, what was
expected and what was found — never a raw ``float('abc')`` or attribute error.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..layers.patterns import PatternError, parse_pattern

__all__ = [
    "AdapterError",
    "config_field",
    "init_lora_weights_field",
    "pattern_field",
    "check_lora_pair",
    "check_rank",
    "check_module_paths",
    "FLOAT_DTYPES",
    "FLOAT32_MAX",
]

FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
# Scales and alphas become float32 constants of the op (the compute dtype): a larger one
# is inf there, and the first forward would fail far from the file that held it.
FLOAT32_MAX = 3.4028234663852886e38
_MISSING = object()


class AdapterError(ValueError):
    """An adapter file is malformed: names the file and the field or tensor."""


def _kind_ok(value, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "float32":
        return _kind_ok(value, "number") and abs(value) <= FLOAT32_MAX
    if kind == "rank":
        return _kind_ok(value, "int") and value >= 1
    if kind == "str list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "dict":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list)
    raise ValueError(f"unknown field kind {kind!r}")


_EXPECTED = {
    "int": "an integer",
    "number": "a finite number",
    "float32": f"a number finite in float32, the compute dtype (|x| <= {FLOAT32_MAX:.4g})",
    "rank": "an integer >= 1",
    "str list": "a list of strings",
    "bool": "true or false",
    "str": "a string",
    "dict": "an object",
    "list": "a list",
}


def config_field(config: dict, name: str, kind: str, where: str, default=_MISSING, *, nullable: bool = False):
    """``config[name]`` checked to be of ``kind``: its type and range (int, number, bool,
    str, dict, list; float32: finite in float32; rank: an int >= 1; str list: a list of
    strings).

    A missing field gives ``default`` (or an `AdapterError` naming it when there is none); a
    ``null`` is accepted only with ``nullable``. ``where`` names the file (and the object
    inside it) in the error.
    """
    if name not in config:
        if default is _MISSING:
            raise AdapterError(f"{where}: field {name!r} is missing")
        return default
    value = config[name]
    if value is None and nullable:
        return None
    if not _kind_ok(value, kind):
        null = " or null" if nullable else ""
        raise AdapterError(
            f"{where}: field {name!r} must be {_EXPECTED[kind]}{null}, got {type(value).__name__} {value!r:.80}"
        )
    return value


def pattern_field(config: dict, field: str, kind: str, where: str) -> list:
    """``config[field]``, PEFT's ``rank_pattern`` / ``alpha_pattern`` (may be absent or null), as
    (`ModulePattern`, value) pairs: keys parsed by `layers.patterns` (never run as regular
    expressions), values of ``kind``; a bad one is an `AdapterError` naming the file and key."""
    values = config_field(config, field, "dict", where, {}, nullable=True) or {}
    out = []
    for key, value in values.items():
        try:
            pattern = parse_pattern(key, field, where)
        except PatternError as e:
            raise AdapterError(str(e)) from None
        config_field(values, key, kind, f"{where}: {field}")
        out.append((pattern, value))
    return out


def init_lora_weights_field(config: dict, where: str, default=True) -> bool | str:
    """``config["init_lora_weights"]`` as PEFT writes it: true/false or an init's name
    (default ``default``). Reading an adapter never runs an init (`model_io.load_adapters` may)."""
    value = config.get("init_lora_weights", default)
    if not isinstance(value, (bool, str)):
        raise AdapterError(
            f"{where}: field 'init_lora_weights' must be true, false or a string, got {type(value).__name__} {value!r:.80}"
        )
    return value


def non_finite_names(tensors: dict[str, mx.array]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an inf, sorted."""
    # One evaluation for all tensors, not one synchronization per tensor.
    finite = {name: mx.isfinite(v).all() for name, v in tensors.items() if mx.issubdtype(v.dtype, mx.inexact)}
    mx.eval(list(finite.values()))
    return sorted(name for name, ok in finite.items() if not ok.item())


def check_finite(tensors: dict[str, mx.array], where: str) -> None:
    """Every floating-point tensor of a file must be finite (one evaluation for them all)."""
    bad = non_finite_names(tensors)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise AdapterError(f"{where}: tensor {bad[0]!r}{more} holds non-finite values (NaN or inf)")


def check_lora_tensor(key: str, value: mx.array, where: str) -> None:
    """A LoRA tensor must be a 2-D float16/bfloat16/float32 array (finite: `check_finite`, at load)."""
    if value.dtype not in FLOAT_DTYPES:
        dtype = str(value.dtype).rsplit(".", 1)[-1]  # int32, not mlx.core.int32
        raise AdapterError(f"{where}: tensor {key!r} has dtype {dtype}; expected float16, bfloat16 or float32")
    if value.ndim != 2:
        moe = (
            " (3-D: a mixture-of-experts adapter, which mlx_lm.tuner.utils.load_adapters reads, fused after "
            "mlx_fused_lora.patch_mlx_lm())"
            if value.ndim == 3
            else ""
        )
        raise AdapterError(f"{where}: tensor {key!r} has shape {tuple(value.shape)}; expected a matrix{moe}")


def check_lora_pair(path: str, a: mx.array, b: mx.array, where: str, names=("lora_a", "lora_b")) -> None:
    """``a (in, r)`` and ``b (r, out)`` with a common rank ``r >= 1`` (both tensors checked)."""
    check_lora_tensor(f"{path}.{names[0]}", a, where)
    check_lora_tensor(f"{path}.{names[1]}", b, where)
    if a.shape[1] != b.shape[0] or a.shape[1] < 1:
        raise AdapterError(
            f"{where}: {path}: {names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} are not (in, r), (r, out)"
        )


def check_rank(where: str, path: str, tensor_rank: int, field: str, config_rank: int, tensors_where: str) -> None:
    """The rank the config gives a module (``field``) must be its tensors' rank."""
    if tensor_rank != config_rank:
        raise AdapterError(
            f"{where}: {field} is {config_rank} but the tensors of {path} in {tensors_where} have rank {tensor_rank}"
        )


def check_module_paths(where: str, field: str, paths, modules) -> None:
    """Every key of a per-module field (``scale_pattern``, ...) must name a module the tensors hold."""
    unknown = sorted(set(paths) - set(modules))
    if unknown:
        raise AdapterError(f"{where}: {field} names {unknown[0]!r}, a module the adapter has no tensors for")
