"""The lean fallback backend: plain MLX on the device, for GPUs without (working) kernels.

The op as mlx-lm formulates its LoRA layer, in x's dtype (the oracle's formula,
``reference.down_project`` and ``reference.lora_terms``): the base GEMM, ``h = (m * x) @
A``, ``scale * h @ B``, adapters cast to x's dtype (r-sized casts; x and W are never
copied to float32). The dropout mask is generated on the device by MLX's integer ops
(``device_dropout_mask``: the same bits as ``csrc/kernels/lora_dropout.h``), a block of
``STEP_ELEMENTS`` at a time, each block's dropped rows going straight into their part
of ``h``, and never stored: an ``mx.custom_function`` whose VJP regenerates it from the
key, as the fused op does, and differentiates the same formula (which recomputes the
rank-r ``h``). What the backward holds is what the caller holds anyway (x, W, the
adapters, the key); the mask's transients are a block's, whatever M*K is.

Used, with one warning, where MLX_FUSED_LORA_GPU_KERNELS=0 or no kernels exist, for a
quantized base on a GPU, and by ``backends/gpu.py`` for a configuration whose kernels
failed their self-check.

The mixed slots (``layout.MixedInputs``, ``layout.QMixedInputs``: stacked adapters, the
multiplier of adapter i ``scale * scales[i]``, an id per row) run the same recomputing
function over the same formula with the ids (the oracle's per-row term: GEMMs over the
concatenated rank n*r, in x's dtype): the mask regenerated in the backward, no float32
copy, and no per-row temporary in the gradient (MLX's gradient of ``gather_mm`` would
form each row's outer product, M x r x (K + N) elements). An id outside [-1, n) gives a
NaN row there (no read out of bounds; the CPU op raises).
"""

import functools
import warnings

import mlx.core as mx
import numpy as np

from .. import layout, reference

U32 = mx.uint32


@functools.cache
def _warn_once(device, hint):
    warnings.warn(
        f"mlx_fused_lora: fused kernels for {device} are not enabled{hint}; running the plain-MLX "
        "formulation on the device (same results to the input dtype's precision, same dropout masks, "
        "plain-MLX speed).",
        stacklevel=4,
    )


def _mix(h):
    """lora_dropout.h's mfl_mix32 over uint32 arrays (products wrap, as in C)."""
    h = h ^ (h >> 16)
    h = h * mx.array(0x7FEB352D, dtype=U32)
    h = h ^ (h >> 15)
    h = h * mx.array(0x846CA68B, dtype=U32)
    return h ^ (h >> 16)


def _keep_threshold_and_scale(p):
    """mfl_keep_threshold and mfl_keep_scale, rounded in float32 as the header does."""
    t = (np.float32(1) - np.float32(p)) * np.float32(4294967296.0)
    threshold = 0xFFFFFFFF if t >= np.float32(4294967295.0) else int(t)
    return threshold, float(np.float32(1) / (np.float32(1) - np.float32(p)))


def _mask_rows(key, row0, rows, cols, p, dtype):
    """The multipliers of rows row0 .. row0 + rows - 1 (row0 a uint64 array) of an x
    with `cols` columns (the flat index split into 32-bit halves from a 64-bit row
    start, as lora_dropout.h takes it)."""
    start = (mx.arange(rows, dtype=mx.uint64)[:, None] + row0) * cols
    row_lo, row_hi = (start & 0xFFFFFFFF).astype(U32), (start >> 32).astype(U32)
    lo = row_lo + mx.arange(cols, dtype=U32)[None, :]
    hi = row_hi + (lo < row_lo).astype(U32)  # the carry out of the low word
    key = key.astype(U32)
    bits = _mix(_mix(lo ^ key[0]) ^ (key[1] + hi * mx.array(0x9E3779B9, dtype=U32)))
    threshold, keep = _keep_threshold_and_scale(p)
    mask = mx.where(bits < mx.array(threshold, dtype=U32), mx.array(keep, dtype=mx.float32), 0.0)
    return mask.astype(dtype)


@functools.cache
def _compiled_mask_rows(dtype):
    return mx.compile(lambda key, row0, rows, cols, p: _mask_rows(key, row0, rows, cols, p, dtype))


def mask_rows(key, row0, rows, cols, p, dtype):
    """``_mask_rows``, one fused kernel on a GPU (mx.compile; retraced per block shape),
    MLX's ops one by one on the CPU (where only the tests run it: the CPU op has its
    own kernels, and MLX's CPU compile runs a C++ compiler)."""
    row0 = mx.array(row0, dtype=mx.uint64)
    if mx.default_device() == mx.cpu:
        return _mask_rows(key, row0, rows, cols, p, dtype)
    return _compiled_mask_rows(dtype)(key, row0, rows, cols, p)


def device_dropout_mask(key, shape, p, dtype=mx.float32):
    """The dropout multipliers of an x of `shape` under `key`, computed with MLX's ops on
    the default device: bit for bit the CPU extension's ``dropout_mask``."""
    shape = tuple(int(d) for d in shape)
    cols = shape[-1] if shape else 1
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return mask_rows(key, 0, rows, cols, p, dtype).reshape(shape)


# Elements of x whose mask exists at one time (1 MiB of uint32 per intermediate: MLX
# keeps up to 10 operations in flight, each with its output allocated).
STEP_ELEMENTS = 2**18


def _starts(x):
    """Where x's blocks of rows start (after the first)."""
    m, k = x.shape
    step = max(1, STEP_ELEMENTS // max(1, k))
    return list(range(step, m, step))


def split_like(x, other):
    """`other` (rows like x's) split into x's blocks of rows."""
    starts = _starts(x)
    return mx.split(other, starts, axis=0) if starts else [other]


def row_blocks(x, key, p):
    """x split into blocks of rows (split, not sliced: the gradient of x is one
    concatenation) with each block's dropout multipliers in x's dtype."""
    return [
        (part, mask_rows(key, row0, part.shape[0], x.shape[1], p, x.dtype))
        for row0, part in zip([0, *_starts(x)], split_like(x, x), strict=True)
    ]


def down_project_in_steps(x, key, lora_a, p, adapter_ids=None):
    """h = (m * x) @ lora_a in x's dtype (each row's adapter with `adapter_ids`), the mask
    generated a block of rows at a time."""
    if p == 0:
        return reference.down_project(x, None, lora_a, x.dtype, adapter_ids)
    ids = None if adapter_ids is None else split_like(x, adapter_ids)
    blocks = [
        reference.down_project(part, mask, lora_a, x.dtype, None if ids is None else ids[i])
        for i, (part, mask) in enumerate(row_blocks(x, key, p))
    ]
    return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=0)


def _recomputing_op(base, scale, p, routed):
    """An mx.custom_function over slots (x, *base_arrays, bias, lora_a, lora_b, key), and
    when `routed` (scales, adapter_ids) after them: y in x's dtype, the mask generated
    from the key in the forward and again in the backward. Returns (op, grads) where
    grads(primals, dy, wrt) are the cotangents of the slots numbered `wrt`, by MLX's
    autodiff of the formula."""
    key_slot = -3 if routed else -1

    def formula(x, *rest):
        scales, ids = rest[-2:] if routed else (None, None)
        *base_arrays, bias, lora_a, lora_b, key = rest[:-2] if routed else rest
        h = down_project_in_steps(x, key, lora_a, p, ids)
        multiplier = scale * scales if routed else scale
        return reference.lora_terms(base(x, *base_arrays), h, layout.bias_or_none(bias), lora_b, multiplier, x.dtype, ids)  # fmt: skip

    def grads(primals, dy, wrt):
        # The key, hence the regenerated mask, waits for dY: else MLX may evaluate the
        # mask (and the dropped rows) right after the forward and hold them until the
        # backward reaches them.
        primals = list(primals)
        primals[key_slot] = mx.depends(primals[key_slot], dy)

        def along(*values):
            args = list(primals)
            for i, v in zip(wrt, values, strict=True):
                args[i] = v
            return formula(*args)

        return mx.vjp(along, [primals[i] for i in wrt], [dy])[1]

    return mx.custom_function(lambda *slots: (formula(*slots),)), grads


@functools.cache
def _dense_op(scale, p, routed):
    op, grads = _recomputing_op(lambda x, weight: x @ weight.T, scale, p, routed)

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        dy = cotangents[0].astype(primals[0].dtype)
        if not routed:
            dx, d_lora_a, d_lora_b = grads(primals, dy, wrt=(0, 3, 4))
            return layout.cotangents(layout.Inputs(*primals), dy, dx=dx, d_lora_a=d_lora_a, d_lora_b=d_lora_b)
        names = ("dx", "d_lora_a", "d_lora_b", "d_scales")  # slots 0, 3, 4, 6
        found = dict(zip(names, grads(primals, dy, wrt=(0, 3, 4, 6)), strict=True))
        return layout.mixed_cotangents(layout.MixedInputs(*primals), dy, **found)

    return op


@functools.cache
def _quantized_op(scale, p, group_size, bits, routed):
    def base(x, weight, scales, biases):
        y = reference.quantized_matmul(x, weight, scales, biases, transpose=True, group_size=group_size, bits=bits)
        return y.astype(x.dtype)

    op, grads = _recomputing_op(base, scale, p, routed)

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        dy = cotangents[0].astype(primals[0].dtype)
        names = ("dx", "d_scales", "d_biases", "d_lora_a", "d_lora_b", "d_lora_scales")  # slots 0, 2, 3, 5, 6, 8
        wrt = (0, 2, 3, 5, 6, 8) if routed else (0, 2, 3, 5, 6)
        found = dict(zip(names, grads(primals, dy, wrt=wrt), strict=False))
        slots = layout.QMixedInputs(*primals) if routed else layout.QInputs(*primals)
        return layout.q_cotangents(slots, dy, **found)

    return op


def lean_lora_linear(inputs, scale, p):
    """y (M, N) for the fixed slots `inputs` (layout.Inputs or layout.MixedInputs), lean
    plain MLX, no warning."""
    return _dense_op(scale, p, len(inputs) == len(layout.MixedInputs._fields))(*inputs)[0]


def lora_linear(inputs, scale, p, hint=""):
    """y (M, N) for the fixed slots `inputs` (layout.Inputs or layout.MixedInputs), in
    plain MLX (one warning)."""
    _warn_once(str(mx.default_device()), hint)
    return lean_lora_linear(inputs, scale, p)


def lean_qlora_linear(inputs, scale, p, *, group_size, bits):
    """y (M, N) for the quantized op's fixed slots `inputs` (layout.QInputs or
    layout.QMixedInputs), no warning."""
    routed = len(inputs) == len(layout.QMixedInputs._fields)
    return _quantized_op(scale, p, group_size, bits, routed)(*inputs)[0]


def qlora_linear(inputs, scale, p, *, group_size, bits, hint=""):
    """y (M, N) for the quantized op's fixed slots `inputs` (layout.QInputs, or
    layout.QMixedInputs), in plain MLX (one warning)."""
    _warn_once(str(mx.default_device()), hint)
    return lean_qlora_linear(inputs, scale, p, group_size=group_size, bits=bits)


def lora_onto(inputs, p, hint=""):
    """y (M, N) for the slots `inputs` (layout.OntoInputs), the oracle's per-row formula
    with the device mask (stored; one warning)."""
    _warn_once(str(mx.default_device()), hint)
    x, base, lora_a, lora_b, key, scales, ids = inputs
    mask = device_dropout_mask(key, x.shape, p, mx.float32) if p > 0 else None
    return reference.lora_onto(x, base, lora_a, lora_b, scales, mask, ids)


dropout_mask = device_dropout_mask
quantized_matmul = reference.quantized_matmul  # backends.quantized_matmul's GPU branch
