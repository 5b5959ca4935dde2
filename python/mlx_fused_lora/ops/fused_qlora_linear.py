"""The public fused LoRA linear op over a quantized base (QLoRA): validate, lay out,
dispatch. The same contract as ``fused_lora_linear``, with the frozen weight as
``nn.QuantizedLinear`` holds it."""

import math

from . import backends, layout
from .checks import check_quantized_inputs


def fused_qlora_linear(
    x, weight, scales, biases, bias, lora_a, lora_b, *, group_size, bits, scale, dropout=0.0, key=None, adapter_ids=None
):
    """``y = quantized_matmul(x, weight) + bias + scale * (dropout(x) @ lora_a) @ lora_b``.

    Args:
        x: ``(..., K)``, float32, float16 or bfloat16.
        weight, scales, biases: the frozen base as ``nn.QuantizedLinear`` holds it
            (affine mode, ``mx.quantize``'s layout): ``weight`` ``(N, K * bits / 32)``
            uint32, ``scales`` and ``biases`` ``(N, K / group_size)``.
        group_size: 32, 64 or 128; bits: 1, 2, 3, 4, 5, 6 or 8 (what MLX supports).
        bias, lora_a, lora_b, scale, dropout, key, adapter_ids: as in
            ``fused_lora_linear`` (stacked adapters and an id per row included).

    The base products ``x @ W.T`` (forward) and ``dY @ W`` (backward) are, on the CPU,
    the extension's tiled product (a tile of W's rows dequantized into a reused 1 MiB
    float32 buffer, then a BLAS GEMM; csrc/cpu/quantized_base.h), on a GPU MLX's
    ``quantized_matmul``: no dequantized copy of the whole weight is made or kept. The
    LoRA path is the dense op's: the same fused rank-r passes, onto the base
    product, with the same mask recomputed from ``key`` (never stored). The output
    has x's dtype (the base product is cast to it when the scales are wider).

    Gradients: x, bias, lora_a, lora_b as in the dense op; scales and biases as
    MLX's ``quantized_matmul`` defines them (computed only if asked for); the
    packed weight gets zeros (MLX defines no gradient for quantized weights).

    Backends: the C++ extension on the CPU. On a GPU device this op runs the
    plain-MLX reference for now (one warning; same results and mask, a mask-sized
    temporary), until the GPU kernels take a quantized base.
    """
    mixed = layout.is_mixed(lora_a, scale, adapter_ids)
    op_scale, p = check_quantized_inputs(
        x, weight, scales, biases, bias, lora_a, lora_b, 1.0 if mixed else scale, dropout, key, group_size, bits
    )
    k, n = x.shape[-1], weight.shape[0]
    x2d = x.reshape(math.prod(x.shape[:-1]), k)
    if mixed:
        lora_a, lora_b, lora_scales, ids = layout.routing(x, lora_a, lora_b, scale, adapter_ids, "fused_qlora_linear")
        inputs = layout.q_mixed_op_inputs(x2d, weight, scales, biases, bias, lora_a, lora_b, key, p, lora_scales, ids)
    else:
        inputs = layout.q_op_inputs(x2d, weight, scales, biases, bias, *layout.single(lora_a, lora_b), key, p)
    q = dict(group_size=int(group_size), bits=int(bits))
    y = backends.current_quantized().qlora_linear(inputs, op_scale, p, **q)
    return y.reshape(*x.shape[:-1], n)
