"""Input validation of the ops: every bad input raises a ValueError naming the
argument, the expected and the actual value, before any graph is built."""

import math
import numbers

import mlx.core as mx

FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def fail(arg, expected, actual, who="fused_lora_linear"):
    raise ValueError(f"{who}: `{arg}` must be {expected}, got {actual}")


def check_array(arg, value, ndim=None, who="fused_lora_linear"):
    if not isinstance(value, mx.array):
        fail(arg, "an mx.array", type(value).__name__, who)
    if value.dtype not in FLOAT_DTYPES:
        fail(arg, "float32, float16 or bfloat16", value.dtype, who)
    if ndim is not None and value.ndim != ndim:
        fail(arg, f"{ndim}-D", f"{value.ndim}-D array of shape {tuple(value.shape)}", who)


def check_dropout(dropout, key, who="fused_lora_linear"):
    """Validates a dropout rate and its key; returns p as a float."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        fail("dropout", "a float in [0, 1)", type(dropout).__name__, who)
    p = float(dropout)
    if not 0.0 <= p < 1.0:
        fail("dropout", "in [0, 1)", dropout, who)
    if p > 0.0:
        if key is None:
            fail("key", "an mx.random.key array when dropout > 0", None, who)
        if not isinstance(key, mx.array) or key.dtype != mx.uint32 or tuple(key.shape) != (2,):
            actual = (
                f"{key.dtype} array of shape {tuple(key.shape)}" if isinstance(key, mx.array) else type(key).__name__
            )
            fail("key", "a uint32 array of shape (2,) (mx.random.key)", actual, who)
    return p


def check_scale(scale, who="fused_lora_linear"):
    """Returns scale as a Python float."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        fail("scale", "a finite Python float", type(scale).__name__, who)
    if not math.isfinite(float(scale)):
        fail("scale", "finite", scale, who)
    return float(scale)


def check_adapters(x, n, bias, lora_a, lora_b, who="fused_lora_linear"):
    """bias (N,) in x's dtype or None, lora_a (K, r), lora_b (r, N); K = x.shape[-1]."""
    k = x.shape[-1]
    if bias is not None:
        check_array("bias", bias, ndim=1, who=who)
        if bias.shape[0] != n:
            fail("bias", f"shape ({n},) (N = weight.shape[0])", f"shape {tuple(bias.shape)}", who)
        if bias.dtype != x.dtype:
            fail("bias", f"x's dtype {x.dtype}", bias.dtype, who)
    check_array("lora_a", lora_a, ndim=2, who=who)
    if lora_a.shape[0] != k or lora_a.shape[1] < 1:
        fail("lora_a", f"(K, r) with K = {k} and r >= 1", f"shape {tuple(lora_a.shape)}", who)
    r = lora_a.shape[1]
    check_array("lora_b", lora_b, ndim=2, who=who)
    if tuple(lora_b.shape) != (r, n):
        fail("lora_b", f"(r, N) = ({r}, {n})", f"shape {tuple(lora_b.shape)}", who)


def check_x(x, who="fused_lora_linear"):
    check_array("x", x, who=who)
    if x.ndim < 1:
        fail("x", "at least 1-D with last dim K", "a 0-d array", who)


def check_inputs(x, weight, bias, lora_a, lora_b, scale, dropout, key):
    """Validates the dense op's inputs; returns (scale, p) as Python floats."""
    check_x(x)
    check_array("weight", weight, ndim=2)
    k = x.shape[-1]
    if weight.shape[1] != k:
        fail("weight", f"(N, K) with K = x.shape[-1] = {k}", f"shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        fail("weight", f"x's dtype {x.dtype}", weight.dtype)
    check_adapters(x, weight.shape[0], bias, lora_a, lora_b)
    scale = check_scale(scale)
    return scale, check_dropout(dropout, key)
