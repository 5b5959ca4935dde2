"""The public fused LoRA linear op and its dropout mask: validate, lay out, dispatch.

    y = x @ weight.T + bias + scale * (dropout(x) @ lora_a) @ lora_b

Forward saves nothing but what the backward needs: x itself and h = dropout(x) @ lora_a
(M x r, float32). The dropout mask is a pure function of (key, element index of x)
(csrc/kernels/lora_dropout.h), recomputed where the backward needs it, never stored.

Backward, with c = scale, m the dropout multipliers, dY the output cotangent:

    dS = c * dY @ lora_b.T          dB = c * h.T @ dY        (one pass over dY)
    dA = (m * x).T @ dS                                      (one pass over x)
    dX = dY @ weight + m * (dS @ lora_a.T)                   (GEMM + epilogue)
    db = sum of dY over rows

Each is its own graph node, so MLX evaluates only the cotangents that were asked
for: training the adapters of the first layer never computes dX's GEMM. The frozen
weight's gradient is returned as a lazy plain matmul: never evaluated in LoRA
training (it is not asked for), yet correct if someone does ask.

Mixed-adapter batches: with ``lora_a (n, K, r)``, ``lora_b (n, r, N)`` stacked and
``adapter_ids``, each row takes its own adapter (-1: the base product alone), with its
own scale; one base GEMM for the whole batch, the rank-r work grouped by adapter. The
single-adapter op is the case n = 1 (every row on adapter 0): on the CPU the same C++
passes, with the same bits.

The path of x: ``checks`` validates, ``layout`` puts the inputs into fixed slots,
``backends.current()`` (chosen by the default device) runs them: the C++
extension on the CPU (backends/cpu.py), the GPU kernels or the plain-MLX reference
on a GPU (backends/gpu.py, backends/reference.py); ``backends.current_mixed()`` runs
the mixed slots (the same backends: the GPU kernels take the ids too).
"""

import math

import mlx.core as mx

from . import backends, layout
from .checks import check_dropout, check_dtype, check_inputs, check_shape


def dropout_mask(key, shape, p, dtype=mx.float32):
    """The dropout multipliers `fused_lora_linear` applies to an x of `shape` under
    `key`: 1/(1-p) where an element is kept, 0 where it is dropped."""
    p = check_dropout(p, key, who="dropout_mask")
    shape = check_shape(shape)
    check_dtype(dtype)
    if p == 0:
        return mx.ones(shape, dtype=dtype)
    return backends.current().dropout_mask(key, shape, p, dtype)


def fused_lora_linear(x, weight, bias, lora_a, lora_b, *, scale, dropout=0.0, key=None, adapter_ids=None):
    """``y = x @ weight.T + bias + scale * (dropout(x) @ lora_a) @ lora_b``, each row on
    its own adapter when they are stacked.

    Args:
        x: ``(..., K)``, float32, float16 or bfloat16.
        weight: ``(N, K)`` in x's dtype (frozen: its gradient is never computed
            unless asked for).
        bias: ``(N,)`` in x's dtype, or None.
        lora_a: ``(K, r)``; lora_b: ``(r, N)``; any float dtype (mlx-lm keeps them
            float32). Math is float32; the output has x's dtype and x is never
            copied to a wider type. Or n adapters stacked: ``(n, K, r)`` and
            ``(n, r, N)`` (one rank: pad a smaller one with zeros), rows routed by
            ``adapter_ids``.
        scale: the full multiplier of the LoRA term (mlx-lm's ``scale``,
            PEFT's ``alpha / r``); finite once rounded to float32. With stacked
            adapters also one per adapter: a sequence of n floats or an ``(n,)``
            float mx.array (an input of the op: changing it retraces nothing under
            ``mx.compile``, and its gradient is defined).
        dropout: p in [0, 1) once rounded to float32, applied to x on the LoRA
            path only.
        key: an ``mx.random.key`` array, required when p > 0; the same key gives
            the same mask (``dropout_mask``) on every backend, whatever the adapters.
        adapter_ids: int32 mx.array, the adapter of each row of x (shape
            ``x.shape[:-1]``) or of each sequence (``x.shape[:-2]``), in [-1, n): -1
            gives the base product alone. Required when n > 1. An id out of range is
            an error when the result is evaluated (a RuntimeError from ``mx.eval``
            naming ``adapter_ids``, the range and the id): checking earlier would
            synchronize.

    Empty dimensions give empty results, as plain MLX's matmul does: M = 0 or N = 0
    an empty y, K = 0 the empty sum (y = bias, or zeros). Non-finite values
    propagate as they do through plain MLX's ops (an inf in ``lora_b`` gives ±inf,
    not NaN); only r >= 1 is required. An adapter no row uses gets zero gradients.
    """
    mixed = layout.is_mixed(lora_a, scale, adapter_ids)
    # The mixed op's scales are checked as the routing slot (layout.routing); its C++
    # multiplier is 1 * scales[i].
    op_scale, p = check_inputs(x, weight, bias, lora_a, lora_b, 1.0 if mixed else scale, dropout, key)
    k, n = x.shape[-1], weight.shape[0]
    m = math.prod(x.shape[:-1])  # not reshape(-1, k): MLX cannot infer -1 when K = 0
    if mixed:
        lora_a, lora_b, scales, ids = layout.routing(x, lora_a, lora_b, scale, adapter_ids)
        inputs = layout.mixed_op_inputs(x.reshape(m, k), weight, bias, lora_a, lora_b, key, p, scales, ids)
        y = backends.current_mixed().lora_linear(inputs, op_scale, p)
    else:
        inputs = layout.op_inputs(x.reshape(m, k), weight, bias, *layout.single(lora_a, lora_b), key, p)
        y = backends.current().lora_linear(inputs, op_scale, p)
    return y.reshape(*x.shape[:-1], n)
