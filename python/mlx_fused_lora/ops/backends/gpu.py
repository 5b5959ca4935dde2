"""The GPU backend: the op as an mx.custom_function over the GPU kernels (ops/gpu/) and
MLX's GEMMs, guarded by a self-check at first use.

Forward (c = scale, T = x's dtype):

    h = (m * x) @ A                      down_proj kernel, h float32 (p = 0: x @ A, a GEMM)
    y = addmm(addmm(bias, h, B, c), x, W.T)   two MLX GEMMs; bias and the rank-r term ride
                                         in the first's epilogue: no extra M x N pass

Backward:

    dS, dB = c dY @ B.T, c h.T @ dY      low_rank_grad kernel, one pass over dY (two GEMMs
                                         where its partials would outweigh that pass:
                                         r > 32, see low_rank_kernel_pays)
    dA, e  = (m * x).T @ dS, m * (dS @ A.T)   down_grad kernel, one pass over x, one hash
                                         per element (p = 0: two GEMMs)
    dX     = addmm(e, dY, W)             an MLX GEMM with e in its epilogue

h is float32 and saved for the backward; the GEMMs that read it take it in T (MLX's GEMMs
accumulate in float32), as they take B and dS. Empty shapes run the plain-MLX formula.

On by default on a Metal or CUDA device; ``MLX_FUSED_LORA_GPU_KERNELS=0`` turns the
kernels off. At first use per (device, dtype, r, dropout on/off) the op checks itself on
a small input (ops/gpu/self_check.py); on a mismatch or an error it warns once, saying
what failed, and runs the plain-MLX reference for that configuration.
"""

import functools
import warnings

import mlx.core as mx

from ...env_switch import switch
from .. import layout, reference
from ..gpu import Kernels, MLXLauncher, geometry
from ..gpu.self_check import self_check
from . import cpu

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


def low_rank_kernel_pays(r, dtype):
    """Whether low_rank_grad's partials (ceil(N/TN) * M * r floats, written and read once)
    cost less than the second pass over dY (M * N elements) that two GEMMs would make."""
    tn = geometry.low_rank_grad(1, 1, r)[0]["TN"]
    return 2 * 4 * r <= tn * dtype.size


def gpu_op(kernels, scale, p):
    """The op as an mx.custom_function over `kernels` (ops/gpu/Kernels) and MLX's GEMMs,
    taking the fixed slots of layout.Inputs; outputs (y, h)."""

    @mx.custom_function
    def op(x, weight, bias, lora_a, lora_b, key):
        dtype, n = x.dtype, weight.shape[0]
        if p > 0:
            h = kernels.down_proj(x, lora_a, key, p)
        else:
            h = (x @ lora_a.astype(dtype)).astype(F32)
        c = bias if layout.has_bias(bias) else mx.zeros((n,), dtype=dtype)
        lora_term = mx.addmm(c, h.astype(dtype), lora_b.astype(dtype), alpha=scale)
        return mx.addmm(lora_term, x, weight.T), h

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        x, weight, _, lora_a, lora_b, key = primals
        dtype = x.dtype
        dy = cotangents[0].astype(dtype)
        h = outputs[1]
        if low_rank_kernel_pays(lora_a.shape[1], dtype):
            ds, d_lora_b = kernels.low_rank_grad(dy, h, lora_b, scale)
        else:
            ds = (dy @ lora_b.astype(dtype).T).astype(F32) * scale
            d_lora_b = (h.astype(dtype).T @ dy).astype(F32) * scale
        if p > 0:
            d_lora_a, e = kernels.down_grad(x, ds, lora_a, key, p)
        else:
            ds_t = ds.astype(dtype)
            d_lora_a, e = x.T @ ds_t, ds_t @ lora_a.astype(dtype).T
        dx = mx.addmm(e, dy, weight)
        return layout.cotangents(
            layout.Inputs(*primals),
            dy,
            dx=dx,
            d_lora_a=d_lora_a.astype(lora_a.dtype),
            d_lora_b=d_lora_b.astype(lora_b.dtype),
        )

    return op


def plain_lora_linear(inputs, scale, p):
    """The plain-MLX reference with the CPU extension's mask (no warning)."""
    x, weight, bias, lora_a, lora_b, key = inputs
    mask = cpu.dropout_mask(key, x.shape, p, F32) if p > 0 else None
    return reference.lora_linear(x, weight, layout.bias_or_none(bias), lora_a, lora_b, scale, mask)


class GPUBackend:
    """lora_linear(inputs, scale, p) and dropout_mask(key, shape, p, dtype) over `kernels`,
    each configuration self-checked at first use, the reference where a check failed."""

    def __init__(self, kernels, device):
        self.kernels = kernels
        self.device = device
        self.checked = {}  # (dtype, r, p > 0) or "mask" -> None (passed) or what failed
        self._ops = {}

    def _op(self, scale, p):
        if (scale, p) not in self._ops:
            self._ops[scale, p] = gpu_op(self.kernels, scale, p)
        return self._ops[scale, p]

    def _passes(self, config, dtype, r, dropout):
        """Whether `config` passed its self-check (run now if it never ran); r = 0 checks
        the dropout mask alone."""
        if config not in self.checked:
            failure = self_check(self.kernels, lambda inputs, s, q: self._op(s, q)(*inputs)[0], dtype, r, dropout)
            self.checked[config] = failure
            if failure is not None:
                what = "dropout_mask" if r == 0 else f"dtype={dtype}, r={r}, dropout={'on' if dropout else 'off'}"
                warnings.warn(
                    f"mlx_fused_lora: the GPU kernels failed their self-check on {self.device} for "
                    f"{what}: {failure}. Running the "
                    f"plain-MLX reference for this configuration instead (same results and masks, "
                    f"plain-MLX speed); {ENABLE_VARIABLE}=0 turns the kernels off.",
                    stacklevel=4,
                )
        return self.checked[config] is None

    def lora_linear(self, inputs, scale, p):
        x, weight, _, lora_a, _, _ = inputs
        dtype, r = x.dtype, lora_a.shape[1]
        if 0 in (x.shape[0], x.shape[1], weight.shape[0]) or not self._passes((dtype, r, p > 0), dtype, r, p > 0):
            return plain_lora_linear(inputs, scale, p)
        return self._op(scale, p)(*inputs)[0]

    def dropout_mask(self, key, shape, p, dtype):
        if 0 in shape or not self._passes("mask", F32, 0, True):
            return cpu.dropout_mask(key, shape, p, dtype)
        return self.kernels.dropout_mask(key, shape, p).astype(dtype)


@functools.cache
def backend(name):
    """The backend for 'cuda' or 'metal', over MLX's custom kernels."""
    return GPUBackend(Kernels(MLXLauncher(name)), f"{name} ({mx.default_device()})")
