"""Input validation of the ops: every bad input raises a ValueError naming the
argument, the expected and the actual value, before any graph is built.

Scalars are checked in the op's own terms: the kernels compute in float32, so
``scale`` and ``dropout`` are rounded to float32 first and checked there (1e39 is
inf in float32; 0.99999999 is 1.0), and the rounded values are what every backend
receives.
"""

import math
import numbers

import mlx.core as mx
import numpy as np

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


def as_float32(value):
    """A Python float as the kernels see it (inf where float32 overflows)."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _in_float32(value, value32):
    return f"{value}" if value32 == float(value) or math.isnan(value32) else f"{value} ({value32} in float32)"


def check_dropout(dropout, key, who="fused_lora_linear"):
    """Validates a dropout rate and its key; returns p rounded to float32, as a float."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        fail("dropout", "a float in [0, 1)", type(dropout).__name__, who)
    p = as_float32(dropout)
    if not 0.0 <= p < 1.0:
        fail("dropout", "in [0, 1) as a float32 (the precision the op computes in)", _in_float32(dropout, p), who)
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
    """Returns scale rounded to float32, as a Python float."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        fail("scale", "a finite Python float", type(scale).__name__, who)
    scale32 = as_float32(scale)
    if not math.isfinite(scale32):
        fail("scale", "finite in float32 (the precision the op computes in)", _in_float32(scale, scale32), who)
    return scale32


# MLX's array dimensions are int32.
MAX_DIM = 2**31 - 1


def check_shape(shape, who="dropout_mask"):
    """Returns `shape` as a list of ints, each in [0, 2^31 - 1]."""
    try:
        dims = list(shape)
    except TypeError:
        fail("shape", "a sequence of ints", type(shape).__name__, who)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or not 0 <= int(d) <= MAX_DIM:
            fail("shape", f"a sequence of ints in [0, {MAX_DIM}]", tuple(dims), who)
    return [int(d) for d in dims]


def check_dtype(dtype, who="dropout_mask"):
    if dtype not in FLOAT_DTYPES:
        fail("dtype", "float32, float16 or bfloat16", dtype, who)


def check_adapters(x, n, bias, lora_a, lora_b, who="fused_lora_linear"):
    """bias (N,) in x's dtype or None, lora_a (K, r), lora_b (r, N); K = x.shape[-1]."""
    k = x.shape[-1]
    if bias is not None:
        check_array("bias", bias, ndim=1, who=who)
        if bias.shape[0] != n:
            fail("bias", f"shape ({n},) (N = weight.shape[0])", f"shape {tuple(bias.shape)}", who)
        if bias.dtype != x.dtype:
            fail("bias", f"x's dtype {x.dtype}", bias.dtype, who)
    check_adapter_shapes(k, n, lora_a, lora_b, who)


def check_adapter_shapes(k, n, lora_a, lora_b, who="fused_lora_linear"):
    """One adapter, lora_a (K, r) and lora_b (r, N), or n >= 1 stacked, (n, K, r) and
    (n, r, N); r >= 1."""
    if isinstance(lora_a, mx.array) and lora_a.ndim == 3:
        check_array("lora_a", lora_a, who=who)
        if lora_a.shape[0] < 1 or lora_a.shape[1] != k or lora_a.shape[2] < 1:
            fail("lora_a", f"(n, K, r) with n >= 1, K = {k} and r >= 1", f"shape {tuple(lora_a.shape)}", who)
        count, r = lora_a.shape[0], lora_a.shape[2]
        check_array("lora_b", lora_b, who=who)
        if tuple(lora_b.shape) != (count, r, n):
            fail("lora_b", f"(n, r, N) = ({count}, {r}, {n}), stacked as lora_a", f"shape {tuple(lora_b.shape)}", who)
        return
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


# What MLX's affine quantization supports (mx.quantize).
QUANT_BITS = (1, 2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)


def check_quantized_inputs(x, weight, scales, biases, bias, lora_a, lora_b, scale, dropout, key, group_size, bits):
    """Validates the quantized-base op's inputs (as nn.QuantizedLinear holds them);
    returns (scale, p) as Python floats."""
    who = "fused_qlora_linear"
    check_x(x, who)
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in QUANT_BITS:
        fail("bits", f"one of {', '.join(map(str, QUANT_BITS))}", bits, who)
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, numbers.Integral)
        or group_size not in QUANT_GROUP_SIZES
    ):
        fail("group_size", f"one of {', '.join(map(str, QUANT_GROUP_SIZES))}", group_size, who)
    k = x.shape[-1]
    if k % group_size:
        fail("group_size", f"a divisor of K = x.shape[-1] = {k}", group_size, who)
    if not isinstance(weight, mx.array):
        fail("weight", "an mx.array", type(weight).__name__, who)
    packed = k * bits // 32
    if weight.dtype != mx.uint32 or weight.ndim != 2 or weight.shape[1] != packed:
        fail(
            "weight",
            f"(N, K * bits / 32) = (N, {packed}) uint32 (packed as mx.quantize packs it) for K = {k}, bits = {bits}",
            f"{weight.dtype} array of shape {tuple(weight.shape)}",
            who,
        )
    n = weight.shape[0]
    groups = (n, k // group_size)
    for name, value in (("scales", scales), ("biases", biases)):
        check_array(name, value, ndim=2, who=who)
        if tuple(value.shape) != groups:
            fail(name, f"(N, K / group_size) = {groups}", f"shape {tuple(value.shape)}", who)
    check_adapters(x, n, bias, lora_a, lora_b, who)
    return check_scale(scale, who), check_dropout(dropout, key, who)


def check_scales(scale, count, who="fused_lora_linear"):
    """The per-adapter multipliers of n = `count` adapters as an (n,) float32 array: a
    Python float (the same for all), a sequence of n Python floats (each checked as
    ``check_scale``) or a float mx.array of shape (n,) (its values are not read here:
    that would synchronize)."""
    if isinstance(scale, mx.array):
        if scale.dtype not in FLOAT_DTYPES or tuple(scale.shape) != (count,):
            fail(
                "scale",
                f"a float array of shape (n,) = ({count},)",
                f"{scale.dtype} array of shape {tuple(scale.shape)}",
                who,
            )
        return scale.astype(mx.float32)
    if isinstance(scale, (list, tuple)):
        if len(scale) != count:
            fail("scale", f"one value per adapter, {count}", f"{len(scale)} values", who)
        return mx.array([check_scale(s, who) for s in scale], dtype=mx.float32)
    return mx.full((count,), check_scale(scale, who), dtype=mx.float32)


def check_adapter_ids(x, adapter_ids, who="fused_lora_linear"):
    """An int32 mx.array with an id per row of x (shape x.shape[:-1]) or per sequence
    (x.shape[:-2], broadcast over x's second-to-last axis); returns them per row, (M,).
    Their values (in [-1, n)) are checked where the op reads them, at evaluation: a
    check here would synchronize."""
    rows, sequences = tuple(x.shape[:-1]), tuple(x.shape[:-2])
    if not isinstance(adapter_ids, mx.array) or adapter_ids.dtype != mx.int32:
        actual = adapter_ids.dtype if isinstance(adapter_ids, mx.array) else type(adapter_ids).__name__
        fail("adapter_ids", "an int32 mx.array", actual, who)
    shape = tuple(adapter_ids.shape)
    if shape == rows:
        ids = adapter_ids
    elif x.ndim >= 2 and shape == sequences:
        ids = mx.broadcast_to(adapter_ids[..., None], rows)
    else:
        per_sequence = f" or {sequences} (one per sequence)" if x.ndim >= 2 else ""
        fail("adapter_ids", f"of shape {rows} (one id per row of x){per_sequence}", f"shape {shape}", who)
    return ids.reshape(math.prod(rows))
