"""`AdapterSet`: the in-memory form every adapter format is read into and written from.

An `AdapterSet` maps a module path (``model.layers.3.self_attn.q_proj``,
``backbone.layers.0.mlp.up_proj``) to ``lora_a (in, r)``, ``lora_b (r, out)`` and the
multiplier ``scale``, so the module's output is ``x @ W.T + scale * (x @ lora_a) @ lora_b``.
A DoRA adapter also has ``magnitude`` (mlx-lm's ``m``, PEFT's ``lora_magnitude_vector``,
shape (out,)): that output is then rescaled per row to ``magnitude / ||W + scale * (A B)^T||``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace

import mlx.core as mx

from ..layers.tree import alpha_for, lora_scale
from .checks import AdapterError

__all__ = ["ModuleAdapter", "AdapterSet", "lora_pairs", "split_magnitudes", "attach_magnitudes", "most_common"]


@dataclass
class ModuleAdapter:
    lora_a: mx.array  # (in, r)
    lora_b: mx.array  # (r, out)
    scale: float
    alpha: float | None = None  # as recorded by the source, when it recorded one
    magnitude: mx.array | None = None  # DoRA's m (out,); None for plain LoRA

    @property
    def r(self) -> int:
        return self.lora_a.shape[1]

    def alpha_value(self, use_rslora: bool) -> float:
        """The recorded alpha if it gives this scale, else one that does exactly."""
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
    # How the adapter was initialised, as PEFT records it: True (the default init) or a
    # name ("gaussian", "pissa", "pissa_niter_4", "olora", "loftq"; `layers.init`). The
    # base-changing ones mean the adapter belongs to the base that init made.
    init_lora_weights: bool | str = True

    @property
    def use_dora(self) -> bool:
        """True when the modules are DoRA adapters (each has a magnitude); raises if mixed."""
        kinds = {m.magnitude is not None for m in self.modules.values()}
        if len(kinds) > 1:
            raise AdapterError("an adapter set mixes DoRA modules (with a magnitude) and LoRA ones")
        return kinds == {True}

    def renamed(self, modules: dict[str, ModuleAdapter]) -> AdapterSet:
        """The same settings over other modules (what a rename hook returns)."""
        return replace(self, modules=modules, extra=dict(self.extra))


def lora_pairs(tensors: dict, key_re: re.Pattern, fmt: str, where: str) -> dict[str, dict]:
    """``{module path: {"a": ..., "b": ...}}`` from tensor names matching ``key_re``."""
    pairs: dict[str, dict] = {}
    for key, value in tensors.items():
        m = key_re.match(key)
        if not m:
            raise AdapterError(f"{where}: {fmt} adapter key {key!r} is not a LoRA A/B weight (unsupported)")
        pairs.setdefault(m.group("path"), {})[m.group("ab").lower()] = value
    for path, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            missing = "lora_b" if "a" in ab else "lora_a"
            raise AdapterError(f"{where}: {fmt} adapter has no {missing} for {path}")
    return pairs


def split_magnitudes(tensors: dict, suffix: str) -> tuple[dict, dict]:
    """(the other tensors, ``{module path: magnitude}`` of the keys ending in ``suffix``)."""
    magnitudes = {k[: -len(suffix)]: v for k, v in tensors.items() if k.endswith(suffix)}
    rest = {k: v for k, v in tensors.items() if not k.endswith(suffix)}
    return rest, magnitudes


def attach_magnitudes(modules: dict, magnitudes: dict, use_dora: bool, name: str, where: str) -> dict:
    """``modules`` with their DoRA magnitudes (named ``{path}{name}`` in the file), checked:
    with ``use_dora`` every module needs a float vector of shape (out,) (finite: checked at
    load), else none may have one."""
    if not use_dora:
        if magnitudes:
            key = next(iter(magnitudes)) + name
            raise AdapterError(f"{where}: tensor {key!r} is a DoRA magnitude but the config is not DoRA")
        return modules
    extra = sorted(set(magnitudes) - set(modules))
    if extra:
        raise AdapterError(f"{where}: tensor {extra[0] + name!r} has no lora_a/lora_b beside it")
    out = {}
    for path, m in modules.items():
        key = path + name
        if path not in magnitudes:
            raise AdapterError(f"{where}: DoRA adapter has no {key!r}")
        v = magnitudes[path]
        expected = (m.lora_b.shape[1],)
        if v.dtype not in (mx.float16, mx.bfloat16, mx.float32) or tuple(v.shape) != expected:
            raise AdapterError(
                f"{where}: tensor {key!r} must be a float vector of shape {expected}, "
                f"got {str(v.dtype).rsplit('.', 1)[-1]} of shape {tuple(v.shape)}"
            )
        out[path] = replace(m, magnitude=v)
    return out


def most_common(values):
    return Counter(values).most_common(1)[0][0]
