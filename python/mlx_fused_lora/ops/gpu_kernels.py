"""GPU kernels for MLX's CUDA and Metal backends, each written once.

A kernel is one template body; a small per-backend prelude gives it what differs
between the two (the thread's index, how a 0-d input is read: ``name[0]`` in CUDA,
``name`` in Metal). The per-element math is ``csrc/kernels/lora_dropout.h``,
shipped as package data and passed as every kernel's ``header``: the very code the
CPU extension compiles, so the same key gives the same mask on every backend.

Kernels: ``dropout_mask``; the fused op's memory-bound parts, each with the mask
recomputed in place of a stored one, ``dropout_down_proj`` (h = (m*x) @ A, one read
of x), ``dropout_down_grad`` (dA = (m*x)^T @ dS, one read of x) and
``masked_input_grad`` (the rank-r term m * (dS @ A^T) of dX, written once, onto
which the dY @ W GEMM accumulates). The GEMMs stay MLX's. Reductions go through
float32 atomics into outputs MLX zero-fills, so no kernel needs a barrier, which
is also what lets the test suite run each template thread by thread on the CPU.
Not yet measured on a GPU: see the GPU issue.
"""

import functools
import os
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
        "#define MFL_ATOMIC_ADD(out, i, v) atomicAdd(&out[i], v)\n"
    ),
    "metal": (
        "const uint64_t mfl_thread = uint64_t(thread_position_in_grid.x);\n"
        "#define MFL_SCALAR(name) name\n"
        "#define MFL_ATOMIC_ADD(out, i, v) atomic_fetch_add_explicit(&out[i], v, memory_order_relaxed)\n"
    ),
}

# The dropout multiplier of flat element `index` (1 when p = 0), for the bodies below.
MULTIPLIER = """
const float p = MFL_SCALAR(dropout);
const unsigned int threshold = mfl_keep_threshold(p);
const float keep_scale = mfl_keep_scale(p);
#define MFL_MULTIPLIER(index) (p > 0.0f ? mfl_dropout_multiplier(mfl_dropout_bits(key[0], key[1], \\
    (unsigned int)(index), (unsigned int)((index) >> 32)), threshold, keep_scale) : 1.0f)
"""

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

# h[i, :] += sum over one chunk of x's row i of (m * x)[i, k] * A[k, :]; a thread per
# (row, chunk of CHUNK columns), R partial sums in registers, one atomic add each.
DROPOUT_DOWN_PROJ_BODY = (
    MULTIPLIER
    + """
const int64_t rows = x_shape[0];
const int64_t cols = x_shape[1];
const int64_t chunks = (cols + CHUNK - 1) / CHUNK;
if (mfl_thread >= uint64_t(rows * chunks)) {
  return;
}
const int64_t i = int64_t(mfl_thread) / chunks;
const int64_t k0 = (int64_t(mfl_thread) % chunks) * CHUNK;
const int64_t k1 = k0 + CHUNK < cols ? k0 + CHUNK : cols;
float acc[R];
for (int j = 0; j < R; ++j) {
  acc[j] = 0.0f;
}
for (int64_t k = k0; k < k1; ++k) {
  const uint64_t index = uint64_t(i * cols + k);
  const float v = float(x[index]) * MFL_MULTIPLIER(index);
  for (int j = 0; j < R; ++j) {
    acc[j] += v * a[k * R + j];
  }
}
for (int j = 0; j < R; ++j) {
  MFL_ATOMIC_ADD(h, i * R + j, acc[j]);
}
"""
)

# dA[k, :] += sum over one chunk of rows of (m * x)[i, k] * dS[i, :]; a thread per
# (column, chunk of CHUNK rows): neighbouring threads read neighbouring x.
DROPOUT_DOWN_GRAD_BODY = (
    MULTIPLIER
    + """
const int64_t rows = x_shape[0];
const int64_t cols = x_shape[1];
const int64_t chunks = (rows + CHUNK - 1) / CHUNK;
if (mfl_thread >= uint64_t(cols * chunks)) {
  return;
}
const int64_t k = int64_t(mfl_thread) % cols;
const int64_t i0 = (int64_t(mfl_thread) / cols) * CHUNK;
const int64_t i1 = i0 + CHUNK < rows ? i0 + CHUNK : rows;
float acc[R];
for (int j = 0; j < R; ++j) {
  acc[j] = 0.0f;
}
for (int64_t i = i0; i < i1; ++i) {
  const uint64_t index = uint64_t(i * cols + k);
  const float v = float(x[index]) * MFL_MULTIPLIER(index);
  for (int j = 0; j < R; ++j) {
    acc[j] += v * ds[i * R + j];
  }
}
for (int j = 0; j < R; ++j) {
  MFL_ATOMIC_ADD(da, k * R + j, acc[j]);
}
"""
)

# e[i, k] = m[i, k] * (dS[i, :] . A[k, :]), a thread per element.
MASKED_INPUT_GRAD_BODY = (
    MULTIPLIER
    + """
const int64_t rows = ds_shape[0];
const int64_t cols = a_shape[0];
if (mfl_thread >= uint64_t(rows * cols)) {
  return;
}
const int64_t i = int64_t(mfl_thread) / cols;
const int64_t k = int64_t(mfl_thread) % cols;
float v = 0.0f;
for (int j = 0; j < R; ++j) {
  v += ds[i * R + j] * a[k * R + j];
}
e[mfl_thread] = OutT(v * MFL_MULTIPLIER(mfl_thread));
"""
)

KERNELS = {
    # name: (input names, output names, body, atomic outputs)
    "dropout_mask": (["key", "dropout", "size"], ["mask"], DROPOUT_MASK_BODY, False),
    "dropout_down_proj": (["x", "a", "key", "dropout"], ["h"], DROPOUT_DOWN_PROJ_BODY, True),
    "dropout_down_grad": (["x", "ds", "key", "dropout"], ["da"], DROPOUT_DOWN_GRAD_BODY, True),
    "masked_input_grad": (["ds", "a", "key", "dropout"], ["e"], MASKED_INPUT_GRAD_BODY, False),
}

# Columns (down projection) or rows (down gradient) one thread reduces over.
REDUCTION_CHUNK = 64


@functools.cache
def kernel_header():
    """The shared per-element math, as the CPU extension compiles it."""
    return (resources.files("mlx_fused_lora") / "kernels" / "lora_dropout.h").read_text()


def kernel_parts(backend, name):
    """(input names, output names, header, body) of kernel `name` for `backend`."""
    inputs, outputs, body, _ = KERNELS[name]
    return inputs, outputs, HEADER_DEFINES[backend] + kernel_header(), BODY_PRELUDE[backend] + body


# Opt-in until the kernels have been run and measured on GPU hardware (the GPU issue):
# without it, GPU devices get the plain-MLX reference and the CPU extension's masks.
ENABLE_VARIABLE = "MLX_FUSED_LORA_GPU_KERNELS"


def gpu_backend():
    """'cuda' or 'metal' when MLX's default device is a GPU and the kernels are enabled
    (MLX_FUSED_LORA_GPU_KERNELS=1), else None."""
    if mx.default_device() != mx.gpu or os.environ.get(ENABLE_VARIABLE) != "1":
        return None
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


@functools.cache
def build_kernel(backend, name):
    """The MLX kernel object, built once per backend and kernel."""
    inputs, outputs, header, body = kernel_parts(backend, name)
    kwargs = dict(name=f"mfl_{name}", input_names=inputs, output_names=outputs, source=body, header=header)
    if backend == "cuda":
        return mx.fast.cuda_kernel(**kwargs)
    return mx.fast.metal_kernel(**kwargs, atomic_outputs=KERNELS[name][3])


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


def _key_or_zeros(key):
    # The kernels always take a key; with p = 0 they never read it.
    return key if key is not None else mx.zeros((2,), dtype=mx.uint32)


def _grid(threads):
    return (max(threads, 1), 1, 1), (ELEMENTWISE_GROUP, 1, 1)


class Kernels:
    """The fused op's GPU kernels for one backend, as the op's glue calls them.

    Shapes: x (M, K) in its dtype; a (K, r) and ds (M, r) float32; outputs float32
    except masked_input_grad's, which has `dtype`.
    """

    def __init__(self, backend):
        self.backend = backend

    def dropout_down_proj(self, x, a, key, p):
        m, k = x.shape
        r = a.shape[1]
        threads = m * -(-k // REDUCTION_CHUNK)
        grid, group = _grid(threads)
        (h,) = build_kernel(self.backend, "dropout_down_proj")(
            inputs=[x, a, _key_or_zeros(key), mx.array(p, dtype=mx.float32)],
            template=[("R", r), ("CHUNK", REDUCTION_CHUNK)],
            output_shapes=[(m, r)],
            output_dtypes=[mx.float32],
            grid=grid,
            threadgroup=group,
            init_value=0.0,
        )
        return h

    def dropout_down_grad(self, x, ds, key, p):
        m, k = x.shape
        r = ds.shape[1]
        threads = k * -(-m // REDUCTION_CHUNK)
        grid, group = _grid(threads)
        (da,) = build_kernel(self.backend, "dropout_down_grad")(
            inputs=[x, ds, _key_or_zeros(key), mx.array(p, dtype=mx.float32)],
            template=[("R", r), ("CHUNK", REDUCTION_CHUNK)],
            output_shapes=[(k, r)],
            output_dtypes=[mx.float32],
            grid=grid,
            threadgroup=group,
            init_value=0.0,
        )
        return da

    def masked_input_grad(self, ds, a, key, p, dtype):
        m, r = ds.shape
        k = a.shape[0]
        grid, group = _grid(m * k)
        (e,) = build_kernel(self.backend, "masked_input_grad")(
            inputs=[ds, a, _key_or_zeros(key), mx.array(p, dtype=mx.float32)],
            template=[("R", r), ("OutT", dtype)],
            output_shapes=[(m, k)],
            output_dtypes=[dtype],
            grid=grid,
            threadgroup=group,
        )
        return e
