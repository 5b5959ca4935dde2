"""GPU kernels for MLX's CUDA and Metal backends, each written once.

A kernel is one template body; a small per-backend prelude gives it what differs
between the two (the thread's index, how a 0-d input is read: ``name[0]`` in CUDA,
``name`` in Metal). The per-element math is ``csrc/kernels/lora_dropout.h``,
shipped as package data and passed as every kernel's ``header``: the very code the
CPU extension compiles, so the same key gives the same mask on every backend.

Kernels so far: ``dropout_mask``. The fused op's own GPU kernels (the dropout-fused
down projection, the one-pass dS/dB, dA and the masked dX epilogue) come next; until
then ``fused_lora_linear`` runs the plain-MLX reference on GPU devices, with masks
from here.
"""

import functools
from importlib import resources

import mlx.core as mx

# Threads per block (CUDA) / threadgroup (Metal) for elementwise kernels.
ELEMENTWISE_GROUP = 256

HEADER_DEFINES = {
    "cuda": "#define MFL_FN __device__ inline\n",
    "metal": "#define MFL_FN inline\n",
}

BODY_PRELUDE = {
    "cuda": (
        "const uint64_t mfl_thread = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x;\n"
        "#define MFL_SCALAR(name) name[0]\n"
    ),
    "metal": (
        "const uint64_t mfl_thread = uint64_t(thread_position_in_grid.x);\n"
        "#define MFL_SCALAR(name) name\n"
    ),
}

# mask[i] = the multiplier dropout applies to flat element i: 1/(1-p) or 0.
DROPOUT_MASK_BODY = """
const uint64_t index = mfl_thread;
if (index >= MFL_SCALAR(size)) {
  return;
}
const float p = MFL_SCALAR(dropout);
const unsigned int bits = mfl_dropout_bits(
    key[0], key[1], (unsigned int)(index), (unsigned int)(index >> 32));
mask[index] = mfl_dropout_multiplier(bits, mfl_keep_threshold(p), mfl_keep_scale(p));
"""

KERNELS = {
    # name: (input names, output names, body)
    "dropout_mask": (["key", "dropout", "size"], ["mask"], DROPOUT_MASK_BODY),
}


@functools.lru_cache(maxsize=None)
def kernel_header():
    """The shared per-element math, as the CPU extension compiles it."""
    return (resources.files("mlx_fused_lora") / "kernels" / "lora_dropout.h").read_text()


def kernel_parts(backend, name):
    """(input names, output names, header, body) of kernel `name` for `backend`."""
    inputs, outputs, body = KERNELS[name]
    return inputs, outputs, HEADER_DEFINES[backend] + kernel_header(), BODY_PRELUDE[backend] + body


def gpu_backend():
    """'cuda' or 'metal' for MLX's default device, or None if it is not a GPU."""
    if mx.default_device() != mx.gpu:
        return None
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


@functools.lru_cache(maxsize=None)
def build_kernel(backend, name):
    """The MLX kernel object, built once per backend and kernel."""
    inputs, outputs, header, body = kernel_parts(backend, name)
    make = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    return make(name=f"mfl_{name}", input_names=inputs, output_names=outputs, source=body, header=header)


def dropout_mask_gpu(backend, key, shape, p):
    """float32 dropout multipliers for an x of `shape`, computed on the GPU."""
    size = 1
    for d in shape:
        size *= d
    (mask,) = build_kernel(backend, "dropout_mask")(
        inputs=[key, mx.array(p, dtype=mx.float32), mx.array(size, dtype=mx.uint64)],
        output_shapes=[tuple(shape)],
        output_dtypes=[mx.float32],
        grid=(max(size, 1), 1, 1),
        threadgroup=(ELEMENTWISE_GROUP, 1, 1),
    )
    return mask
