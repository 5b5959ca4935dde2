"""Per-module rank and alpha: PEFT's ``rank_pattern`` / ``alpha_pattern`` keys, matched without regex.

Pattern keys may come from untrusted files and command lines, so they are never run as
regular expressions (PEFT compiles them, and ``(.*)*x`` then backtracks for minutes).
They are matched as PEFT's rule reads for module paths: a key matches a path equal to it
or ending in ``.{key}`` — so ``q_proj``, ``layers.0.self_attn.q_proj`` and a full path
all work. Also accepted, as PEFT users write them: ``\\.`` for a dot, a leading ``^``
(the key must match the whole path), a trailing ``$`` (no-op) and ``\\d+`` / ``[0-9]+``
as a whole component (any layer index). Anything else is refused with an error naming
the key. Where several keys match, the longest (most components) wins (PEFT takes the
first in the dict's order; the longest is the one a reader of the config expects).

Used when adapters are read (`adapters.peft_format`) and when they are made
(`module_rank_alpha`, `module_rank_scale`: every entry point that builds adapters), so both
sides agree on which module a key names.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from .tree import alpha_for, lora_scale

__all__ = [
    "PatternError",
    "ModulePattern",
    "parse_pattern",
    "pattern_value",
    "module_rank_alpha",
    "module_rank_scale",
    "check_patterns",
]

MAX_PATTERN_CHARS = 512
_DIGITS = object()  # a component matching any run of decimal digits
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class PatternError(ValueError):
    """A ``rank_pattern`` / ``alpha_pattern`` key or value that cannot be used; names it."""


class ModulePattern:
    """A parsed pattern key: components (names or `_DIGITS`), anchored at the start or not."""

    def __init__(self, components: tuple, anchored: bool):
        self.components = components
        self.anchored = anchored

    def matches(self, path: str) -> bool:
        parts = path.split(".")
        n = len(self.components)
        if len(parts) < n or (self.anchored and len(parts) != n):
            return False
        for want, got in zip(self.components, parts[len(parts) - n :], strict=True):
            if want is _DIGITS:
                if not got or any(c not in "0123456789" for c in got):
                    return False
            elif want != got:
                return False
        return True


def parse_pattern(key, field: str, where: str) -> ModulePattern:
    """``key`` of ``rank_pattern``/``alpha_pattern`` as a `ModulePattern` (linear-time, no regex)."""
    if not isinstance(key, str) or not key:
        raise PatternError(f"{where}: {field} key {key!r} must be a non-empty module path")
    if len(key) > MAX_PATTERN_CHARS:
        raise PatternError(
            f"{where}: {field} key {key[:40]!r}... is {len(key)} characters; at most {MAX_PATTERN_CHARS}"
        )
    body = key
    anchored = body.startswith("^")
    body = body[1:] if anchored else body
    body = body[:-1] if body.endswith("$") and not body.endswith("\\$") else body
    components = []
    for comp in body.replace("\\.", ".").split("."):
        if comp in ("\\d+", "[0-9]+"):
            components.append(_DIGITS)
        elif comp and all(c in _NAME_CHARS for c in comp):
            components.append(comp)
        else:
            raise PatternError(
                f"{where}: {field} key {key!r} is not a module path: expected dot-separated names "
                "(letters, digits, _ and -), optionally with a leading ^, a trailing $ and \\d+ "
                "for a layer index; other regular expressions are not supported"
            )
    return ModulePattern(tuple(components), anchored)


def pattern_value(patterns, path: str, default):
    """The value of the longest of ``patterns`` (``(ModulePattern, value)`` pairs) matching
    ``path``, or ``default`` when none does."""
    best, best_len = default, -1
    for pattern, value in patterns:
        if len(pattern.components) > best_len and pattern.matches(path):
            best, best_len = value, len(pattern.components)
    return best


def _parsed(mapping, field: str, is_valid, expected: str) -> list[tuple[ModulePattern, object]]:
    if mapping is None:
        return []
    if not isinstance(mapping, Mapping):
        raise PatternError(f"{field} must be a dict of module-path patterns, got {type(mapping).__name__}")
    out = []
    for key, value in mapping.items():
        pattern = parse_pattern(key, field, field)
        if isinstance(value, bool) or not is_valid(value):
            raise PatternError(f"{field}: the value of {key!r} must be {expected}, got {value!r}")
        out.append((pattern, value))
    return out


def _is_rank(value) -> bool:
    return isinstance(value, numbers.Integral) and value >= 1


def _is_alpha(value) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)


def module_rank_alpha(
    path: str,
    rank: int,
    alpha: float,
    rank_pattern: Mapping | None = None,
    alpha_pattern: Mapping | None = None,
) -> tuple[int, float]:
    """``(rank, alpha)`` of the module at ``path``: the longest matching key of
    ``rank_pattern`` / ``alpha_pattern`` (each ``{pattern key: value}``, or None), else
    ``rank`` / ``alpha``. Its scale is ``layers.lora_scale(rank, alpha, use_rslora)``.

    Keys and values are checked (a `PatternError` names the field and the key): ranks
    are integers >= 1, alphas finite numbers.
    """
    rank = pattern_value(_parsed(rank_pattern, "rank_pattern", _is_rank, "an integer >= 1"), path, rank)
    alpha = pattern_value(_parsed(alpha_pattern, "alpha_pattern", _is_alpha, "a finite number"), path, alpha)
    return int(rank), float(alpha)


def module_rank_scale(
    path: str,
    rank: int,
    scale: float,
    rank_pattern: Mapping | None = None,
    alpha_pattern: Mapping | None = None,
    *,
    alpha: float | None = None,
    use_rslora: bool = False,
) -> tuple[int, float]:
    """``(rank, scale)`` of the module at ``path`` for an adapter of ``rank`` and ``scale`` (and
    ``alpha``, when the caller has one; else the alpha that gives ``scale`` at ``rank``), as PEFT
    resolves its patterns: the alpha stays the adapter's unless ``alpha_pattern`` names the
    module, and the scale is ``lora_scale(rank, alpha, use_rslora)``. A module no pattern names
    keeps ``scale`` exactly."""
    alpha = alpha_for(rank, scale, use_rslora) if alpha is None else float(alpha)
    module_rank, module_alpha = module_rank_alpha(path, rank, alpha, rank_pattern, alpha_pattern)
    if (module_rank, module_alpha) == (rank, alpha):
        return int(rank), float(scale)
    return module_rank, lora_scale(module_rank, module_alpha, use_rslora)


def check_patterns(rank_pattern: Mapping | None, alpha_pattern: Mapping | None, where: str, paths=None) -> None:
    """Check both patterns' keys and values (a `PatternError` names ``where``, the field and the
    key); with ``paths`` (the modules being adapted), also refuse a key that names none of them:
    a typo would otherwise leave its module at the common rank without a word."""
    for field, mapping, is_valid, expected in (
        ("rank_pattern", rank_pattern, _is_rank, "an integer >= 1"),
        ("alpha_pattern", alpha_pattern, _is_alpha, "a finite number"),
    ):
        try:
            parsed = _parsed(mapping, field, is_valid, expected)
        except PatternError as e:
            raise PatternError(f"{where}: {e}") from None
        for (pattern, _), key in zip(parsed, mapping or {}, strict=True):
            if paths is not None and not any(pattern.matches(p) for p in paths):
                some = ", ".join(sorted(paths)[:3])
                raise PatternError(f"{where}: {field} key {key!r} names none of the adapted modules (e.g. {some})")
