"""A rank that grows during training: a schedule of ranks by step, and the growth of an adapter and its optimizer moments.

`RankSchedule` is ``rank:step`` pairs (``16:500,32:2000``): the rank of an adapter at each
optimizer step, starting from the rank it was made with. `grow_rank` widens an adapter to a
larger rank: ``lora_a`` gains columns with its init's values (mlx-lm's uniform ±1/√in, or
PEFT's gaussian), ``lora_b`` gains rows of zeros, so the layer's output does not change at
the growth; the optimizer's moments for the new entries start at zero and those of the old
ones are kept bit for bit (Adam's, AdamW's, SGD's, Lion's: every state array shaped like
the parameter).

Why the arrays are widened rather than sliced out of max-rank arrays: ``mx.compile`` traces
again when an input's shape changes, and only then, so a compiled step (ours, and mlx-lm's,
which cannot be rebuilt from outside its trainer) traces once per rank and never per step,
with no Python state for it to miss. The layers need no idea of an active rank: a forward,
a fold, a stack of named adapters and a saved file all see the adapter's true rank (the file
of a grown adapter is a plain LoRA of the final rank), and columns waiting for a growth are
not decayed by AdamW's weight decay meanwhile. The new columns are drawn at the growth, from
``key`` (the trainers derive it from the seed and the step, so a resumed run draws the same).

Adapters whose init changed the base (PiSSA, OLoRA, LoftQ) do not grow: a larger rank would
have to take more of W out of the base in the middle of training.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .init import init_changes_base, init_lora
from .named import holders
from .tree import lora_layers

__all__ = ["RankSchedule", "rank_schedule", "adapter_rank", "grow_rank", "growth_key", "growing"]

_ENTRY = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class RankSchedule:
    """The rank at each step: ``start`` until the first of ``growths`` ((step, rank), steps
    increasing, ranks increasing), then the rank of the last growth at or before the step."""

    start: int
    growths: tuple[tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, spec, start: int, where: str = "--rank-schedule") -> RankSchedule:
        """From ``"rank:step,rank:step,..."`` (or a list of such strings, or of (rank, step)
        pairs); an entry at step 0 must be ``start`` (the adapter's rank, which sets its scale).
        A bad entry raises `ValueError` naming ``where``, the expected and the given value."""
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        growths = []
        for item in items:
            match = _ENTRY.match(item) if isinstance(item, str) else None
            pair = (int(match[1]), int(match[2])) if match else item
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_count(v) for v in pair)):
                raise ValueError(f"{where}: each entry must be RANK:STEP (e.g. 16:500), got {item!r}")
            rank, step = int(pair[0]), int(pair[1])
            if step == 0:
                if rank != start:
                    raise ValueError(
                        f"{where}: the rank at step 0 is the adapter's own (--lora-r / rank {start}, which sets "
                        f"its scale), got {rank}:0; give rank {rank} as the adapter's rank"
                    )
                continue
            growths.append((step, rank))
        last_step, last_rank = 0, start
        for step, rank in growths:
            if step <= last_step or rank <= last_rank:
                raise ValueError(
                    f"{where}: steps and ranks must both increase from rank {start} at step 0, "
                    f"got {rank}:{step} after {last_rank}:{last_step}"
                )
            last_step, last_rank = step, rank
        if start < 1:
            raise ValueError(f"{where}: the starting rank must be >= 1, got {start}")
        return cls(int(start), tuple(growths))

    def rank_at(self, step: int) -> int:
        """The rank the adapter has while optimizer step ``step`` (0-based) runs."""
        rank = self.start
        for at, r in self.growths:
            if at <= step:
                rank = r
        return rank

    @property
    def max_rank(self) -> int:
        return self.growths[-1][1] if self.growths else self.start

    def __str__(self) -> str:
        return ",".join(f"{r}:{s}" for s, r in ((0, self.start), *self.growths))


def rank_schedule(spec, rank: int, init_lora_weights=True, rank_pattern=None) -> RankSchedule:
    """The trainers' ``--rank-schedule`` for an adapter of ``rank``: parsed, and refused (naming
    the flag) with a rank pattern (the schedule is one rank for every module) or an init that
    replaced the base (see the module's docstring)."""
    schedule = RankSchedule.parse(spec, int(rank))
    if rank_pattern:
        raise ValueError("--rank-schedule grows one rank for every module; it cannot follow --rank-pattern")
    if init_changes_base(init_lora_weights):
        raise ValueError(
            f"--rank-schedule needs an init that leaves the base alone (default, gaussian), not "
            f"{init_lora_weights!r}: a larger rank would have to move more of W out of the base mid-run"
        )
    return schedule


def growth_key(seed: int, step: int) -> mx.array:
    """The key a trainer draws step ``step``'s new columns from: a function of the seed and the
    step alone, so a resumed run draws what the uninterrupted one did, on every data-parallel rank."""
    return mx.random.key(int(np.random.default_rng([seed, step, 0x6E0]).integers(2**31)))


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _held(model: nn.Module, name: str | None) -> list[tuple[str, nn.Module, object]]:
    """(parameter path of the holder, its layer, the holder) of adapter ``name`` (None: each
    layer's own) on every LoRA layer holding it."""
    out = []
    for path, layer in lora_layers(model):
        held = holders(layer)
        if name is None:
            out.append((path, layer, layer))
        elif name in held:
            h = held[name]
            out.append((path if h is layer else _join(path, f"adapters.{name}"), layer, h))
    return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name  # a model that is one layer: its path is ""


def adapter_rank(model: nn.Module, name: str | None = None) -> int:
    """The largest rank adapter ``name`` (None: each layer's own) has on any of ``model``'s layers."""
    ranks = [h.lora_a.shape[1] for _, _, h in _held(model, name)]
    if not ranks:
        raise ValueError(f"the model has no LoRA layer{'' if name is None else f' holding adapter {name!r}'}")
    return max(ranks)


def _state_entry(optimizer, path: str):
    """The optimizer's state dict of the parameter at ``path`` (None before it was initialised)."""
    node = optimizer.state
    for part in path.split("."):
        if isinstance(node, list):
            index = int(part)
            node = node[index] if index < len(node) else None
        elif isinstance(node, dict):
            node = node.get(part)
        if node is None:
            return None
    return node if isinstance(node, dict) else None


def _pad(array: mx.array, to: int, axis: int, fill: mx.array | None = None) -> mx.array:
    extra = list(array.shape)
    extra[axis] = to - array.shape[axis]
    fill = mx.zeros(extra, array.dtype) if fill is None else fill.astype(array.dtype)
    return mx.concatenate([array, fill], axis=axis)


def grow_rank(
    model: nn.Module, rank: int, optimizer=None, *, name: str | None = None, key: mx.array | None = None
) -> int:
    """Widen adapter ``name`` (None: each layer's own) to ``rank`` on every layer where it is
    narrower, in place; returns how many modules grew (0: nothing changed).

    ``lora_a``'s new columns get its init's values (mlx-lm's, or PEFT's gaussian when the adapter
    started from it), drawn from ``key`` (one split per module; None: MLX's global random state);
    ``lora_b``'s new rows are zeros. ``optimizer``: its state arrays shaped like a grown
    parameter are zero-padded in place (a compiled step holding that state sees them); one of
    another shape (a factored second moment, Adafactor's) is refused, naming it. Refused too:
    an adapter whose init changed the base (see the module's docstring)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"grow_rank: rank must be an integer >= 1, got {rank!r}")
    todo = [(p, layer, h) for p, layer, h in _held(model, name) if h.lora_a.shape[1] < rank]
    for path, _, h in todo:
        init = getattr(h, "lora_init", None)
        if init is not None and init.changes_base:
            raise ValueError(
                f"grow_rank: {path} started from init_lora_weights={init.init_lora_weights!r}, which moved part of "
                "its weight into the adapter; a larger rank would have to move more out of the base mid-training "
                "(grow adapters made with the default or gaussian init)"
            )
    keys = mx.random.split(key, len(todo)) if key is not None and todo else [None] * len(todo)
    grown = []
    for (path, layer, h), k in zip(todo, keys, strict=True):
        old = h.lora_a.shape[1]
        init = getattr(h, "lora_init", None)
        method = True if init is None else init.init_lora_weights
        scale = h.scale if math.isfinite(h.scale) and h.scale > 0 else 1.0  # only the splitting inits read it
        fresh = init_lora(layer.linear, rank, scale, method, key=k).lora_a[:, old:]
        lora_a, lora_b = _pad(h.lora_a, rank, 1, fresh), _pad(h.lora_b, rank, 0)
        moments = []
        for param, array, axis in (("lora_a", h.lora_a, 1), ("lora_b", h.lora_b, 0)):
            entry = _state_entry(optimizer, _join(path, param)) if optimizer is not None else None
            for field, value in (entry or {}).items():
                if not isinstance(value, mx.array) or value.shape != array.shape:
                    raise ValueError(
                        f"grow_rank: the optimizer's state {_join(path, param)}.{field} has shape "
                        f"{getattr(value, 'shape', type(value).__name__)}, not the parameter's {tuple(array.shape)}: "
                        f"{type(optimizer).__name__}'s state cannot be widened (Adam, AdamW, SGD and Lion's can)"
                    )
                moments.append((entry, field, _pad(value, rank, axis)))
        grown.append((h, lora_a, lora_b, moments))
    mx.eval([(a, b, [m for *_, m in ms]) for _, a, b, ms in grown])
    for h, lora_a, lora_b, moments in grown:  # all computed and checked before any is assigned
        h.lora_a, h.lora_b = lora_a, lora_b
        for entry, field, value in moments:
            entry[field] = value
    return len(grown)


def growing(
    model: nn.Module, schedule: RankSchedule, optimizer, *, name: str | None = None, seed: int = 0, say=None
) -> Callable[[int], bool]:
    """A trainer's hook to run before each optimizer step ``step``: adapter ``name`` (and the
    optimizer's moments) grown to ``schedule.rank_at(step)``, the new columns drawn from
    `growth_key` (seed, step); True when it grew (the next step traces again). ``say(text)``
    reports a growth."""

    def prepare(step: int) -> bool:
        rank = schedule.rank_at(step)
        grown = grow_rank(model, rank, optimizer, name=name, key=growth_key(seed, step))
        if grown and say is not None:
            say(f"step {step}: LoRA rank {rank} on {grown} modules (--rank-schedule {schedule})")
        return grown > 0

    return prepare
