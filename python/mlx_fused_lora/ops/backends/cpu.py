"""The CPU backend: the op as an mx.custom_function over the C++ primitives.

The forward and each cotangent are their own graph nodes (csrc/cpu/primitives.h),
so MLX evaluates only the cotangents that were asked for. The single-adapter op and
the mixed one (``layout.MixedInputs``: stacked adapters, per-adapter scales, an id per
row) are one function over the same primitives: the mixed op's two routing slots are
passed on to them when present.
"""

import functools

import mlx.core as mx

from ..._extension import _ext
from .. import layout, reference


def _scales_cotangent(dy, h, lora_b, routing, scale):
    """d(scale_i) = sum over adapter i's rows of (scale * h @ B_i) . dY: the low-rank
    gradient's dB with every multiplier at `scale`, against B. Lazy: evaluated only if
    someone asks for the scales' gradient (LoRA training does not)."""
    scales, ids = routing
    _, db_unit = _ext.lora_low_rank_grad(dy, h, lora_b, mx.ones_like(scales), ids, scale=scale)
    return (db_unit.astype(mx.float32) * lora_b.astype(mx.float32)).sum(axis=(1, 2)).astype(scales.dtype)


def _lora_grads(x, dy, h, lora_a, lora_b, key, routing, scale, p):
    """(dS, dA, dB) and the scales' cotangent (None without routing) from the primitives."""
    ids = routing[1:]
    ds, d_lora_b = _ext.lora_low_rank_grad(dy, h, lora_b, *routing, scale=scale)
    d_lora_a = _ext.lora_down_grad(x, ds, lora_a, key, *ids, dropout=p)
    d_scales = _scales_cotangent(dy, h, lora_b, routing, scale) if routing else None
    return ds, d_lora_a, d_lora_b, d_scales


@functools.cache
def _op(scale, p):
    """The op for one (scale, p): constants of the op, also under mx.compile; the key
    (and for the mixed op the scales and ids) are inputs: the slots of layout.Inputs
    or layout.MixedInputs."""

    @mx.custom_function
    def op(x, weight, bias, lora_a, lora_b, key, *routing):
        return tuple(_ext.lora_forward(x, weight, bias, lora_a, lora_b, key, *routing, scale=scale, dropout=p))

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        x, weight, _, lora_a, lora_b, key, *routing = primals
        dy = cotangents[0].astype(x.dtype)
        ds, d_lora_a, d_lora_b, d_scales = _lora_grads(x, dy, outputs[1], lora_a, lora_b, key, routing, scale, p)
        dx = _ext.lora_input_grad(dy, weight, ds, lora_a, key, *routing[1:], dropout=p)
        grads = dict(dx=dx, d_lora_a=d_lora_a, d_lora_b=d_lora_b)
        if routing:
            return layout.mixed_cotangents(layout.MixedInputs(*primals), dy, **grads, d_scales=d_scales)
        return layout.cotangents(layout.Inputs(*primals), dy, **grads)

    return op


def _with_traced_jvp(forward):
    """``forward`` as an mx.custom_function whose jvp is forward mode through the traced
    primitives, over only the inputs that have a tangent (by default every input of a
    custom function would be differentiated; MLX's quantized matmul has a jvp for x only)."""
    op = mx.custom_function(forward)

    @op.jvp
    def op_jvp(primals, tangents):
        active = [i for i, t in enumerate(tangents) if t is not None]

        def along(*values):
            args = list(primals)
            for i, v in zip(active, values, strict=True):
                args[i] = v
            return forward(*args)

        return tuple(mx.jvp(along, [primals[i] for i in active], [tangents[i] for i in active])[1])

    return op


def quantized_base(x, weight, scales, biases, *, transpose, group_size, bits):
    """The quantized base's product: x @ W.T (transpose) or dY @ W, in x's dtype.

    The extension's primitive (csrc/cpu/quantized_base.h): W dequantized a tile of rows
    at a time (a reused float32 buffer of about 1 MiB) into BLAS GEMMs, never a
    dequantized copy of the whole W. MLX 0.32's CPU quantized_matmul runs no BLAS and
    was measured here at ~70x the time at M = 256, K = N = 2048, 4-bit."""
    return _ext.quantized_base_matmul(
        x, weight, scales, biases, group_size=group_size, bits=bits, transpose=transpose, stream=mx.cpu
    )


@functools.cache
def _qop(scale, p, group_size, bits):
    """The quantized-base op: the base products by `quantized_base`, the LoRA path
    through the same primitives and recomputed mask as the dense op (their *_onto
    forms add it onto the base product); mixed with the routing slots of
    layout.QMixedInputs."""
    base = functools.partial(quantized_base, group_size=group_size, bits=bits)

    def forward(x, weight, scales, biases, bias, lora_a, lora_b, key, *routing):
        y_base = base(x, weight, scales, biases, transpose=True)
        return tuple(_ext.lora_forward_onto(x, y_base, bias, lora_a, lora_b, key, *routing, scale=scale, dropout=p))

    op = _with_traced_jvp(forward)

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        x, weight, scales, biases, _, lora_a, lora_b, key, *routing = primals
        dy = cotangents[0].astype(x.dtype)
        ds, d_lora_a, d_lora_b, d_lora_scales = _lora_grads(x, dy, outputs[1], lora_a, lora_b, key, routing, scale, p)
        dx_base = base(dy, weight, scales, biases, transpose=False)
        dx = _ext.lora_input_grad_onto(dx_base, ds, lora_a, key, *routing[1:], dropout=p)
        # Lazy: evaluated only if someone asks for the scales' or biases' gradient. MLX's
        # quantized_matmul defines it (the same function of the scales and biases).
        _, (d_scales, d_biases) = mx.vjp(
            lambda s, b: reference.quantized_matmul(
                x, weight, s, b, transpose=True, group_size=group_size, bits=bits
            ).astype(x.dtype),
            [scales, biases],
            [dy],
        )
        return layout.q_cotangents(
            primals,
            dy,
            dx=dx,
            d_lora_a=d_lora_a,
            d_lora_b=d_lora_b,
            d_scales=d_scales,
            d_biases=d_biases,
            d_lora_scales=d_lora_scales,
        )

    return op


def qlora_linear(inputs, scale, p, *, group_size, bits):
    """y (M, N) for the fixed slots `inputs` (layout.QInputs or layout.QMixedInputs)."""
    return _qop(scale, p, group_size, bits)(*inputs)[0]


def lora_linear(inputs, scale, p):
    """y (M, N) for the fixed slots `inputs` (layout.Inputs or layout.MixedInputs)."""
    return _op(scale, p)(*inputs)[0]


@functools.cache
def _onto_op(p):
    """The LoRA term onto a given base product (layout.OntoInputs): the mixed op's
    primitives without the base GEMMs; x's cotangent is the LoRA term's part alone."""

    def forward(x, base, lora_a, lora_b, key, scales, ids):
        no_bias = mx.zeros((0,), dtype=x.dtype)
        return tuple(_ext.lora_forward_onto(x, base, no_bias, lora_a, lora_b, key, scales, ids, scale=1.0, dropout=p))

    op = _with_traced_jvp(forward)

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        primals = layout.OntoInputs(*primals)
        x, _, lora_a, lora_b, key, scales, ids = primals
        dy = cotangents[0].astype(x.dtype)
        ds, d_lora_a, d_lora_b, d_scales = _lora_grads(x, dy, outputs[1], lora_a, lora_b, key, (scales, ids), 1.0, p)
        dx = _ext.lora_input_grad_onto(mx.zeros_like(x), ds, lora_a, key, ids, dropout=p)
        return layout.onto_cotangents(primals, dy, dx=dx, d_lora_a=d_lora_a, d_lora_b=d_lora_b, d_scales=d_scales)

    return op


def lora_onto(inputs, p):
    """y (M, N) for the slots `inputs` (layout.OntoInputs)."""
    return _onto_op(p)(*inputs)[0]


def dropout_mask(key, shape, p, dtype):
    return _ext.dropout_mask(key, shape, p, dtype, stream=mx.cpu)
