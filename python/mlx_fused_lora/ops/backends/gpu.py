"""The GPU backend: the op as an mx.custom_function over the GPU kernels (ops/gpu/) and
MLX's GEMMs, guarded by a self-check at first use. One op for one adapter and for many:
the mixed op's slots (layout.MixedInputs: stacked adapters, per-adapter scales, an id per
row) run the same code, the single-adapter op being its case n = 1 without ids
(ops/gpu/adapter_rows.py: every per-row helper is then the identity).

Forward (c = each row's multiplier, T = x's dtype):

    h = (m * x) @ A                      down_proj kernel ("kernel": rows grouped by
                                         adapter, x read once), or the device mask and one
                                         GEMM over the concatenated rank ("gemm"; p = 0:
                                         x @ A), or MLX's gather_mm ("gather", mixed only:
                                         each row reads its adapter's A)
    y = addmm(addmm(bias, c h, B), x, W.T)   two MLX GEMMs ("gemm"; mixed: c h spread
                                         over the concatenated rank n*r); or c h @ B by
                                         gather_mm and the bias added ("gather", mixed)

Backward:

    dS, dB = c dY @ B.T, c h.T @ dY      low_rank_grad kernel, one pass over dY (or two
                                         GEMMs over the concatenated rank)
    dA, e  = (m * x).T @ dS, m * (dS @ A.T)   down_grad kernel, one pass over x, one hash
                                         per element (or the device mask and two GEMMs
                                         over the concatenated rank)
    dX     = addmm(e, dY, W)             an MLX GEMM with e in its epilogue

Each "or" is decided per call by the counted-cost model (ops/gpu/costs.py, and for the
mixed op ops/gpu/mixed_costs.py, with the device model of the backend: an H100 for CUDA,
an M3 Max for Metal), and for r above the kernels' limits. h is float32 and saved for the
backward; the GEMMs that read it take it in T (MLX's GEMMs accumulate in float32), as
they take B and dS. Empty shapes run the lean plain-MLX formulation.

On by default on a Metal or CUDA device; ``MLX_FUSED_LORA_GPU_KERNELS=0`` turns the
kernels off. At first use per (device, dtype, r, dropout on/off, mixed or not) the op
checks itself (ops/gpu/self_check.py: every path, every choice); on a mismatch or an
error it warns once, saying what failed, and runs the lean plain-MLX formulation
(backends/reference.py) for that configuration.
"""

import functools
import warnings

import mlx.core as mx

from ...env_switch import switch
from .. import layout
from ..gpu import Kernels, MLXLauncher, costs, mixed_costs
from ..gpu.adapter_rows import AdapterRows
from ..gpu.self_check import self_check
from . import reference as lean

ENABLE_VARIABLE = "MLX_FUSED_LORA_GPU_KERNELS"
F32 = mx.float32


def available_backend():
    """'cuda' or 'metal' when MLX's default device is a GPU and the kernels are not
    turned off (MLX_FUSED_LORA_GPU_KERNELS=0), else None."""
    if mx.default_device() != mx.gpu or not switch(ENABLE_VARIABLE, default=True):
        return None
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


def _masked_da_e(x, ds_t, a_t, key, p):
    """(dA float32, e in T) by MLX's GEMMs, the mask generated on the device a block of
    rows at a time (p = 0: no mask)."""
    if p == 0:
        return (x.T @ ds_t).astype(F32), ds_t @ a_t.T
    da, e = None, []
    for (part, mask), ds_part in zip(lean.row_blocks(x, key, p), lean.split_like(x, ds_t), strict=True):
        term = ((part * mask).T @ ds_part).astype(F32)
        da = term if da is None else da + term
        e.append(mask * (ds_part @ a_t.T))
    return da, e[0] if len(e) == 1 else mx.concatenate(e, axis=0)


def _down_project(kernels, how, x, lora_a, key, p, rows):
    """h (M, r) float32: "kernel" (down_proj), "gemm" (one GEMM over the concatenated rank,
    each row keeping its block) or "gather" (gather_mm, each row its adapter's A)."""
    if how == "kernel":
        return kernels.down_proj(x, lora_a, key, p, groups=rows.groups)
    if how == "gemm":
        return rows.own(lean.down_project_in_steps(x, key, rows.a_concat(lora_a), p)).astype(F32)
    a_t = lora_a.astype(x.dtype)
    if p == 0:
        return rows.gathered(x, a_t, rows.ids).astype(F32)
    blocks = lean.row_blocks(x, key, p)
    parts = [rows.gathered(part * mask, a_t, ids) for (part, mask), ids in zip(blocks, lean.split_like(x, rows.ids), strict=True)]  # fmt: skip
    return (parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)).astype(F32)


def _up_project(how, h, lora_b, bias, rows, dtype):
    """bias + c * h @ B in T, the base GEMM's start value: "gemm" (one GEMM over the
    concatenated rank, the bias in its epilogue) or "gather" (gather_mm, then the bias)."""
    if how == "gather":
        term = rows.gathered((h * rows.multipliers(forward=True)[:, None]).astype(dtype), lora_b.astype(dtype), rows.ids)  # fmt: skip
        return term + bias if layout.has_bias(bias) else term
    c = bias if layout.has_bias(bias) else mx.zeros((rows.b_concat(lora_b).shape[1],), dtype=dtype)
    return mx.addmm(c, rows.spread(h, multiply=True, forward=True).astype(dtype), rows.b_concat(lora_b).astype(dtype))


def _low_rank(kernels, how, dy, h, lora_b, rows):
    """(dS (M, r), dB like lora_b) float32: "kernel" (low_rank_grad, one pass over dY) or
    "gemm" (two GEMMs over the concatenated rank)."""
    if how == "kernel":
        return kernels.low_rank_grad(dy, h, lora_b, rows.kernel_scales(), groups=rows.groups)
    dtype, b_t = dy.dtype, rows.b_concat(lora_b).astype(dy.dtype)
    multipliers = rows.multipliers(forward=False)[:, None] if rows.mixed else rows.scale
    ds = rows.own((dy @ b_t.T).astype(F32)) * multipliers
    db = (rows.spread(h, multiply=True).astype(dtype).T @ dy).astype(F32)
    return ds, db.reshape(lora_b.shape)


def _down_grad(kernels, how, x, ds, lora_a, key, p, rows):
    """(dA like lora_a float32, e (M, K) in T): "kernel" (down_grad, one pass over x) or
    "gemm" (the device mask and two GEMMs over the concatenated rank)."""
    if how == "kernel":
        return kernels.down_grad(x, ds, lora_a, key, p, groups=rows.groups)
    dtype = x.dtype
    da, e = _masked_da_e(x, rows.spread(ds, multiply=False).astype(dtype), rows.a_concat(lora_a).astype(dtype), key, p)
    return rows.a_split(da, lora_a), e


def gpu_op(kernels, scale, p, device, plan=None):
    """The op as an mx.custom_function over `kernels` (ops/gpu/Kernels) and MLX's GEMMs,
    taking the fixed slots of layout.Inputs or layout.MixedInputs; outputs (y, h). `plan`
    fixes the choices (the cost models' keys; the self-check runs each), else the cost
    model decides per call."""

    def choices(x, weight, lora_a, rows):
        if plan is not None:
            return plan
        (m, k), n, r = x.shape, weight.shape[0], lora_a.shape[-1]
        if rows.mixed:
            return mixed_costs.plan(device, m, k, n, r, x.dtype.size, p > 0, rows.count)
        return costs.plan(device, m, k, n, r, x.dtype.size, p > 0)

    @mx.custom_function
    def op(x, weight, bias, lora_a, lora_b, key, *routing):
        rows = AdapterRows(scale, routing)
        choice = choices(x, weight, lora_a, rows)
        h = _down_project(kernels, choice["h"], x, lora_a, key, p, rows)
        return mx.addmm(_up_project(choice["up"], h, lora_b, bias, rows, x.dtype), x, weight.T), h

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        x, weight, _, lora_a, lora_b, key, *routing = primals
        rows = AdapterRows(scale, routing)
        dy = cotangents[0].astype(x.dtype)
        h = outputs[1]
        choice = choices(x, weight, lora_a, rows)
        ds, d_lora_b = _low_rank(kernels, choice["ds_db"], dy, h, lora_b, rows)
        d_lora_a, e = _down_grad(kernels, choice["da_e"], x, ds, lora_a, key, p, rows)
        grads = dict(dx=mx.addmm(e, dy, weight), d_lora_a=d_lora_a.astype(lora_a.dtype))
        grads["d_lora_b"] = d_lora_b.astype(lora_b.dtype)
        if not rows.mixed:
            return layout.cotangents(layout.Inputs(*primals), dy, **grads)
        # d(scales[i]) = scale * sum over adapter i's rows of (h @ B_i) . dY: dB at unit
        # multipliers against B; lazy, evaluated only if asked for (LoRA training does not)
        unit = AdapterRows(scale, (mx.ones_like(routing[0]), routing[1]))
        _, db_unit = _low_rank(kernels, choice["ds_db"], dy, h, lora_b, unit)
        d_scales = (db_unit * lora_b.astype(F32)).sum(axis=(1, 2)).astype(routing[0].dtype)
        return layout.mixed_cotangents(layout.MixedInputs(*primals), dy, **grads, d_scales=d_scales)

    return op


class GPUBackend:
    """lora_linear(inputs, scale, p) and dropout_mask(key, shape, p, dtype) over `kernels`,
    each configuration self-checked at first use, the lean fallback where a check failed."""

    def __init__(self, kernels, device, model=costs.H100, tf32=False):
        self.kernels = kernels
        self.device = device
        self.model = model  # the cost model's device
        self.tf32 = tf32  # whether MLX's float32 GEMMs may run in TF32 here
        self.checked = {}  # (dtype, r, p > 0, mixed) or "mask" -> None (passed) or what failed
        self._ops = {}

    def _op(self, scale, p):
        if (scale, p) not in self._ops:
            self._ops[scale, p] = gpu_op(self.kernels, scale, p, self.model)
        return self._ops[scale, p]

    def run(self, kernels, plan, inputs, scale, p):
        """y by the op over `kernels` with the choices `plan` (the self-check's hook)."""
        return gpu_op(kernels, scale, p, self.model, plan)(*inputs)[0]

    def _passes(self, config):
        """Whether `config` passed its self-check (run now if it never ran); "mask"
        checks the masks alone."""
        if config not in self.checked:
            dtype, r, dropout, mixed = (F32, 0, True, False) if config == "mask" else config
            failure = self_check(self.kernels, self.run, dtype, r, dropout, tf32=self.tf32, mixed=mixed)
            self.checked[config] = failure
            if failure is not None:
                what = "dropout_mask" if r == 0 else f"dtype={dtype}, r={r}, dropout={'on' if dropout else 'off'}"
                what += ", mixed adapters" if mixed else ""
                warnings.warn(
                    f"mlx_fused_lora: the GPU kernels failed their self-check on {self.device} for "
                    f"{what}: {failure}. Running the lean plain-MLX formulation for this configuration "
                    f"instead (same masks, results to the input dtype's precision, plain-MLX speed); "
                    f"{ENABLE_VARIABLE}=0 turns the kernels off.",
                    stacklevel=4,
                )
        return self.checked[config] is None

    def lora_linear(self, inputs, scale, p):
        """y (M, N) for the fixed slots `inputs` (layout.Inputs or layout.MixedInputs)."""
        x, weight, _, lora_a, _, _, *routing = inputs
        config = (x.dtype, lora_a.shape[-1], p > 0, bool(routing))
        if 0 in (x.shape[0], x.shape[1], weight.shape[0]) or not self._passes(config):
            return lean.lean_lora_linear(inputs, scale, p)
        return self._op(scale, p)(*inputs)[0]

    def dropout_mask(self, key, shape, p, dtype):
        if 0 in shape or not self._passes("mask"):
            return lean.device_dropout_mask(key, shape, p, dtype)
        return self.kernels.dropout_mask(key, shape, p).astype(dtype)


@functools.cache
def backend(name):
    """The backend for 'cuda' or 'metal', over MLX's custom kernels."""
    return GPUBackend(
        Kernels(MLXLauncher(name)), f"{name} ({mx.default_device()})", costs.for_backend(name), tf32=name == "cuda"
    )
