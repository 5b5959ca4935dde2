"""Validation of untrusted adapter files: config field types and LoRA tensors.

Every reader checks what it takes from a file here, before anything is built from it,
so a bad file fails with one error naming the file, the field or tensor, what was
expected and what was found — never a raw ``float('abc')`` or attribute error.
"""

from __future__ import annotations

import math

import mlx.core as mx

__all__ = ["AdapterError", "config_field", "check_lora_pair", "FLOAT_DTYPES"]

FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
_MISSING = object()


class AdapterError(ValueError):
    """An adapter file is malformed: names the file and the field or tensor."""


def _kind_ok(value, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
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
    "bool": "true or false",
    "str": "a string",
    "dict": "an object",
    "list": "a list",
}


def config_field(config: dict, name: str, kind: str, where: str, default=_MISSING, *, nullable: bool = False):
    """``config[name]`` checked to be of ``kind`` (int, number, bool, str, dict, list).

    A missing field gives ``default`` (or KeyError naming it when there is none); a
    ``null`` is accepted only with ``nullable``. ``where`` names the file (and the object
    inside it) in the error.
    """
    if name not in config:
        if default is _MISSING:
            raise KeyError(f"{where}: {name!r} is missing")
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


def check_lora_tensor(key: str, value: mx.array, where: str) -> None:
    """A LoRA tensor must be a 2-D float16/bfloat16/float32 array of finite values."""
    if value.dtype not in FLOAT_DTYPES:
        dtype = str(value.dtype).rsplit(".", 1)[-1]  # int32, not mlx.core.int32
        raise AdapterError(f"{where}: tensor {key!r} has dtype {dtype}; expected float16, bfloat16 or float32")
    if value.ndim != 2:
        raise AdapterError(f"{where}: tensor {key!r} has shape {tuple(value.shape)}; expected a matrix")
    if not mx.all(mx.isfinite(value)).item():
        raise AdapterError(f"{where}: tensor {key!r} holds non-finite values (NaN or inf)")


def check_lora_pair(path: str, a: mx.array, b: mx.array, where: str, names=("lora_a", "lora_b")) -> None:
    """``a (in, r)`` and ``b (r, out)`` with a common rank ``r >= 1`` (both tensors checked)."""
    check_lora_tensor(f"{path}.{names[0]}", a, where)
    check_lora_tensor(f"{path}.{names[1]}", b, where)
    if a.shape[1] != b.shape[0] or a.shape[1] < 1:
        raise AdapterError(
            f"{where}: {path}: {names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} are not (in, r), (r, out)"
        )
