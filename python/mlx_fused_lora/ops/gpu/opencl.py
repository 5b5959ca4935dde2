"""Runs the GPU kernel bodies through OpenCL C on the CPU (PoCL), for the test suite.

``OpenCLLauncher`` is a launcher (see ``kernels.py``) that writes each body's OpenCL
kernel the way MLX writes its CUDA and Metal ones (inputs in order, each followed by
``name_shape`` when the body names it, then outputs; template parameters as ``#define``
lines), compiles it once with pyopencl, and runs it with the same grid and group sizes
MLX would launch: real work-groups, local memory and barriers. Arrays travel as numpy
(bfloat16 as its 16-bit words), each input at its own alignment: a row-contiguous view
that starts inside a 16-byte word (a sliced x) starts inside one in its OpenCL buffer
too, so it takes the element-wise path it takes on CUDA. Outputs start filled with NaN
bytes, so an element a kernel forgets to write shows up.

Needs ``pip install "pyopencl[pocl]"`` (the ``test`` extra).
"""

import functools

import mlx.core as mx
import numpy as np

from . import bodies, dialects, kernels

_DTYPE_NAMES = {
    mx.float32: "float32",
    mx.float16: "float16",
    mx.bfloat16: "bfloat16",
    mx.uint32: "uint32",
    mx.uint64: "uint64",
    mx.int32: "int32",
    mx.int64: "int64",
}
# numpy carrier of each MLX dtype (bfloat16 as its 16-bit words).
_NUMPY = {
    mx.float32: np.float32,
    mx.float16: np.float16,
    mx.bfloat16: np.uint16,
    mx.uint32: np.uint32,
    mx.uint64: np.uint64,
    mx.int32: np.int32,
    mx.int64: np.int64,
}


def to_numpy(array):
    """An mx.array as numpy (bfloat16 as uint16 words)."""
    if array.dtype == mx.bfloat16:
        return np.array(array.view(mx.uint16))
    return np.array(array)


def from_numpy(values, dtype):
    """The inverse of to_numpy."""
    if dtype == mx.bfloat16:
        return mx.array(values.view(np.uint16)).view(mx.bfloat16)
    return mx.array(values)


def _address(array):
    """The address of an evaluated array's first element (bfloat16 through its words)."""
    words = array.view(mx.uint16) if array.dtype == mx.bfloat16 else array
    view = np.asarray(memoryview(words))
    return view.__array_interface__["data"][0], view.flags["C_CONTIGUOUS"]


@functools.cache
def _fresh_alignment():
    """Where MLX's allocator puts a new array's data, modulo 16 bytes (8 on Linux: its
    CPU allocator keeps the buffer's size in front of the data)."""
    fresh = mx.zeros((4,))
    mx.eval(fresh)
    return _address(fresh)[0] % 16


def element_offset(array):
    """Elements between `array`'s first element and the 16-byte word it starts in, as
    MLX would hand it to a GPU kernel (a row-contiguous view keeps its offset; anything
    else is copied, aligned, first)."""
    mx.eval(array)
    if array.size == 0 or array.ndim == 0:
        return 0
    address, contiguous = _address(array)
    if not contiguous:
        return 0
    return ((address - _fresh_alignment()) % 16) // array.dtype.size % 4


def opencl_source(name, inputs, outputs, template, element_dtype, offsets=None):
    """The OpenCL program for kernel `name`: inputs and outputs are (dtype, ndim) pairs;
    input i is read `offsets[i]` elements into its buffer (0 by default)."""
    header, body = kernels.kernel_source("opencl", name)
    _, input_names, output_names = bodies.KERNELS[name]
    offsets = offsets or [0] * len(inputs)
    params, starts = [], []
    for arg, (dtype, ndim), offset in zip(input_names, inputs, offsets, strict=True):
        ctype = dialects.OPENCL_TYPES[_DTYPE_NAMES[dtype]]
        params.append(f"__global const {ctype}* mfl_buffer_{arg}")
        starts.append(f"__global const {ctype}* {arg} = mfl_buffer_{arg} + {offset};\n")
        if ndim > 0 and f"{arg}_shape" in body:
            params.append(f"__global const int* {arg}_shape")
    for arg, (dtype, _) in zip(output_names, outputs, strict=True):
        params.append(f"__global {dialects.OPENCL_TYPES[_DTYPE_NAMES[dtype]]}* {arg}")
    defines = "".join(f"#define {k} {v}\n" for k, v in template.items())
    defines += dialects.opencl_element_defines(_DTYPE_NAMES[element_dtype])
    return (
        dialects.OPENCL_HEADER
        + header
        + "\n"
        + defines
        + f"__kernel void mfl_{name}(\n  "
        + ",\n  ".join(params)
        + ") {\n"
        + "".join(starts)
        + body
        + "\n}\n"
    )


@functools.cache
def _context():
    import pyopencl as cl

    context = cl.Context([cl.get_platforms()[0].get_devices()[0]])
    return cl, context, cl.CommandQueue(context)


@functools.cache
def _compiled(name, source):
    """The cl.Kernel of `source`, built once per process (PoCL also caches on disk)."""
    cl, context, _ = _context()
    return cl.Kernel(cl.Program(context, source).build(), f"mfl_{name}")


class OpenCLLauncher:
    """A launcher running the kernels on the first OpenCL device (PoCL's CPU device)."""

    def __init__(self):
        self.cl, self.context, self.queue = _context()
        self.sources = {}  # name -> the last source launched, for inspection

    def _kernel(self, name, source):
        return _compiled(name, source)

    def launch(self, name, inputs, outputs, template, element_dtype, grid, threadgroup):
        cl = self.cl
        mf = cl.mem_flags
        offsets = [element_offset(a) for a in inputs]
        source = opencl_source(
            name,
            [(a.dtype, a.ndim) for a in inputs],
            [(d, len(s)) for s, d in outputs],
            template,
            element_dtype,
            offsets,
        )
        self.sources[name] = source
        kernel = self._kernel(name, source)
        body = kernels.kernel_source("opencl", name)[1]
        _, input_names, _ = bodies.KERNELS[name]
        args = []
        for arg, array, offset in zip(input_names, inputs, offsets, strict=True):
            values = np.ascontiguousarray(to_numpy(array)).reshape(-1)
            values = np.concatenate([np.zeros(offset, values.dtype), values, np.zeros(1, values.dtype)])
            args.append(cl.Buffer(self.context, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=values))
            if array.ndim > 0 and f"{arg}_shape" in body:
                shape = np.array(array.shape, dtype=np.int32)
                args.append(cl.Buffer(self.context, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=shape))
        results = []
        for shape, dtype in outputs:
            size = int(np.prod(shape)) or 1
            host = np.full(size * np.dtype(_NUMPY[dtype]).itemsize, 0xFF, np.uint8).view(_NUMPY[dtype])
            results.append((host, shape, dtype))
            args.append(cl.Buffer(self.context, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=results[-1][0]))
        kernel(self.queue, grid, threadgroup, *args)
        out = []
        for (host, shape, dtype), buffer in zip(results, args[-len(results) :], strict=True):
            cl.enqueue_copy(self.queue, host, buffer)
            out.append(from_numpy(host[: int(np.prod(shape))].reshape(shape), dtype))
        self.queue.finish()
        return out
