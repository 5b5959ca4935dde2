"""The GPU backend: the op as an mx.custom_function over the GPU kernels
(ops/gpu_kernels.py) and MLX's GEMMs. The same formulas as the CPU op; the masked
rank-r passes are the kernels'."""

import functools
from types import SimpleNamespace

import mlx.core as mx

from .. import gpu_kernels, layout


def gpu_op(kernels, scale, p):
    """The op as an mx.custom_function over `kernels` (gpu_kernels.Kernels) and MLX's
    GEMMs, taking the fixed slots of layout.Inputs."""
    f32 = mx.float32

    @mx.custom_function
    def op(x, weight, bias, lora_a, lora_b, key):
        h = kernels.dropout_down_proj(x, lora_a.astype(f32), key, p)
        lora_term = h.astype(x.dtype) @ (scale * lora_b).astype(x.dtype)
        if layout.has_bias(bias):
            lora_term = lora_term + bias
        return mx.addmm(lora_term, x, weight.T), h

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        x, weight, _, lora_a, lora_b, key = primals
        dy = cotangents[0].astype(x.dtype)
        h = outputs[1]
        ds = scale * (dy @ lora_b.T.astype(x.dtype)).astype(f32)
        d_lora_b = (scale * (h.astype(x.dtype).T @ dy)).astype(lora_b.dtype)
        d_lora_a = kernels.dropout_down_grad(x, ds, key, p).astype(lora_a.dtype)
        dx = mx.addmm(kernels.masked_input_grad(ds, lora_a.astype(f32), key, p, x.dtype), dy, weight)
        return layout.cotangents(layout.Inputs(*primals), dy, dx=dx, d_lora_a=d_lora_a, d_lora_b=d_lora_b)

    return op


@functools.cache
def _op(name, scale, p):
    return gpu_op(gpu_kernels.Kernels(name), scale, p)


@functools.cache
def backend(name):
    """The backend for 'cuda' or 'metal': lora_linear(inputs, scale, p), dropout_mask."""
    return SimpleNamespace(
        lora_linear=lambda inputs, scale, p: _op(name, scale, p)(*inputs)[0],
        dropout_mask=lambda key, shape, p, dtype: gpu_kernels.dropout_mask_gpu(name, key, shape, p).astype(dtype),
    )
