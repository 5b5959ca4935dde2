"""Chooses the op's backend from the default device, in this one place.

A backend offers ``lora_linear(inputs, scale, p)`` over the fixed slots of
``layout.Inputs`` or ``layout.MixedInputs`` (returning y of shape (M, N)) and
``dropout_mask(key, shape, p, dtype)``; ``current_quantized()`` chooses for the
quantized-base op, ``current_mixed()`` for the mixed-adapter op, ``current_onto()`` for
the LoRA term onto a given base product (``layout.OntoInputs``). The CPU runs the C++ extension
(``cpu``); a Metal or CUDA device runs the GPU kernels (``gpu``, self-checked at first
use) unless MLX_FUSED_LORA_GPU_KERNELS=0, else the plain-MLX reference with the same
mask (``reference``, one warning).
"""

import functools
from types import SimpleNamespace

import mlx.core as mx

from . import cpu, gpu, reference


@functools.cache
def _for_gpu(kernels):
    if kernels is not None:
        return gpu.backend(kernels)
    hint = f" ({gpu.ENABLE_VARIABLE}=0 or no Metal/CUDA device)"
    return SimpleNamespace(
        lora_linear=functools.partial(reference.lora_linear, hint=hint),
        dropout_mask=reference.dropout_mask,
    )


def current():
    """The backend for MLX's default device (and, on a GPU, the kernels setting)."""
    if mx.default_device() == mx.cpu:
        return cpu
    return _for_gpu(gpu.available_backend())


def current_quantized():
    """The quantized-base op's backend (``qlora_linear(inputs, scale, p, *,
    group_size, bits)`` over ``layout.QInputs``): the C++ extension on the CPU; on
    a GPU the plain-MLX reference for now (the GPU kernels take a dense base only)."""
    if mx.default_device() == mx.cpu:
        return cpu
    hint = " for a quantized base (the GPU kernels take a dense base only, for now)"
    return SimpleNamespace(qlora_linear=functools.partial(reference.qlora_linear, hint=hint))


def current_mixed():
    """The mixed-adapter op's backend (``lora_linear(inputs, scale, p)`` over
    ``layout.MixedInputs``): the C++ extension on the CPU; on a GPU the same backend as
    the single-adapter op (the GPU kernels, self-checked for mixed batches at first use,
    or the lean fallback with one warning)."""
    return current()


def current_onto():
    """The backend of the LoRA term onto a given base product (``lora_onto(inputs, p)``
    over ``layout.OntoInputs``): the C++ extension on the CPU; on a GPU the plain-MLX
    reference for now."""
    if mx.default_device() == mx.cpu:
        return cpu
    hint = " for the LoRA term onto a given base product (mixture-of-experts layers), for now"
    return SimpleNamespace(lora_onto=functools.partial(reference.lora_onto, hint=hint))


def quantized_matmul(x, weight, scales, biases, *, transpose, group_size, bits):
    """An affine-quantized W's product ``x @ W.T`` (transpose) or ``x @ W``, 2-D x, in x's
    dtype: the extension's tiled dequantize + BLAS on the CPU (MLX's CPU quantized_matmul
    runs no BLAS), MLX's quantized_matmul on a GPU."""
    if mx.default_device() == mx.cpu:
        return cpu.quantized_base(x, weight, scales, biases, transpose=transpose, group_size=group_size, bits=bits)
    y = reference.quantized_matmul(x, weight, scales, biases, transpose=transpose, group_size=group_size, bits=bits)
    return y.astype(x.dtype)
