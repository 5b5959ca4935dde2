"""The GPU backend: the op as an mx.custom_function over the GPU kernels (ops/gpu/) and
MLX's GEMMs, guarded by a self-check at first use.

Forward (c = scale, T = x's dtype):

    h = (m * x) @ A                      down_proj kernel, h float32 (or the device mask and
                                         a GEMM; p = 0: x @ A, a GEMM)
    y = addmm(addmm(bias, h, B, c), x, W.T)   two MLX GEMMs; bias and the rank-r term ride
                                         in the first's epilogue: no extra M x N pass

Backward:

    dS, dB = c dY @ B.T, c h.T @ dY      low_rank_grad kernel, one pass over dY (or two
                                         GEMMs)
    dA, e  = (m * x).T @ dS, m * (dS @ A.T)   down_grad kernel, one pass over x, one hash
                                         per element (or the device mask and two GEMMs;
                                         p = 0: two GEMMs)
    dX     = addmm(e, dY, W)             an MLX GEMM with e in its epilogue

Each "or" is decided per call by the counted-cost model (ops/gpu/costs.py, the device
model of the backend: an H100 for CUDA, an M3 Max for Metal), and for r above the
kernels' limits. h is float32 and saved for the backward; the GEMMs that read it take it
in T (MLX's GEMMs accumulate in float32), as they take B and dS. Empty shapes run the
lean plain-MLX formulation.

On by default on a Metal or CUDA device; ``MLX_FUSED_LORA_GPU_KERNELS=0`` turns the
kernels off. At first use per (device, dtype, r, dropout on/off) the op checks itself
(ops/gpu/self_check.py: every path, both choices); on a mismatch or an error it warns
once, saying what failed, and runs the lean plain-MLX formulation (backends/reference.py)
for that configuration.
"""

import functools
import warnings

import mlx.core as mx

from ...env_switch import switch
from .. import layout
from ..gpu import Kernels, MLXLauncher, costs
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


def gpu_op(kernels, scale, p, device, plan=None):
    """The op as an mx.custom_function over `kernels` (ops/gpu/Kernels) and MLX's GEMMs,
    taking the fixed slots of layout.Inputs; outputs (y, h). `plan` fixes the choices
    (costs.plan's keys; the self-check runs each), else the cost model decides per call."""

    def choices(x, weight, lora_a):
        if plan is not None:
            return plan
        (m, k), n, r = x.shape, weight.shape[0], lora_a.shape[1]
        return costs.plan(device, m, k, n, r, x.dtype.size, p > 0)

    @mx.custom_function
    def op(x, weight, bias, lora_a, lora_b, key):
        dtype, n = x.dtype, weight.shape[0]
        if p > 0 and choices(x, weight, lora_a)["h"] == "kernel":
            h = kernels.down_proj(x, lora_a, key, p)
        else:
            h = lean.down_project_in_steps(x, key, lora_a, p).astype(F32)
        c = bias if layout.has_bias(bias) else mx.zeros((n,), dtype=dtype)
        lora_term = mx.addmm(c, h.astype(dtype), lora_b.astype(dtype), alpha=scale)
        return mx.addmm(lora_term, x, weight.T), h

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        x, weight, _, lora_a, lora_b, key = primals
        dtype = x.dtype
        dy = cotangents[0].astype(dtype)
        h = outputs[1]
        choice = choices(x, weight, lora_a)
        if choice["ds_db"] == "kernel":
            ds, d_lora_b = kernels.low_rank_grad(dy, h, lora_b, scale)
        else:
            ds = (dy @ lora_b.astype(dtype).T).astype(F32) * scale
            d_lora_b = (h.astype(dtype).T @ dy).astype(F32) * scale
        if p > 0 and choice["da_e"] == "kernel":
            d_lora_a, e = kernels.down_grad(x, ds, lora_a, key, p)
        else:
            d_lora_a, e = _masked_da_e(x, ds.astype(dtype), lora_a.astype(dtype), key, p)
        dx = mx.addmm(e, dy, weight)
        return layout.cotangents(
            layout.Inputs(*primals),
            dy,
            dx=dx,
            d_lora_a=d_lora_a.astype(lora_a.dtype),
            d_lora_b=d_lora_b.astype(lora_b.dtype),
        )

    return op


class GPUBackend:
    """lora_linear(inputs, scale, p) and dropout_mask(key, shape, p, dtype) over `kernels`,
    each configuration self-checked at first use, the lean fallback where a check failed."""

    def __init__(self, kernels, device, model=costs.H100, tf32=False):
        self.kernels = kernels
        self.device = device
        self.model = model  # the cost model's device
        self.tf32 = tf32  # whether MLX's float32 GEMMs may run in TF32 here
        self.checked = {}  # (dtype, r, p > 0) or "mask" -> None (passed) or what failed
        self._ops = {}

    def _op(self, scale, p):
        if (scale, p) not in self._ops:
            self._ops[scale, p] = gpu_op(self.kernels, scale, p, self.model)
        return self._ops[scale, p]

    def run(self, kernels, plan, inputs, scale, p):
        """y by the op over `kernels` with the choices `plan` (the self-check's hook)."""
        return gpu_op(kernels, scale, p, self.model, plan)(*inputs)[0]

    def _passes(self, config, dtype, r, dropout):
        """Whether `config` passed its self-check (run now if it never ran); r = 0 checks
        the masks alone."""
        if config not in self.checked:
            failure = self_check(self.kernels, self.run, dtype, r, dropout, tf32=self.tf32)
            self.checked[config] = failure
            if failure is not None:
                what = "dropout_mask" if r == 0 else f"dtype={dtype}, r={r}, dropout={'on' if dropout else 'off'}"
                warnings.warn(
                    f"mlx_fused_lora: the GPU kernels failed their self-check on {self.device} for "
                    f"{what}: {failure}. Running the lean plain-MLX formulation for this configuration "
                    f"instead (same masks, results to the input dtype's precision, plain-MLX speed); "
                    f"{ENABLE_VARIABLE}=0 turns the kernels off.",
                    stacklevel=4,
                )
        return self.checked[config] is None

    def lora_linear(self, inputs, scale, p):
        x, weight, _, lora_a, _, _ = inputs
        dtype, r = x.dtype, lora_a.shape[1]
        if 0 in (x.shape[0], x.shape[1], weight.shape[0]) or not self._passes((dtype, r, p > 0), dtype, r, p > 0):
            return lean.lean_lora_linear(inputs, scale, p)
        return self._op(scale, p)(*inputs)[0]

    def dropout_mask(self, key, shape, p, dtype):
        if 0 in shape or not self._passes("mask", F32, 0, True):
            return lean.device_dropout_mask(key, shape, p, dtype)
        return self.kernels.dropout_mask(key, shape, p).astype(dtype)


@functools.cache
def backend(name):
    """The backend for 'cuda' or 'metal', over MLX's custom kernels."""
    return GPUBackend(
        Kernels(MLXLauncher(name)), f"{name} ({mx.default_device()})", costs.for_backend(name), tf32=name == "cuda"
    )
