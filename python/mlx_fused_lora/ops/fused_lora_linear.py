"""The fused LoRA linear op: one differentiable MLX op with its own backward.

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

Backends are picked by the default stream's device: the CPU runs the C++
extension. GPU devices run `reference.py` with the same mask (one warning), or, with
MLX_FUSED_LORA_GPU_KERNELS=1, the GPU kernels of `gpu_kernels.py` around MLX's
GEMMs: opt-in until they have been run and measured on GPU hardware.
"""

import functools
import math
import numbers
import warnings

import mlx.core as mx

from .._extension import _ext
from . import gpu_kernels, reference

_FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def _fail(arg, expected, actual):
    raise ValueError(f"fused_lora_linear: `{arg}` must be {expected}, got {actual}")


def _check_array(arg, value, ndim=None):
    if not isinstance(value, mx.array):
        _fail(arg, "an mx.array", type(value).__name__)
    if value.dtype not in _FLOAT_DTYPES:
        _fail(arg, "float32, float16 or bfloat16", value.dtype)
    if ndim is not None and value.ndim != ndim:
        _fail(arg, f"{ndim}-D", f"{value.ndim}-D array of shape {tuple(value.shape)}")


def check_dropout(dropout, key, who="fused_lora_linear"):
    """Validates a dropout rate and its key; returns p as a float."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise ValueError(f"{who}: `dropout` must be a float in [0, 1), got {type(dropout).__name__}")
    p = float(dropout)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{who}: `dropout` must be in [0, 1), got {dropout}")
    if p > 0.0:
        if key is None:
            raise ValueError(f"{who}: `key` must be an mx.random.key array when dropout > 0, got None")
        if not isinstance(key, mx.array) or key.dtype != mx.uint32 or tuple(key.shape) != (2,):
            actual = (
                f"{key.dtype} array of shape {tuple(key.shape)}" if isinstance(key, mx.array) else type(key).__name__
            )
            raise ValueError(f"{who}: `key` must be a uint32 array of shape (2,) (mx.random.key), got {actual}")
    return p


def check_inputs(x, weight, bias, lora_a, lora_b, scale, dropout, key):
    """Raises ValueError naming the argument, the expected and the actual value."""
    _check_array("x", x)
    if x.ndim < 1:
        _fail("x", "at least 1-D with last dim K", "a 0-d array")
    _check_array("weight", weight, ndim=2)
    k = x.shape[-1]
    n = weight.shape[0]
    if weight.shape[1] != k:
        _fail("weight", f"(N, K) with K = x.shape[-1] = {k}", f"shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        _fail("weight", f"x's dtype {x.dtype}", weight.dtype)
    if bias is not None:
        _check_array("bias", bias, ndim=1)
        if bias.shape[0] != n:
            _fail("bias", f"shape ({n},) (N = weight.shape[0])", f"shape {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            _fail("bias", f"x's dtype {x.dtype}", bias.dtype)
    _check_array("lora_a", lora_a, ndim=2)
    if lora_a.shape[0] != k or lora_a.shape[1] < 1:
        _fail("lora_a", f"(K, r) with K = {k} and r >= 1", f"shape {tuple(lora_a.shape)}")
    r = lora_a.shape[1]
    _check_array("lora_b", lora_b, ndim=2)
    if tuple(lora_b.shape) != (r, n):
        _fail("lora_b", f"(r, N) = ({r}, {n})", f"shape {tuple(lora_b.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        _fail("scale", "a finite Python float", type(scale).__name__)
    if not math.isfinite(float(scale)):
        _fail("scale", "finite", scale)
    return check_dropout(dropout, key)


def dropout_mask(key, shape, p, dtype=mx.float32):
    """The dropout multipliers `fused_lora_linear` applies to an x of `shape` under
    `key`: 1/(1-p) where an element is kept, 0 where it is dropped."""
    p = check_dropout(p, key, who="dropout_mask")
    shape = [int(d) for d in shape]
    if p == 0:
        return mx.ones(shape, dtype=dtype)
    backend = gpu_kernels.gpu_backend()
    if backend is None:
        return _ext.dropout_mask(key, shape, p, dtype, stream=mx.cpu)
    return gpu_kernels.dropout_mask_gpu(backend, key, shape, p).astype(dtype)


def fused_lora_linear(x, weight, bias, lora_a, lora_b, *, scale, dropout=0.0, key=None):
    """``y = x @ weight.T + bias + scale * (dropout(x) @ lora_a) @ lora_b``.

    Args:
        x: ``(..., K)``, float32, float16 or bfloat16.
        weight: ``(N, K)`` in x's dtype (frozen: its gradient is never computed
            unless asked for).
        bias: ``(N,)`` in x's dtype, or None.
        lora_a: ``(K, r)``; lora_b: ``(r, N)``; any float dtype (mlx-lm keeps them
            float32). Math is float32; the output has x's dtype and x is never
            copied to a wider type.
        scale: the full multiplier of the LoRA term (mlx-lm's ``scale``,
            PEFT's ``alpha / r``).
        dropout: p in [0, 1), applied to x on the LoRA path only.
        key: an ``mx.random.key`` array, required when p > 0; the same key gives
            the same mask (``dropout_mask``) on every backend.
    """
    p = check_inputs(x, weight, bias, lora_a, lora_b, scale, dropout, key)
    scale = float(scale)
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    args = [x2, weight] + ([bias] if bias is not None else []) + [lora_a, lora_b]
    args += [key] if p > 0 else []
    backend = gpu_kernels.gpu_backend()
    if mx.default_device() == mx.cpu:
        y2 = _cpu_op(scale, p, bias is not None)(*args)[0]
    elif backend is not None:
        y2 = _gpu_op(backend, scale, p, bias is not None)(*args)[0]
    else:
        y2 = _reference_fallback(x2, weight, bias, lora_a, lora_b, scale, p, key)
    return y2.reshape(*x.shape[:-1], n)


def _unpack(args, has_bias, has_key):
    x, weight, rest = args[0], args[1], list(args[2:])
    bias = rest.pop(0) if has_bias else None
    lora_a, lora_b = rest[0], rest[1]
    key = rest[2] if has_key else None
    return x, weight, bias, lora_a, lora_b, key


def _cotangents(dx, dy, x, bias, d_lora_a, d_lora_b, key):
    """The VJP's cotangents in the op's input order. The frozen weight's is a lazy
    dY.T @ x: never evaluated in LoRA training (nothing asks for it), correct if asked."""
    grads = [dx, dy.T @ x]
    if bias is not None:
        grads.append(dy.sum(axis=0).astype(bias.dtype))
    grads += [d_lora_a, d_lora_b]
    if key is not None:
        grads.append(mx.zeros_like(key))
    return tuple(grads)


@functools.cache
def _cpu_op(scale, p, has_bias):
    """The op for one (scale, p, bias?) as an mx.custom_function over the C++ primitives.

    scale and p are constants of the op (also under mx.compile); the key is an input.
    """
    has_key = p > 0

    @mx.custom_function
    def op(*args):
        x, weight, bias, lora_a, lora_b, key = _unpack(args, has_bias, has_key)
        return tuple(_ext.lora_forward(x, weight, bias, lora_a, lora_b, key, scale=scale, dropout=p))

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        x, weight, bias, lora_a, lora_b, key = _unpack(primals, has_bias, has_key)
        dy = cotangents[0].astype(x.dtype)
        h = outputs[1]
        ds, d_lora_b = _ext.lora_low_rank_grad(dy, h, lora_b, scale=scale)
        dx = _ext.lora_input_grad(dy, weight, ds, lora_a, key, dropout=p)
        d_lora_a = _ext.lora_down_grad(x, ds, lora_a, key, dropout=p)
        return _cotangents(dx, dy, x, bias, d_lora_a, d_lora_b, key)

    return op


@functools.cache
def _gpu_op(backend, scale, p, has_bias):
    return gpu_op(gpu_kernels.Kernels(backend), scale, p, has_bias)


def gpu_op(kernels, scale, p, has_bias):
    """The op as an mx.custom_function over `kernels` (gpu_kernels.Kernels) and MLX's
    GEMMs. The same formulas as the CPU op; the masked rank-r passes are the kernels'."""
    has_key = p > 0
    f32 = mx.float32

    @mx.custom_function
    def op(*args):
        x, weight, bias, lora_a, lora_b, key = _unpack(args, has_bias, has_key)
        h = kernels.dropout_down_proj(x, lora_a.astype(f32), key, p)
        lora_term = h.astype(x.dtype) @ (scale * lora_b).astype(x.dtype)
        if has_bias:
            lora_term = lora_term + bias
        return mx.addmm(lora_term, x, weight.T), h

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        x, weight, bias, lora_a, lora_b, key = _unpack(primals, has_bias, has_key)
        dy = cotangents[0].astype(x.dtype)
        h = outputs[1]
        ds = scale * (dy @ lora_b.T.astype(x.dtype)).astype(f32)
        d_lora_b = (scale * (h.astype(x.dtype).T @ dy)).astype(lora_b.dtype)
        d_lora_a = kernels.dropout_down_grad(x, ds, key, p).astype(lora_a.dtype)
        dx = mx.addmm(kernels.masked_input_grad(ds, lora_a.astype(f32), key, p, x.dtype), dy, weight)
        return _cotangents(dx, dy, x, bias, d_lora_a, d_lora_b, key)

    return op


@functools.cache
def _warn_fallback(device):
    warnings.warn(
        f"mlx_fused_lora: fused kernels for {device} are not enabled (set "
        f"{gpu_kernels.ENABLE_VARIABLE}=1 to try them); running the plain-MLX reference "
        "(same results and dropout masks, plain-MLX speed).",
        stacklevel=3,
    )


def _reference_fallback(x, weight, bias, lora_a, lora_b, scale, p, key):
    _warn_fallback(str(mx.default_device()))
    mask = dropout_mask(key, x.shape, p) if p > 0 else None
    return reference.lora_linear(x, weight, bias, lora_a, lora_b, scale, mask)
