"""The CPU backend: the op as an mx.custom_function over the C++ primitives.

The forward and each cotangent are their own graph nodes (csrc/cpu/primitives.h),
so MLX evaluates only the cotangents that were asked for.
"""

import functools

import mlx.core as mx

from ..._extension import _ext
from .. import layout


@functools.cache
def _op(scale, p):
    """The op for one (scale, p): constants of the op, also under mx.compile; the key
    is an input (a slot of layout.Inputs)."""

    @mx.custom_function
    def op(x, weight, bias, lora_a, lora_b, key):
        return tuple(_ext.lora_forward(x, weight, bias, lora_a, lora_b, key, scale=scale, dropout=p))

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        x, weight, _, lora_a, lora_b, key = primals
        dy = cotangents[0].astype(x.dtype)
        h = outputs[1]
        ds, d_lora_b = _ext.lora_low_rank_grad(dy, h, lora_b, scale=scale)
        dx = _ext.lora_input_grad(dy, weight, ds, lora_a, key, dropout=p)
        d_lora_a = _ext.lora_down_grad(x, ds, lora_a, key, dropout=p)
        return layout.cotangents(layout.Inputs(*primals), dy, dx=dx, d_lora_a=d_lora_a, d_lora_b=d_lora_b)

    return op


def lora_linear(inputs, scale, p):
    """y (M, N) for the fixed slots `inputs` (layout.Inputs)."""
    return _op(scale, p)(*inputs)[0]


def dropout_mask(key, shape, p, dtype):
    return _ext.dropout_mask(key, shape, p, dtype, stream=mx.cpu)
