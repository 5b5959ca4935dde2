"""How an adapter starts: PEFT's ``init_lora_weights`` as pure functions of a base layer and a rank.

Each init takes a base (``nn.Linear``, or ``nn.QuantizedLinear`` where it makes sense) and
returns a `LoRAInit`: ``lora_a (in, r)`` and ``lora_b (r, out)`` in float32 (mlx-lm keeps
its adapters in float32), and, for the inits that move part of W into the adapter, the
new base layer. The input is never changed. With ``s`` the layer's ``scale``, every init
keeps the layer's output at the start: ``base' + s·(lora_a lora_b)ᵀ == W`` (exactly up to
rounding where the base stays dense; up to the quantization error for a quantized one).

- ``default`` (PEFT's ``True``): mlx-lm's, `init_lora_weights` (``lora_a`` uniform
  in ±1/√in, ``lora_b`` zeros).
- ``gaussian``: PEFT's ``lora_A ~ N(0, std = 1/r)``, ``lora_B`` zeros.
- ``pissa`` / ``pissa_niter_N``: ``W = U S Vᵀ``; the top r singular triplets move into the
  adapter, split evenly after dividing by the scale (``lora_a = V_r √(S_r/s)``,
  ``lora_b = √(S_r/s) U_rᵀ``), and the base becomes ``W − s·(lora_a lora_b)ᵀ``. Exact
  SVD, or `randomized_svd` with N subspace iterations (PEFT's ``svd_lowrank(W, r, niter)``,
  with 10 oversampling directions, which PEFT does without).
  A quantized base is refused, as PEFT refuses it: initialise on the dense weight, then
  quantize the residual (or use ``loftq``).
- ``olora``: PEFT's QR split ``W = Q R``, ``lora_b = Q_rᵀ`` (orthonormal rows),
  ``lora_a = R_rᵀ``, base ``W − s·Q_r R_r``. As in PEFT nothing is divided by the scale, so
  with ``s ≠ 1`` the base loses ``s`` times W's first r QR components. A quantized base is
  dequantized, split and re-quantized with its own group size, bits and mode (PEFT does
  the same for bitsandbytes bases).
- ``loftq``: from a dense W, alternate ``Q_t = quant(W − s·(A B)ᵀ)`` (MLX's affine
  quantization, ``bits`` / ``group_size``) and ``A, B`` = the best rank-r fit of
  ``(W − dequant(Q_t)) / s``; returns the last ``Q`` as a new ``nn.QuantizedLinear`` and
  the error ``‖W − dequant(Q_t) − s·(A B)ᵀ‖_F`` of each alternation. PEFT fits ``A B`` to
  the error itself, ignoring the scale (right only for ``s = 1``); we divide by it, so the
  layer's output starts as close to W as the fit allows whatever the scale.

All SVD/QR work is float32 on the CPU stream (``mx.linalg`` runs there; no TF32 GEMMs).
The base's new weight is made by the one fold (`fold.fold_lora` with scale ``−s``): float32,
cast once to the base's dtype, a quantized base re-quantized with its own settings.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..ops.checks import QUANT_BITS, QUANT_GROUP_SIZES, fail
from .fold import base_dims, dense_weight, fold_lora

__all__ = [
    "init_lora_weights",
    "is_default_init",
    "check_init",
    "init_changes_base",
    "warn_base_changed",
    "INIT_METHODS",
    "LoRAInit",
    "init_lora",
    "default_init",
    "gaussian_init",
    "pissa_init",
    "olora_init",
    "loftq_init",
    "randomized_svd",
]

# PEFT's names; "pissa_niter_N" (N >= 0 subspace iterations) is pissa with `randomized_svd`.
INIT_METHODS = ("default", "gaussian", "pissa", "pissa_niter_N", "olora", "loftq")
_NITER_PREFIX = "pissa_niter_"


@dataclass(frozen=True)
class LoRAInit:
    """An init's result: the adapter, and the new base when the init changed it."""

    lora_a: mx.array  # (in, r) float32
    lora_b: mx.array  # (r, out) float32
    base: nn.Module | None = None  # the new base layer; None: keep the old one
    init_lora_weights: bool | str = True  # what to record in the adapter's config (PEFT's value)
    errors: tuple[float, ...] = ()  # loftq: ‖W − dequant(Q) − s·(A B)ᵀ‖_F after each alternation

    @property
    def changes_base(self) -> bool:
        """True when the layer must use `base` instead of its old base (the caller says so)."""
        return self.base is not None


def init_lora_weights(input_dims: int, output_dims: int, r: int, key: mx.array | None = None):
    """mlx-lm's adapter init: ``lora_a (in, r)`` uniform in +-1/sqrt(in), ``lora_b (r, out)``
    zeros, so a new layer computes exactly its base (``key``: an ``mx.random.key``, else
    MLX's global random state). PEFT's ``init_lora_weights=True`` draws the same
    distribution (kaiming-uniform with ``a = sqrt(5)`` on ``(r, in)``: bound 1/sqrt(in))."""
    bound = 1 / math.sqrt(input_dims)
    lora_a = mx.random.uniform(low=-bound, high=bound, shape=(input_dims, r), key=key)
    return lora_a, mx.zeros(shape=(r, output_dims))


def is_default_init(init_lora_weights) -> bool:
    """True for PEFT's ``True`` and ``"default"``: mlx-lm's init, which every layer draws itself."""
    return init_lora_weights is True or init_lora_weights == "default"


# --- argument checks --------------------------------------------------------------------


def _check_base(base, who: str, quantized_ok: bool = True, why: str = "") -> None:
    if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
        fail("base", "an nn.Linear or nn.QuantizedLinear", type(base).__name__, who)
    if isinstance(base, nn.QuantizedLinear) and not quantized_ok:
        fail("base", f"a dense nn.Linear ({why})", f"a {base.bits}-bit nn.QuantizedLinear", who)


def _check_rank(base, r, who: str, bounded: bool) -> None:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        fail("r", "an integer >= 1", repr(r), who)
    input_dims, output_dims = base_dims(base)
    if bounded and r > min(input_dims, output_dims):
        fail(
            "r",
            f"at most min(in, out) = {min(input_dims, output_dims)} for this {output_dims}x{input_dims} base",
            r,
            who,
        )


def _check_scale(scale, who: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        fail("scale", "a finite number > 0 (the layer's multiplier the adapter is split by)", repr(scale), who)
    return float(scale)


_PISSA_NEEDS_W = (
    "PiSSA splits the full-precision W, as in PEFT; run it on the dense weight and quantize the new base, "
    "or use loftq for a quantized base"
)
_LOFTQ_NEEDS_W = (
    "LoftQ fits the part of the full-precision W that quantizing it loses, and quantizes it itself; "
    "load the model unquantized"
)


def _check_split(base, r, scale, who: str, dense_only: str | None = None) -> tuple[int, float]:
    """The checks of the inits that split W (rank at most min(in, out), scale > 0); a
    quantized base is refused with the reason ``dense_only`` when one is given."""
    _check_base(base, who, quantized_ok=dense_only is None, why=dense_only or "")
    _check_rank(base, r, who, bounded=True)
    return int(r), _check_scale(scale, who)


def _check_key(key, who: str) -> None:
    if key is not None and not (isinstance(key, mx.array) and key.dtype == mx.uint32 and tuple(key.shape) == (2,)):
        actual = f"{key.dtype} array of shape {tuple(key.shape)}" if isinstance(key, mx.array) else type(key).__name__
        fail("key", "None or a uint32 array of shape (2,) (mx.random.key)", actual, who)


def _check_count(value, name: str, least: int, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        fail(name, f"an integer >= {least}", repr(value), who)
    return int(value)


def _finite_weight(base, who: str) -> mx.array:
    """The base's weight in float32 (dequantized), refused when it holds NaN or inf."""
    w = dense_weight(base).astype(mx.float32)
    if not mx.all(mx.isfinite(w)).item():
        fail("base", "a weight of finite values", "a weight holding NaN or inf", who)
    return w


# --- the linear algebra (float32, CPU stream) ---------------------------------------------


def _reduced_svd(w: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """``(U, S, Vt)`` with ``U (m, k)``, ``Vt (k, n)``, k = min(m, n): a non-square ``w`` is
    QR-factored first, so only a k × k matrix goes through MLX's SVD (which returns full,
    m × m and n × n, factors)."""
    m, n = w.shape
    if m == n:
        return mx.linalg.svd(w)
    if m < n:
        u, s, vt = _reduced_svd(w.T)
        return vt.T, s, u.T
    q, r = mx.linalg.qr(w)
    u, s, vt = mx.linalg.svd(r)
    return q @ u, s, vt


def randomized_svd(w: mx.array, rank: int, niter: int = 2, key: mx.array | None = None, oversample: int = 10):
    """The top ``rank`` singular triplets ``(U (m, rank), S (rank,), Vt (rank, n))`` of
    ``w`` by a randomized range finder with ``niter`` subspace iterations (Halko, Martinsson
    and Tropp; what PEFT's ``pissa_niter_N`` gets from ``torch.svd_lowrank``). The range is
    sought with ``oversample`` directions more than ``rank`` (at most min(m, n)), as Halko
    et al. advise; PEFT asks torch for exactly ``rank``, which fits the last kept singular
    values less closely. ``key`` draws the Gaussian test matrix (None: MLX's global random
    state). Float32 on the CPU stream."""
    who = "randomized_svd"
    if not isinstance(w, mx.array) or w.ndim != 2:
        fail("w", "a 2-D mx.array", f"shape {tuple(w.shape)}" if isinstance(w, mx.array) else type(w).__name__, who)
    _check_count(rank, "rank", 1, who)
    _check_count(niter, "niter", 0, who)
    _check_count(oversample, "oversample", 0, who)
    _check_key(key, who)
    if rank > min(w.shape):
        fail("rank", "at most min(w.shape)", f"{rank} for shape {tuple(w.shape)}", who)
    width = min(rank + oversample, *w.shape)
    with mx.stream(mx.cpu):
        w = w.astype(mx.float32)
        q, _ = mx.linalg.qr(w @ mx.random.normal((w.shape[1], width), key=key))
        for _ in range(niter):  # each pass sharpens the basis by another power of the spectrum
            q, _ = mx.linalg.qr(w.T @ q)
            q, _ = mx.linalg.qr(w @ q)
        u, s, vt = _reduced_svd(q.T @ w)  # width × n: its SVD is the small one
        out = q @ u[:, :rank], s[:rank], vt[:rank]
        mx.eval(*out)
    return out


def _split(u: mx.array, s: mx.array, vt: mx.array, r: int, scale: float) -> tuple[mx.array, mx.array]:
    """``(lora_a, lora_b)`` with ``scale · (lora_a lora_b)ᵀ = U_r S_r Vt_r``: PEFT's even
    split of the singular values after dividing them by the scale."""
    root = mx.sqrt(s[:r] / scale)
    return vt[:r].T * root, root[:, None] * u[:, :r].T


def _residual(base, lora_a, lora_b, scale: float, who: str) -> nn.Module:
    """``base`` with ``scale · (lora_a lora_b)ᵀ`` taken out: the one fold, with scale −s."""
    return _frozen_like(fold_lora(base, lora_a, lora_b, -scale, name=who, stacklevel=4), base)


def _frozen_like(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` frozen where ``old`` is: a LoRA layer's base is frozen (mlx-lm freezes the model
    before it adds the layers), and the base an init makes must not come back trainable."""
    trainable = {k for k, _ in tree_flatten(old.trainable_parameters())}
    new.freeze()
    new.unfreeze(keys=sorted(trainable & set(new.keys())), recurse=False, strict=False)
    return new


# --- the inits ----------------------------------------------------------------------------


def default_init(base: nn.Module, r: int, *, key: mx.array | None = None) -> LoRAInit:
    """mlx-lm's init (PEFT's ``True``): ``lora_a`` uniform in ±1/√in, ``lora_b`` zeros."""
    _check_base(base, "default_init")
    _check_rank(base, r, "default_init", bounded=False)
    _check_key(key, "default_init")
    input_dims, output_dims = base_dims(base)
    lora_a, lora_b = init_lora_weights(input_dims, output_dims, int(r), key=key)
    return LoRAInit(lora_a, lora_b, None, True)


def gaussian_init(base: nn.Module, r: int, *, key: mx.array | None = None) -> LoRAInit:
    """PEFT's ``gaussian``: ``lora_a`` entries ~ N(0, std = 1/r), ``lora_b`` zeros."""
    _check_base(base, "gaussian_init")
    _check_rank(base, r, "gaussian_init", bounded=False)
    _check_key(key, "gaussian_init")
    input_dims, output_dims = base_dims(base)
    lora_a = mx.random.normal((input_dims, int(r)), scale=1.0 / int(r), key=key)
    return LoRAInit(lora_a, mx.zeros((int(r), output_dims)), None, "gaussian")


def pissa_init(
    base: nn.Module, r: int, scale: float, *, niter: int | None = None, key: mx.array | None = None
) -> LoRAInit:
    """PiSSA: W's top ``r`` singular triplets in the adapter, the rest in the new base.

    ``niter`` None: exact SVD (PEFT's ``pissa``); an integer >= 0: `randomized_svd` with
    that many subspace iterations (PEFT's ``pissa_niter_{niter}``), ``key`` drawing its
    test matrix. A quantized base is refused, as in PEFT.
    """
    who = "pissa_init"
    r, scale = _check_split(base, r, scale, who, dense_only=_PISSA_NEEDS_W)
    if niter is not None:
        _check_count(niter, "niter", 0, who)
    _check_key(key, who)
    with mx.stream(mx.cpu):
        w = _finite_weight(base, who)
        u, s, vt = _reduced_svd(w) if niter is None else randomized_svd(w, r, niter, key)
        lora_a, lora_b = _split(u, s, vt, r, scale)
        new_base = _residual(base, lora_a, lora_b, scale, who)
        mx.eval(lora_a, lora_b, new_base.parameters())
    return LoRAInit(lora_a, lora_b, new_base, "pissa" if niter is None else f"{_NITER_PREFIX}{int(niter)}")


def olora_init(base: nn.Module, r: int, scale: float) -> LoRAInit:
    """OLoRA (PEFT's): ``W = Q R``, ``lora_a = R_rᵀ``, ``lora_b = Q_rᵀ`` (orthonormal rows),
    new base ``W − scale · Q_r R_r``; a quantized base is re-quantized with its own settings."""
    who = "olora_init"
    r, scale = _check_split(base, r, scale, who)
    with mx.stream(mx.cpu):
        q, rr = mx.linalg.qr(_finite_weight(base, who))  # (out, k), (k, in)
        lora_a, lora_b = rr[:r].T, q[:, :r].T
        new_base = _residual(base, lora_a, lora_b, scale, who)
        mx.eval(lora_a, lora_b, new_base.parameters())
    return LoRAInit(lora_a, lora_b, new_base, "olora")


def loftq_init(
    base: nn.Module, r: int, scale: float, *, bits: int = 4, group_size: int = 64, num_iter: int = 1
) -> LoRAInit:
    """LoftQ-style: quantize a dense base to ``bits`` (affine, ``group_size``) with an
    adapter fitted to what quantization loses, alternating ``num_iter`` times (PEFT's
    ``loftq_iter``, default 1). Returns the new ``nn.QuantizedLinear`` as ``base`` and each
    alternation's error in ``errors``. The base must be dense: a quantized one has already
    lost what LoftQ fits."""
    who = "loftq_init"
    r, scale = _check_split(base, r, scale, who, dense_only=_LOFTQ_NEEDS_W)
    num_iter = _check_count(num_iter, "num_iter", 1, who)
    if isinstance(bits, bool) or bits not in QUANT_BITS:
        fail("bits", f"one of {', '.join(map(str, QUANT_BITS))}", repr(bits), who)
    if isinstance(group_size, bool) or group_size not in QUANT_GROUP_SIZES:
        fail("group_size", f"one of {', '.join(map(str, QUANT_GROUP_SIZES))}", repr(group_size), who)
    input_dims, _ = base_dims(base)
    if input_dims % group_size:
        fail("group_size", f"a divisor of the base's input dims {input_dims}", group_size, who)
    errors = []
    with mx.stream(mx.cpu):
        w = _finite_weight(base, who)
        target = base  # what the next alternation quantizes: W, then W − s·(A B)ᵀ
        for _ in range(num_iter):
            quantized = nn.QuantizedLinear.from_linear(target, group_size, bits, mode="affine")
            lost = w - dense_weight(quantized).astype(mx.float32)
            lora_a, lora_b = _split(*_reduced_svd(lost), r, scale)
            errors.append(mx.linalg.norm(lost - scale * (lora_a @ lora_b).T).item())
            target = _residual(base, lora_a, lora_b, scale, who)
        mx.eval(lora_a, lora_b, quantized.parameters())
    return LoRAInit(lora_a, lora_b, _frozen_like(quantized, base), "loftq", tuple(errors))


def init_lora(
    base: nn.Module,
    r: int,
    scale: float,
    init_lora_weights: bool | str = True,
    *,
    key: mx.array | None = None,
    loftq_bits: int = 4,
    loftq_group_size: int = 64,
    loftq_iter: int = 1,
) -> LoRAInit:
    """The init PEFT's ``init_lora_weights`` value names, for one base layer.

    ``True`` or ``"default"``, ``"gaussian"``, ``"pissa"``, ``"pissa_niter_N"``, ``"olora"``,
    ``"loftq"`` (with ``loftq_bits``, ``loftq_group_size``, ``loftq_iter``). ``scale`` is the
    layer's multiplier, which the inits that split W divide by (the others ignore it);
    ``key`` seeds the random inits (default, gaussian, pissa_niter_N). An unknown value is
    refused, listing the known ones.
    """
    method = check_init(init_lora_weights, "init_lora")
    if method is True:
        return default_init(base, r, key=key)
    if method == "gaussian":
        return gaussian_init(base, r, key=key)
    if method == "pissa":
        return pissa_init(base, r, scale)
    if method.startswith(_NITER_PREFIX):
        return pissa_init(base, r, scale, niter=int(method[len(_NITER_PREFIX) :]), key=key)
    if method == "olora":
        return olora_init(base, r, scale)
    return loftq_init(base, r, scale, bits=loftq_bits, group_size=loftq_group_size, num_iter=loftq_iter)


def check_init(init_lora_weights, who: str = "init_lora_weights") -> bool | str:
    """PEFT's ``init_lora_weights`` value, checked: ``True`` for ``True`` and ``"default"``, else the
    init's name (``"pissa_niter_N"`` with N a count); anything else raises naming ``who``."""
    method = init_lora_weights
    if is_default_init(method):
        return True
    if isinstance(method, str) and method.startswith(_NITER_PREFIX):
        digits = method[len(_NITER_PREFIX) :]
        if not digits.isascii() or not digits.isdigit():
            fail("init_lora_weights", "pissa_niter_N with N a count of iterations >= 0", repr(method), who)
        return method
    if method in ("gaussian", "pissa", "olora", "loftq"):
        return method
    fail("init_lora_weights", f"True or one of {', '.join(INIT_METHODS)}", repr(method), who)


def init_changes_base(init_lora_weights) -> bool:
    """True for the inits that move part of W into the adapter and give the layer a new base."""
    method = check_init(init_lora_weights)
    return method is not True and method != "gaussian"


_BASE_CHANGED = {
    "loftq": "quantized their base weight (the adapter fitted to what quantizing loses): the adapter belongs to it",
    "split": "moved W's first components into the adapter and left the residual as their base: save with "
    "convert_to_lora=True (the CLIs' --convert-to-lora) for a plain LoRA of the original weights; a file that "
    "records the init splits the base it is loaded on again, as PEFT does",
}


def warn_base_changed(init_lora_weights, modules: int, stacklevel: int = 3) -> None:
    """Say, once for a model, that an init replaced the base weight of ``modules`` modules, and
    what that means for the adapter's files (a `UserWarning`; ``stacklevel`` points at the caller's caller)."""
    if modules and init_changes_base(init_lora_weights):
        what = _BASE_CHANGED["loftq" if init_lora_weights == "loftq" else "split"]
        warnings.warn(f"init_lora_weights={init_lora_weights!r} on {modules} modules {what}", stacklevel=stacklevel)
