"""The one place that lays out the op's inputs in fixed slots, and its cotangents.

Every backend's single-adapter op takes exactly these six arrays, in this order:

    (x2d, weight, bias, lora_a, lora_b, key)                      (``Inputs``)

- ``x2d`` is x with its leading dimensions flattened: (M, K);
- an absent ``bias`` is a 0-size array in x's dtype (the backends treat a 0-size
  bias as no bias, which for N = 0 is the same thing);
- the ``key`` is always passed: ``zeros((2,), uint32)`` when p = 0, where no backend
  reads it. So the graph has the same inputs whatever p and bias are, and no
  backend decides again which inputs are present.

The mixed-adapter op (rows of one batch on different adapters) is the same six slots
with the adapters stacked and two routing slots after them:

    (x2d, weight, bias, lora_a, lora_b, key, scales, adapter_ids)  (``MixedInputs``)

- ``lora_a`` (n, K, r), ``lora_b`` (n, r, N): n adapters of one rank (pad a smaller
  rank with zeros);
- ``scales`` (n,) float32: adapter i's multiplier of the LoRA term;
- ``adapter_ids`` (M,) int32: each row's adapter in [-1, n), -1 for the base product
  alone. An id out of range is an error where the op reads the ids (at evaluation,
  never a read out of bounds): checking it here would synchronize.

The single-adapter op is this op's n = 1 case, every row on adapter 0 with the
multiplier ``scale``: on the CPU both run the same C++ passes (the routing slots are
simply absent, csrc/cpu/adapter_rows.h), and the n = 1 mixed op gives the single op's
bits. Decision (per-adapter scales): an array slot, not a Python constant and not
folded into ``lora_b`` before the op. As an input it can change (a hot-swapped adapter
with another alpha, issue 20) without retracing a compiled function, and the CPU
passes apply it where they read each used adapter's B anyway (into its float32 copy, or
on the fly for an adapter read in place), so it costs no pass over the stacked B
(folding ``s_i * B_i`` in the graph would add one each call, and its backward another). Its cotangent is built lazily, evaluated only if asked for.
The single-adapter op keeps ``scale`` a Python float (a constant of the op, as
before). A GPU backend takes the mixed slots as they are (backends/gpu.py: the kernels,
or the lean fallback, backends/reference.py).

The VJP returns one cotangent per slot, in the same order (``cotangents``,
``mixed_cotangents``).

The LoRA term onto a base product the caller made (``fused_lora_onto``: a mixture of
experts' per-expert base) takes the mixed slots with that product in place of the weight
and no bias (``OntoInputs``).

The quantized-base op (``fused_qlora_linear``) has the same slots with the packed
weight's three arrays in place of ``weight``, and the same two routing slots when mixed:

    (x2d, weight, scales, biases, bias, lora_a, lora_b, key)    (``QInputs``)
    (..., key, lora_scales, adapter_ids)                        (``QMixedInputs``)
"""

import math
from typing import NamedTuple

import mlx.core as mx

from . import checks


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


def key_slot(key, p):
    """The key slot's value: ``key``, or `no_key` when p = 0 (``key`` may be None then)."""
    return no_key() if p == 0 or key is None else key


def op_inputs(x2d, weight, bias, lora_a, lora_b, key, p):
    """The fixed slots for validated inputs (``key`` may be None when p = 0)."""
    if bias is None:
        bias = mx.zeros((0,), dtype=x2d.dtype)
    return Inputs(x2d, weight, bias, lora_a, lora_b, key_slot(key, p))


def has_bias(bias_slot):
    """Whether the bias slot holds a bias (an absent one is 0-size)."""
    return bias_slot.size > 0


def bias_or_none(bias_slot):
    return bias_slot if has_bias(bias_slot) else None


class MixedInputs(NamedTuple):
    x: mx.array
    weight: mx.array
    bias: mx.array
    lora_a: mx.array  # (n, K, r)
    lora_b: mx.array  # (n, r, N)
    key: mx.array
    scales: mx.array  # (n,) float32
    adapter_ids: mx.array  # (M,) int32 in [-1, n)


def mixed_op_inputs(x2d, weight, bias, lora_a, lora_b, key, p, scales, adapter_ids):
    """The mixed op's fixed slots for validated inputs (lora_a, lora_b stacked)."""
    return MixedInputs(*op_inputs(x2d, weight, bias, lora_a, lora_b, key, p), scales, adapter_ids)


def is_mixed(lora_a, scale, adapter_ids):
    """Whether a call takes the mixed slots: ids given, more than one adapter stacked,
    or the scale given per adapter. A stack of one adapter with a float scale and no
    ids is the single-adapter op (``single``)."""
    stacked = isinstance(lora_a, mx.array) and lora_a.ndim == 3 and lora_a.shape[0] != 1
    return adapter_ids is not None or stacked or isinstance(scale, (mx.array, list, tuple))


def single(lora_a, lora_b):
    """One adapter as the single-adapter op takes it: 2-D (a stack of one unstacked)."""
    return (lora_a[0], lora_b[0]) if lora_a.ndim == 3 else (lora_a, lora_b)


def routing(x, lora_a, lora_b, scale, adapter_ids, who="fused_lora_linear"):
    """The mixed slots' adapters, scales and ids for validated adapter shapes: adapters
    stacked (one 2-D adapter is a stack of one), scales (n,) float32, ids per row (M,)
    int32 (every row on adapter 0 when n = 1 and no ids are given)."""
    if lora_a.ndim == 2:
        lora_a, lora_b = lora_a[None], lora_b[None]
    count = lora_a.shape[0]
    scales = checks.check_scales(scale, count, who)
    if adapter_ids is None:
        if count != 1:
            checks.fail("adapter_ids", f"an int32 id per row of x with n = {count} stacked adapters", None, who)
        return lora_a, lora_b, scales, mx.zeros((math.prod(x.shape[:-1]),), dtype=mx.int32)
    return lora_a, lora_b, scales, checks.check_adapter_ids(x, adapter_ids, who)


def cotangents(primals, dy, *, dx, d_lora_a, d_lora_b):
    """The VJP's cotangents, one per slot of ``primals`` (an ``Inputs``).

    The frozen weight's is a lazy dY.T @ x: never evaluated in LoRA training
    (nothing asks for it), correct if someone does ask. The bias's is the row sum
    of dY (an empty array for an absent bias), the key's zeros.
    """
    x, _, bias, _, _, key = primals
    return (dx, dy.T @ x, _bias_cotangent(bias, dy), d_lora_a, d_lora_b, mx.zeros_like(key))


def mixed_cotangents(primals, dy, *, dx, d_lora_a, d_lora_b, d_scales):
    """The mixed op's cotangents, one per slot of ``primals`` (a ``MixedInputs``): those
    of ``cotangents``, then the scales' and zeros for the ids."""
    dense = cotangents(Inputs(*primals[:6]), dy, dx=dx, d_lora_a=d_lora_a, d_lora_b=d_lora_b)
    return (*dense, d_scales, mx.zeros_like(primals[7]))


class OntoInputs(NamedTuple):
    """The slots of the LoRA term onto a given base product (``fused_lora_onto``): the
    mixed op's, with the caller's base product (M, N) in place of the weight and no bias
    (the caller's base includes its own)."""

    x: mx.array
    base: mx.array  # (M, N) in x's dtype
    lora_a: mx.array  # (n, K, r)
    lora_b: mx.array  # (n, r, N)
    key: mx.array
    scales: mx.array  # (n,) float32
    adapter_ids: mx.array  # (M,) int32 in [-1, n)


def onto_cotangents(primals, dy, *, dx, d_lora_a, d_lora_b, d_scales):
    """The cotangents of ``OntoInputs``' slots: the base's is dY itself."""
    return (dx, dy, d_lora_a, d_lora_b, mx.zeros_like(primals.key), d_scales, mx.zeros_like(primals.adapter_ids))


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


class QMixedInputs(NamedTuple):
    x: mx.array
    weight: mx.array
    scales: mx.array
    biases: mx.array
    bias: mx.array
    lora_a: mx.array  # (n, K, r)
    lora_b: mx.array  # (n, r, N)
    key: mx.array
    lora_scales: mx.array  # (n,) float32: the adapters' multipliers (``scales`` is the base's)
    adapter_ids: mx.array  # (M,) int32 in [-1, n)


def q_mixed_op_inputs(x2d, weight, scales, biases, bias, lora_a, lora_b, key, p, lora_scales, adapter_ids):
    """The mixed quantized-base op's fixed slots."""
    dense = q_op_inputs(x2d, weight, scales, biases, bias, lora_a, lora_b, key, p)
    return QMixedInputs(*dense, lora_scales, adapter_ids)


def q_cotangents(primals, dy, *, dx, d_lora_a, d_lora_b, d_scales, d_biases, d_lora_scales=None):
    """The quantized op's cotangents, one per slot of ``primals`` (a ``QInputs``).

    The packed weight's is zeros: MLX defines no gradient for quantized weights.
    The scales' and biases' are MLX's own (lazy: evaluated only if asked for). For a
    ``QMixedInputs``, ``d_lora_scales`` and zeros for the ids follow.
    """
    x, weight, _, _, bias, _, _, key = primals[:8]
    d_bias = _bias_cotangent(bias, dy)
    dense = (dx, mx.zeros_like(weight), d_scales, d_biases, d_bias, d_lora_a, d_lora_b, mx.zeros_like(key))
    return dense if len(primals) == 8 else (*dense, d_lora_scales, mx.zeros_like(primals[9]))
