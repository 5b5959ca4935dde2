"""`AdapterSet`: the in-memory form every adapter format is read into and written from.

An `AdapterSet` maps a module path (``model.layers.3.self_attn.q_proj``,
``backbone.layers.0.mlp.up_proj``) to ``lora_a (in, r)``, ``lora_b (r, out)`` and the
multiplier ``scale``, so the module's output is ``x @ W.T + scale * (x @ lora_a) @ lora_b``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import mlx.core as mx

from ..layers.tree import alpha_for, lora_scale
from .checks import AdapterError

__all__ = ["ModuleAdapter", "AdapterSet", "lora_pairs", "most_common"]


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

    def renamed(self, modules: dict[str, ModuleAdapter]) -> AdapterSet:
        """The same settings over other modules (what a rename hook returns)."""
        return AdapterSet(modules, self.dropout, self.use_rslora, self.num_layers, dict(self.extra))


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


def most_common(values):
    return Counter(values).most_common(1)[0][0]
