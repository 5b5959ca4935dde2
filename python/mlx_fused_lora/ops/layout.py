"""The one place that lays out the op's inputs in fixed slots, and its cotangents.

Every backend's op takes exactly these six arrays, in this order:

    (x2d, weight, bias, lora_a, lora_b, key)

- ``x2d`` is x with its leading dimensions flattened: (M, K);
- an absent ``bias`` is a 0-size array in x's dtype (the backends treat a 0-size
  bias as no bias, which for N = 0 is the same thing);
- the ``key`` is always passed: ``zeros((2,), uint32)`` when p = 0, where no backend
  reads it. So the graph has the same inputs whatever p and bias are, and no
  backend decides again which inputs are present.

The VJP returns one cotangent per slot, in the same order (``cotangents``).

The quantized-base op (``fused_qlora_linear``) has the same slots with the packed
weight's three arrays in place of ``weight``:

    (x2d, weight, scales, biases, bias, lora_a, lora_b, key)    (``QInputs``)
"""

from typing import NamedTuple

import mlx.core as mx


class Inputs(NamedTuple):
    x: mx.array
    weight: mx.array
    bias: mx.array
    lora_a: mx.array
    lora_b: mx.array
    key: mx.array


def no_key():
    """The key slot's value when p = 0 (never read)."""
    return mx.zeros((2,), dtype=mx.uint32)


def op_inputs(x2d, weight, bias, lora_a, lora_b, key, p):
    """The fixed slots for validated inputs (``key`` may be None when p = 0)."""
    if bias is None:
        bias = mx.zeros((0,), dtype=x2d.dtype)
    if p == 0 or key is None:
        key = no_key()
    return Inputs(x2d, weight, bias, lora_a, lora_b, key)


def has_bias(bias_slot):
    """Whether the bias slot holds a bias (an absent one is 0-size)."""
    return bias_slot.size > 0


def bias_or_none(bias_slot):
    return bias_slot if has_bias(bias_slot) else None


def cotangents(primals, dy, *, dx, d_lora_a, d_lora_b):
    """The VJP's cotangents, one per slot of ``primals`` (an ``Inputs``).

    The frozen weight's is a lazy dY.T @ x: never evaluated in LoRA training
    (nothing asks for it), correct if someone does ask. The bias's is the row sum
    of dY (an empty array for an absent bias), the key's zeros.
    """
    x, _, bias, _, _, key = primals
    return (dx, dy.T @ x, _bias_cotangent(bias, dy), d_lora_a, d_lora_b, mx.zeros_like(key))


def _bias_cotangent(bias_slot, dy):
    """The row sum of dY for a present bias, an empty array for an absent one."""
    return dy.sum(axis=0).astype(bias_slot.dtype) if has_bias(bias_slot) else mx.zeros_like(bias_slot)


class QInputs(NamedTuple):
    x: mx.array
    weight: mx.array  # packed uint32, as nn.QuantizedLinear holds it
    scales: mx.array
    biases: mx.array
    bias: mx.array
    lora_a: mx.array
    lora_b: mx.array
    key: mx.array


def q_op_inputs(x2d, weight, scales, biases, bias, lora_a, lora_b, key, p):
    """The fixed slots of the quantized-base op (``key`` may be None when p = 0)."""
    dense = op_inputs(x2d, weight, bias, lora_a, lora_b, key, p)
    return QInputs(x2d, weight, scales, biases, dense.bias, lora_a, lora_b, dense.key)


def q_cotangents(primals, dy, *, dx, d_lora_a, d_lora_b, d_scales, d_biases):
    """The quantized op's cotangents, one per slot of ``primals`` (a ``QInputs``).

    The packed weight's is zeros: MLX defines no gradient for quantized weights.
    The scales' and biases' are MLX's own (lazy: evaluated only if asked for).
    """
    x, weight, _, _, bias, _, _, key = primals
    d_bias = _bias_cotangent(bias, dy)
    return (dx, mx.zeros_like(weight), d_scales, d_biases, d_bias, d_lora_a, d_lora_b, mx.zeros_like(key))
