"""Weighted merges of LoRA adapters into a new one (PEFT's ``add_weighted_adapter``), without a model.

`merge_adapters` combines `AdapterSet`s module by module (`merge_module`), in float32 on
the CPU stream (exact float32 on every device: no TF32 GEMMs, and ``mx.linalg`` runs
there). Every method follows PEFT's definition, with ``cᵢ = wᵢ · sᵢ`` where ``sᵢ`` is
*that module's own* scale in adapter i (rsLoRA's ``alpha / sqrt(r)`` and rank/alpha
patterns included):

- ``cat``: ranks concatenated, ``A = [c₁A₁ … cₙAₙ]``, ``B = [B₁; …; Bₙ]``: exactly
  ``Σ cᵢ Aᵢ Bᵢ``, rank ``Σ rᵢ`` per module.
- ``svd``: the best rank-k approximation of ``Σ cᵢ Aᵢ Bᵢ`` (k = ``svd_rank``, default the
  largest input rank; at most ``min(in, out)``), from QRs of the concatenated factors and
  an SVD of their small core, so no ``in × out`` delta is ever formed. ``A`` gets the
  orthonormal singular vectors, ``B`` the singular values (PEFT's split); a k above the
  delta's rank is filled with further orthonormal directions of ``A`` and zero rows of ``B``.
- ``linear``, ``magnitude_prune``, ``ties``, ``dare_linear``, ``dare_ties``: act on A and
  B separately (not on the product; so ``linear`` is not ``Σ cᵢ Aᵢ Bᵢ``: the cross terms
  stay, as in PEFT), with weights ``sign(cᵢ)·sqrt|cᵢ|`` on A and ``sqrt|cᵢ|`` on B, and
  need equal ranks per module. Pruning keeps the top ``int(density · size)`` entries by
  magnitude (ties / magnitude_prune) or each entry with probability ``density``, rescaled
  by ``1 / density`` (dare); ties / dare_ties keep the entries whose sign agrees with the
  elected one (``total``: the sign of the sum; ``frequency``: the commoner sign) and divide
  by how many agreed.

The merged adapter has scale 1 (PEFT's ``lora_alpha = r``) and ``use_rslora`` off, so
its delta is what was merged whatever the sources used (PEFT keeps the first source's
rsLoRA flag and scales the result by ``sqrt(r)``: peft#3761). A module missing from an
adapter is a zero delta there, as in PEFT; the result covers every module of any input.
DoRA adapters are refused (see `merge_adapters`).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Iterable, Sequence

import mlx.core as mx

from .adapter_set import AdapterSet, ModuleAdapter

__all__ = ["MERGE_METHODS", "SIGN_METHODS", "MergeArgumentError", "merge_adapters", "merge_module"]

MERGE_METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")
_PRUNED = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # take `density`
_SIGNED = ("ties", "dare_ties")  # elect a sign
_RANDOM = ("dare_linear", "dare_ties")  # take `seed`
_SVD_DIRECTIONS_SEED = 0  # svd's extra directions (rank above the delta's) are fixed, not seeded


class MergeArgumentError(ValueError):
    """A bad merge argument; ``argument`` is its name (``density``, ``weights``, ...)."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


def check_merge_arguments(n, weights, combination_type, density, svd_rank, majority_sign_method, seed) -> list[float]:
    """The weights as floats, once every argument is known good for ``n`` adapters."""
    if combination_type not in MERGE_METHODS:
        raise MergeArgumentError(
            "combination_type", f"combination_type must be one of {MERGE_METHODS}, got {combination_type!r}"
        )
    if n < 1:
        raise MergeArgumentError("adapters", "merging needs at least one adapter, got none")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise MergeArgumentError("weights", f"weights must be a sequence of numbers, got {type(weights).__name__}")
    weights = list(weights)
    if len(weights) != n:
        raise MergeArgumentError("weights", f"got {len(weights)} weights for {n} adapters (one each)")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise MergeArgumentError("weights", f"weights must be finite numbers, got {w!r}")
    if combination_type in _PRUNED:
        if density is None:
            raise MergeArgumentError("density", f"density is required by {combination_type} (a fraction in (0, 1])")
        if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0.0 < density <= 1.0:
            raise MergeArgumentError("density", f"density must be in (0, 1], got {density!r}")
    elif density is not None:
        raise MergeArgumentError("density", f"density applies to {_PRUNED} only, not {combination_type}")
    if combination_type == "svd":
        if svd_rank is not None and (not _is_integer(svd_rank) or svd_rank < 1):
            raise MergeArgumentError("svd_rank", f"svd_rank must be an integer >= 1, got {svd_rank!r}")
    elif svd_rank is not None:
        raise MergeArgumentError("svd_rank", f"svd_rank applies to svd only, not {combination_type}")
    if majority_sign_method not in SIGN_METHODS:
        raise MergeArgumentError(
            "majority_sign_method", f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}"
        )
    if seed is not None:
        if combination_type not in _RANDOM:
            raise MergeArgumentError("seed", f"seed applies to {_RANDOM} only, not {combination_type}")
        if not _is_integer(seed) or not 0 <= seed < 2**63:
            raise MergeArgumentError("seed", f"seed must be an integer in [0, 2**63), got {seed!r}")
    return [float(w) for w in weights]


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def module_key(seed: int, path: str) -> mx.array:
    """The random key of one module's merge: a function of (seed, module path) alone, so a
    module's masks do not depend on which other modules (or in which order) are merged.
    Adapter i's A and B take ``mx.random.split(key, 2 n)[2 i]`` and ``[2 i + 1]``."""
    digest = hashlib.blake2b(f"{int(seed)}/{path}".encode(), digest_size=8).digest()
    return mx.random.key(int.from_bytes(digest, "little"))


# --- the per-tensor steps (PEFT's merge_utils, on MLX arrays) ---------------------------


def prune_by_magnitude(t: mx.array, density: float) -> mx.array:
    """``t`` with all but its ``int(density · t.size)`` largest-magnitude entries zeroed
    (which of equal magnitudes survive at the cut is unspecified, as with ``torch.topk``)."""
    if density >= 1.0:
        return t
    k = int(density * t.size)
    keep = mx.zeros((t.size,), dtype=t.dtype)
    if k > 0:
        keep[mx.argpartition(-mx.abs(t.reshape(-1)), kth=k - 1)[:k]] = 1
    return t * keep.reshape(t.shape)


def prune_at_random(t: mx.array, density: float, key: mx.array) -> mx.array:
    """Each entry kept with probability ``density`` and rescaled by ``1 / density`` (DARE)."""
    if density >= 1.0:
        return t
    return mx.where(mx.random.bernoulli(density, t.shape, key=key), t / density, 0.0)


def majority_sign_mask(stacked: mx.array, method: str) -> mx.array:
    """Per entry of ``stacked (n, ...)``: does tensor i's sign agree with the elected one
    (``+`` where the sum, or the count of signs, is >= 0)? Zeros never agree."""
    signs = mx.sign(stacked)
    votes = stacked.sum(axis=0) if method == "total" else signs.sum(axis=0)
    return signs == mx.where(votes >= 0, 1.0, -1.0)


def disjoint_merge(weighted: mx.array, agree: mx.array) -> mx.array:
    """The mean of the agreeing entries of ``weighted (n, ...)`` (0 where none agree)."""
    return (weighted * agree).sum(axis=0) / mx.maximum(agree.sum(axis=0), 1)


def combine_tensors(tensors, weights, method, density=None, majority_sign_method="total", keys=None) -> mx.array:
    """One factor (all the adapters' A, or all their B) merged by ``method`` with ``weights``."""
    if method in ("ties", "magnitude_prune"):
        tensors = [prune_by_magnitude(t, density) for t in tensors]
    elif method in _RANDOM:
        tensors = [prune_at_random(t, density, k) for t, k in zip(tensors, keys, strict=True)]
    stacked = mx.stack(tensors)
    weighted = mx.array(weights, dtype=mx.float32).reshape(-1, *([1] * (stacked.ndim - 1))) * stacked
    if method in _SIGNED:
        return disjoint_merge(weighted, majority_sign_mask(stacked, majority_sign_method))
    return weighted.sum(axis=0)


# --- one module -----------------------------------------------------------------------------


def _check_module(adapters: Sequence[ModuleAdapter], name: str) -> tuple[int, int]:
    if not adapters:
        raise MergeArgumentError("adapters", f"{name}: no adapter to merge")
    shapes = set()
    for i, m in enumerate(adapters):
        if not isinstance(m, ModuleAdapter):
            raise MergeArgumentError("adapters", f"{name}: adapter {i} is a {type(m).__name__}, not a ModuleAdapter")
        if m.magnitude is not None:
            raise MergeArgumentError("adapters", f"{name}: adapter {i} is DoRA; {_DORA_WHY}")
        a, b = m.lora_a, m.lora_b
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or a.shape[1] < 1:
            raise MergeArgumentError(
                "adapters",
                f"{name}: adapter {i}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} are not (in, r), (r, out)",
            )
        if not isinstance(m.scale, numbers.Real) or not math.isfinite(m.scale):
            raise MergeArgumentError("adapters", f"{name}: adapter {i}: scale must be a finite number, got {m.scale!r}")
        shapes.add((a.shape[0], b.shape[1]))
    if len(shapes) > 1:
        raise MergeArgumentError(
            "adapters", f"{name}: the adapters adapt different shapes (in, out) {sorted(shapes)}: not the same module"
        )
    return shapes.pop()


def _concatenated(adapters, coefficients):
    """``(A, B)`` with ``A @ B == Σ cᵢ Aᵢ Bᵢ`` (PEFT's ``cat``: the coefficient on A)."""
    a = mx.concatenate([c * m.lora_a.astype(mx.float32) for m, c in zip(adapters, coefficients, strict=True)], axis=1)
    b = mx.concatenate([m.lora_b.astype(mx.float32) for m in adapters], axis=0)
    return a, b


def _orthonormal_complement(basis: mx.array, count: int, key: mx.array) -> mx.array:
    """``count`` orthonormal columns orthogonal to the orthonormal columns of ``basis``."""
    g = mx.random.normal((basis.shape[0], count), key=key)
    for _ in range(2):  # twice is enough for Gram-Schmidt against a fixed basis
        g = g - basis @ (basis.T @ g)
    q, _ = mx.linalg.qr(g)
    return q


def _truncated_svd(a: mx.array, b: mx.array, rank: int, key: mx.array | None) -> tuple[mx.array, mx.array]:
    """``(A', B')`` of rank ``rank`` with ``A' @ B'`` the best rank-``rank`` approximation
    of ``a @ b`` (``a (in, R)``, ``b (R, out)``), from ``a = Qa Ra`` and ``bᵀ = Qb Rb``:
    ``a @ b = Qa (Ra Rbᵀ) Qbᵀ`` and the core ``Ra Rbᵀ`` is at most R × R."""
    qa, ra = mx.linalg.qr(a)
    qb, rb = mx.linalg.qr(b.T)
    u, s, vt = mx.linalg.svd(ra @ rb.T)
    n = min(rank, s.shape[0])
    lora_a = qa @ u[:, :n]  # left singular vectors: orthonormal columns
    lora_b = s[:n, None] * (vt[:n] @ qb.T)
    if rank > n:
        extra = _orthonormal_complement(lora_a, rank - n, key if key is not None else mx.random.key(_fresh_seed()))
        lora_a = mx.concatenate([lora_a, extra], axis=1)
        lora_b = mx.concatenate([lora_b, mx.zeros((rank - n, lora_b.shape[1]), dtype=lora_b.dtype)], axis=0)
    return lora_a, lora_b


def _per_factor(adapters, coefficients, method, density, majority_sign_method, key, name):
    ranks = [m.r for m in adapters]
    if len(set(ranks)) > 1:
        raise MergeArgumentError(
            "adapters",
            f"{name}: {method} adds the adapters' lora_a and lora_b entry by entry, so they need one rank "
            f"here; got ranks {ranks} (cat and svd merge mixed ranks)",
        )
    root = [math.sqrt(abs(c)) for c in coefficients]
    signed = [math.copysign(r, c) for r, c in zip(root, coefficients, strict=True)]  # the sign on A only
    keys = None
    if method in _RANDOM:
        keys = mx.random.split(key if key is not None else mx.random.key(_fresh_seed()), 2 * len(adapters))
    factors = []
    for side, weights in ((0, signed), (1, root)):
        tensors = [(m.lora_a if side == 0 else m.lora_b).astype(mx.float32) for m in adapters]
        side_keys = None if keys is None else [keys[2 * i + side] for i in range(len(adapters))]
        factors.append(combine_tensors(tensors, weights, method, density, majority_sign_method, side_keys))
    return factors


def merge_module(
    adapters: Sequence[ModuleAdapter],
    weights: Sequence[float],
    combination_type: str = "svd",
    *,
    density: float | None = None,
    svd_rank: int | None = None,
    majority_sign_method: str = "total",
    key: mx.array | None = None,
    name: str = "module",
) -> ModuleAdapter:
    """One module's adapters merged into one (scale 1, float32); see the module docstring.

    ``svd_rank`` defaults to the largest rank here. ``key`` (an ``mx.random.key``) draws
    the dare masks and svd's extra directions (None: MLX's global random state);
    ``name`` labels errors.
    """
    weights = check_merge_arguments(
        len(adapters), weights, combination_type, density, svd_rank, majority_sign_method, None
    )
    in_dims, out_dims = _check_module(adapters, name)
    coefficients = [w * float(m.scale) for m, w in zip(adapters, weights, strict=True)]
    with mx.stream(mx.cpu):
        if combination_type == "cat":
            lora_a, lora_b = _concatenated(adapters, coefficients)
        elif combination_type == "svd":
            rank = int(min(svd_rank or max(m.r for m in adapters), in_dims, out_dims))
            lora_a, lora_b = _truncated_svd(*_concatenated(adapters, coefficients), rank, key)
        else:
            lora_a, lora_b = _per_factor(
                adapters, coefficients, combination_type, density, majority_sign_method, key, name
            )
        mx.eval(lora_a, lora_b)
    return ModuleAdapter(lora_a, lora_b, 1.0, float(lora_a.shape[1]))


def _fresh_seed() -> int:
    return int(mx.random.randint(0, 2**31 - 1).item())


_DORA_WHY = (
    "a DoRA module's output is rescaled row by row to magnitude / ||W + scale * (A B)^T||, which depends on "
    "the base weight W, so a weighted merge of DoRA adapters is no LoRA delta and their magnitudes cannot be "
    "combined without W (PEFT merges them silently wrong: peft#3761). Fold each into the base weight instead "
    "(fuse), or merge LoRA adapters"
)


def merge_adapters(
    adapters: Sequence[AdapterSet],
    weights: Sequence[float],
    combination_type: str = "svd",
    *,
    density: float | None = None,
    svd_rank: int | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
) -> AdapterSet:
    """A new `AdapterSet` merging ``adapters`` with ``weights`` by ``combination_type``
    (one of `MERGE_METHODS`, PEFT's names and default), module by module.

    ``density`` (in (0, 1]) is for the pruning methods and required by them; ``svd_rank``
    (default: the largest rank of any input module) for ``svd``; ``majority_sign_method``
    (``total`` or ``frequency``) for ``ties`` and ``dare_ties``; ``seed`` for the dare
    masks (None: drawn from MLX's global random state, so ``mx.random.seed`` makes it
    repeatable). An argument a method does not use is refused rather than ignored.
    DoRA adapters are refused (`MergeArgumentError` naming why); every module gets scale
    1 and the merged tensors in float32; dropout and extra settings come from the first
    adapter, as in PEFT. Unlike PEFT, one adapter is merged by the method asked for (PEFT
    switches to ``linear``).
    """
    weights = check_merge_arguments(
        len(adapters), weights, combination_type, density, svd_rank, majority_sign_method, seed
    )
    for i, a in enumerate(adapters):
        if not isinstance(a, AdapterSet):
            raise MergeArgumentError("adapters", f"adapters[{i}] is a {type(a).__name__}, not an AdapterSet")
        if not a.modules:
            raise MergeArgumentError("adapters", f"adapters[{i}] has no modules")
        if a.use_dora:  # raises for a set mixing DoRA and LoRA modules
            raise MergeArgumentError("adapters", f"adapters[{i}] is a DoRA adapter: {_DORA_WHY}")
    key_seed = None  # the seed of every module's key, for the methods that draw
    if combination_type in _RANDOM:
        key_seed = seed if seed is not None else _fresh_seed()
    elif combination_type == "svd":
        key_seed = _SVD_DIRECTIONS_SEED
        svd_rank = svd_rank or max(m.r for a in adapters for m in a.modules.values())
    modules = {}
    for path in sorted({p for a in adapters for p in a.modules}):
        present = [(a.modules[path], w) for a, w in zip(adapters, weights, strict=True) if path in a.modules]
        modules[path] = merge_module(
            [m for m, _ in present],
            [w for _, w in present],
            combination_type,
            density=density,
            svd_rank=int(svd_rank) if svd_rank is not None else None,
            majority_sign_method=majority_sign_method,
            key=module_key(key_seed, path) if key_seed is not None else None,
            name=path,
        )
    return AdapterSet(modules, adapters[0].dropout, False, _num_layers(adapters), dict(adapters[0].extra))


def _num_layers(adapters) -> int | None:
    """mlx-lm's count of adapted blocks that reaches every input's (-1: all of them)."""
    counts = [a.num_layers for a in adapters]
    if None in counts:
        return None  # the writer works it out from the module paths
    return -1 if any(c < 0 for c in counts) else max(counts)
