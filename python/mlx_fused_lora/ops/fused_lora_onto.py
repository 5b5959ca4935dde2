"""The LoRA term onto a base product the caller made: the fused op's rank-r half, for bases it cannot take.

    y = base + scale_id * (dropout(x) @ lora_a[id]) @ lora_b[id]

A mixture-of-experts layer's base is one matrix per expert (``mx.gather_mm`` over
``(E, N, K)``), which the fused op's one base GEMM cannot be; its LoRA part (an adapter
per expert, chosen by the same indices) is exactly the mixed op's rank-r part. So the
caller computes the base product, and this op adds the LoRA term onto it through the same
C++ passes as the fused op (the ``*_onto`` primitives the quantized-base op uses), the same
recomputed mask, the same routing slots: one adapter (2-D, or a stack of one without ids)
is the case n = 1 of stacked adapters with ``adapter_ids``.

Gradients: ``base`` gets the output's cotangent unchanged (the base's own backward, e.g.
``gather_mm``'s, is MLX's); x gets the LoRA term's part only (``mask * (dS @ A_id^T)``),
which MLX adds to what the base's backward gives x; the adapters and the scales as in the
mixed op. Nothing is stored but h (M x r) and the inputs.
"""

import math

from . import backends, layout
from .checks import check_adapter_shapes, check_array, check_dropout, check_x, fail

WHO = "fused_lora_onto"


def fused_lora_onto(x, base, lora_a, lora_b, *, scale, dropout=0.0, key=None, adapter_ids=None):
    """``base + scale * (dropout(x) @ lora_a) @ lora_b``, each row on its adapter when they are stacked.

    Args:
        x: ``(..., K)``, float32, float16 or bfloat16.
        base: ``(..., N)`` with x's leading shape and dtype: the base product of x (with
            its bias, if any), made by the caller.
        lora_a, lora_b, scale, dropout, key, adapter_ids: as in `fused_lora_linear`
            (``(K, r)``/``(r, N)`` or n stacked, ``(n, K, r)``/``(n, r, N)``; a float or one
            per adapter; ids per row ``x.shape[:-1]`` or per sequence ``x.shape[:-2]``, -1:
            the base alone; out-of-range ids an error at evaluation).

    Returns ``(..., N)`` in x's dtype.
    """
    check_x(x, WHO)
    check_array("base", base, who=WHO)
    n = base.shape[-1] if base.ndim else 0
    if base.ndim != x.ndim or tuple(base.shape[:-1]) != tuple(x.shape[:-1]):
        fail("base", f"of shape x.shape[:-1] + (N,) = {(*x.shape[:-1], 'N')}", f"shape {tuple(base.shape)}", WHO)
    if base.dtype != x.dtype:
        fail("base", f"x's dtype {x.dtype}", base.dtype, WHO)
    check_adapter_shapes(x.shape[-1], n, lora_a, lora_b, WHO)
    p = check_dropout(dropout, key, WHO)
    lora_a, lora_b, scales, ids = layout.routing(x, lora_a, lora_b, scale, adapter_ids, WHO)
    k, m = x.shape[-1], math.prod(x.shape[:-1])
    inputs = layout.OntoInputs(
        x.reshape(m, k), base.reshape(m, n), lora_a, lora_b, layout.key_slot(key, p), scales, ids
    )
    y = backends.current_onto().lora_onto(inputs, p)
    return y.reshape(*x.shape[:-1], n)
