"""`AdapterConfig`: what `add_adapter` builds, checked in one place.

The keys are mlx-lm's ``lora_parameters`` (``rank``, ``scale``, ``dropout``, ``keys``) with its
defaults (rank 8, scale 20, dropout 0), plus what the package's configs already know:
``num_layers`` (mlx-lm's: the last n blocks of each ``layers`` list; None or <= 0: all),
``alpha`` and ``use_rslora`` (``scale = alpha / r``, or ``alpha / sqrt(r)``; give ``scale`` or
``alpha``), ``use_dora``, and ``max_rank``: the width the adapter's tensors are given
(zero columns of ``lora_a`` and rows of ``lora_b`` past ``rank``, which change nothing), so a
later `hotswap_adapter` can put an adapter of any rank up to it in place. PEFT's
``init_lora_weights`` (`layers.init`: how the adapter starts) and ``rank_pattern`` /
``alpha_pattern`` (other ranks and alphas for the modules they name, `layers.patterns`) are
taken too. An unknown key is refused, naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..layers.init import check_init
from ..layers.patterns import check_patterns, module_rank_scale
from ..layers.tree import lora_scale

__all__ = ["AdapterConfig"]

_DEFAULTS = {"rank": 8, "scale": 20.0, "dropout": 0.0}  # mlx-lm's lora_parameters defaults


def _bad(where: str, key: str, expected: str, value) -> ValueError:
    return ValueError(f"{where}: {key!r} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class AdapterConfig:
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    keys: tuple[str, ...] | None = None  # module paths or their endings; None: every linear in the blocks
    num_layers: int | None = None
    alpha: float | None = None
    use_rslora: bool = False
    use_dora: bool = False
    max_rank: int | None = None
    init_lora_weights: bool | str = True  # PEFT's: True (mlx-lm's init) or an init's name
    rank_pattern: dict | None = None  # {module-path pattern: rank}, PEFT's matching rule
    alpha_pattern: dict | None = None  # {module-path pattern: alpha}

    @property
    def width(self) -> int:
        """The rank the adapter's tensors are allocated with (``max_rank``, else ``rank``)."""
        return self.max_rank or self.rank

    def module_rank_scale(self, path: str) -> tuple[int, float, int]:
        """``(rank, scale, width)`` of the adapter on the module at ``path``: the patterns' rank
        and alpha where one names it (the scale from them, PEFT's rule), allocated at least
        ``max_rank`` wide."""
        rank, scale = module_rank_scale(
            path,
            self.rank,
            self.scale,
            self.rank_pattern,
            self.alpha_pattern,
            alpha=self.alpha,
            use_rslora=self.use_rslora,
        )
        return rank, scale, max(rank, self.max_rank or 0)

    @classmethod
    def parse(cls, config, where: str = "adapter config") -> AdapterConfig:
        """An `AdapterConfig` from a dict of the keys above (or one already built), checked."""
        if isinstance(config, AdapterConfig):
            return config
        if not isinstance(config, dict):
            raise TypeError(f"{where}: expected a dict of lora_parameters keys, got {type(config).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(known)}")
        c = {**_DEFAULTS, **config}
        rank = c["rank"]
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise _bad(where, "rank", "an integer >= 1", rank)
        max_rank = c.get("max_rank")
        if max_rank is not None and (not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < rank):
            raise _bad(where, "max_rank", f"an integer >= rank ({rank}) or None", max_rank)
        for key in ("use_rslora", "use_dora"):
            if not isinstance(c.get(key, False), bool):
                raise _bad(where, key, "true or false", c[key])
        use_rslora = c.get("use_rslora", False)
        dropout = c["dropout"]
        if not _number(dropout) or not 0.0 <= dropout < 1.0:
            raise _bad(where, "dropout", "a number in [0, 1)", dropout)
        alpha = c.get("alpha")
        if alpha is not None and not _number(alpha):
            raise _bad(where, "alpha", "a finite number", alpha)
        scale = config.get("scale")
        if scale is not None and not _number(scale):
            raise _bad(where, "scale", "a finite number", scale)
        if alpha is not None and scale is not None and lora_scale(rank, alpha, use_rslora) != scale:
            raise ValueError(f"{where}: 'scale' {scale} and 'alpha' {alpha} disagree for rank {rank}; give one of them")
        if scale is None:
            scale = lora_scale(rank, alpha, use_rslora) if alpha is not None else _DEFAULTS["scale"]
        keys = c.get("keys")
        if keys is not None:
            if isinstance(keys, str) or not all(isinstance(k, str) and k for k in keys) or not keys:
                raise _bad(where, "keys", "a non-empty list of module paths", keys)
            keys = tuple(keys)
        init = check_init(c.get("init_lora_weights", True), where)
        patterns = {k: c.get(k) for k in ("rank_pattern", "alpha_pattern")}
        check_patterns(patterns["rank_pattern"], patterns["alpha_pattern"], where)
        num_layers = c.get("num_layers")
        if num_layers is not None and (not isinstance(num_layers, int) or isinstance(num_layers, bool)):
            raise _bad(where, "num_layers", "an integer or None", num_layers)
        return cls(
            rank=rank,
            scale=float(scale),
            dropout=float(dropout),
            keys=keys,
            num_layers=num_layers if num_layers is None or num_layers > 0 else None,
            alpha=None if alpha is None else float(alpha),
            use_rslora=use_rslora,
            use_dora=c.get("use_dora", False),
            max_rank=max_rank,
            init_lora_weights=init,
            rank_pattern=dict(patterns["rank_pattern"]) if patterns["rank_pattern"] else None,
            alpha_pattern=dict(patterns["alpha_pattern"]) if patterns["alpha_pattern"] else None,
        )


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
