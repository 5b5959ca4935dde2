"""The full sources MLX 0.32.4 builds around a kernel body, for checking them without a GPU.

Written after MLX's generators (mlx/backend/common/metal_kernel.cpp and
mlx/backend/cuda/custom_kernel.cpp): inputs in order, each followed by ``name_shape``
when the body names it, then outputs. Metal puts inputs of fewer than 8 elements in
``constant``, passes 0-d inputs by reference, takes template arguments as template
parameters (instantiated with ``host_name``) and adds each built-in attribute whose name
occurs in the body; CUDA prepends its default header, writes template arguments as
``constexpr``/``using`` lines at the top of the body and wraps the kernel in
``mlx::core::cu``. Kernel names carry the template (and, on Metal, the dtypes) as MLX's do.

``mlx_metal_source`` gets MLX's own Metal source (its generator runs without Metal under
export tracing); a test holds ``metal_source`` byte-equal to it. MLX's CPU build has no
CUDA generator, so ``cuda_source`` follows its code (mlx/backend/cuda/custom_kernel.cpp,
the same at v0.32.1 and at the newest MLX commit read; 0.32.4's own tree was not at hand).

``RecordingLauncher`` stands in for a launcher (ops/gpu/kernels.py): it records what
``Kernels`` would launch and returns lazy zeros, so real launches can be turned into
sources (and their grids checked) for any shape, however large. ``record_op_launches``
records what the whole op (forward and backward) launches, single-adapter or mixed (4
adapters, the self-check's ids); ``variant_launches`` every kernel variant the op can
build: dtype x rank class x dropout x mixed or not.
"""

import mlx.core as mx
from mlx_fused_lora.ops import layout
from mlx_fused_lora.ops.backends import gpu
from mlx_fused_lora.ops.gpu import bodies, costs, kernels, self_check

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
# One r per class of tiles: a padded rank chunk (1, 17), one chunk (8, 16), several (32),
# and each of down_grad's group sizes (16: 256 threads, 64: 128, 128: 64).
RANK_CLASSES = [1, 8, 16, 17, 32, 64, 128]

METAL_TYPES = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.int32: "int32_t",
}
CUDA_TYPES = {
    mx.float32: "float",
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.int32: "int32_t",
}

# MLX 0.32's list, in its order: each is added to the signature when the body names it.
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

CUDA_DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'


class Launch:
    """One recorded launch: what MLX's kernel object would be called with."""

    def __init__(self, name, inputs, outputs, template, element_dtype, grid, threadgroup):
        self.name, self.grid, self.threadgroup = name, grid, threadgroup
        self.inputs = [(a.dtype, tuple(a.shape)) for a in inputs]
        self.outputs = outputs
        self.template = [("T", element_dtype)] + list(template.items())


class RecordingLauncher:
    def __init__(self):
        self.launches = []

    def launch(self, name, inputs, outputs, template, element_dtype, grid, threadgroup):
        self.launches.append(Launch(name, inputs, outputs, template, element_dtype, grid, threadgroup))
        return [mx.zeros(shape, dtype=dtype) for shape, dtype in outputs]


def _size(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def metal_source(launch, body=None):
    """The Metal source MLX 0.32.4 compiles for `launch` (before its utils.h prelude)."""
    header, default_body = kernels.kernel_source("metal", launch.name)
    body = default_body if body is None else body
    _, input_names, output_names = bodies.KERNELS[launch.name]
    name = "custom_kernel_mfl_" + launch.name
    template_def = "<" + ", ".join(METAL_TYPES[v] if isinstance(v, mx.Dtype) else str(v) for _, v in launch.template)
    template_def += ">"
    name += "_" + template_def.replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]
    for dtype, shape in launch.inputs:
        name += "_" + METAL_TYPES[dtype] + ("s" if not shape else "c" if _size(shape) < 8 else "")
    for _, dtype in launch.outputs:
        name += "_" + METAL_TYPES[dtype]
    params, index = [], 0
    for arg, (dtype, shape) in zip(input_names, launch.inputs, strict=True):
        space = "constant" if _size(shape) < 8 else "device"
        params.append(f"  const {space} {METAL_TYPES[dtype]}{'&' if not shape else '*'} {arg} [[buffer({index})]]")
        index += 1
        if shape and f"{arg}_shape" in body:
            params.append(f"  const constant int* {arg}_shape [[buffer({index})]]")
            index += 1
    for arg, (_, dtype) in zip(output_names, launch.outputs, strict=True):
        params.append(f"  device {METAL_TYPES[dtype]}* {arg} [[buffer({index})]]")
        index += 1
    params += [f"  {t} {a} [[{a}]]" for a, t in METAL_ATTRIBUTES if a in body]
    kinds = ", ".join(f"{'typename' if isinstance(v, mx.Dtype) else 'int'} {n}" for n, v in launch.template)
    source = header + f"template <{kinds}>\n[[kernel]] void {name}(\n" + ",\n".join(params) + ") {\n" + body + "\n}\n"
    source += f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({name}{template_def}) {name}{template_def};\n'
    return source


def cuda_source(launch):
    """The CUDA source MLX 0.32.4 hands NVRTC for `launch`."""
    header, body = kernels.kernel_source("cuda", launch.name)
    _, input_names, output_names = bodies.KERNELS[launch.name]
    name = "custom_kernel_mfl_" + launch.name
    name += "".join("_" + (METAL_TYPES[v] if isinstance(v, mx.Dtype) else str(v)) for _, v in launch.template)
    params = []
    for arg, (dtype, shape) in zip(input_names, launch.inputs, strict=True):
        params.append(f"    const {CUDA_TYPES[dtype]}* {arg},\n")
        if shape and f"{arg}_shape" in body:
            params.append(f"    const __grid_constant__ Shape {arg}_shape,\n")
    outputs = [f"    {CUDA_TYPES[d]}* {arg}" for arg, (_, d) in zip(output_names, launch.outputs, strict=True)]
    constants = "".join(
        f"  using {n} = {CUDA_TYPES[v]};\n" if isinstance(v, mx.Dtype) else f"  constexpr int {n} = {v};\n"
        for n, v in launch.template
    )
    return (
        CUDA_DEFAULT_HEADER
        + header
        + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        + f"__global__ void {name}(\n"
        + "".join(params)
        + ",\n".join(outputs)
        + ") {\n"
        + constants
        + "\n"
        + body
        + "\n}\n\n} // namespace mlx::core::cu\n"
    )


def record_op_launches(dtype, m=37, k=150, n=70, r=16, p=0.1, plan=None, caps=None, mixed=False):
    """The launches of the op's forward and backward for one small problem, with the
    kernels wherever the op may take them (`plan`: the self-check's first plan); `mixed`:
    the mixed op over the self-check's adapters and ids."""
    recorder = RecordingLauncher()
    ks = kernels.Kernels(recorder) if caps is None else kernels.Kernels(recorder, *caps)
    plan = plan or self_check.plans(r, p > 0, mixed)[0]
    op = gpu.gpu_op(ks, 2.0, p, costs.H100, plan)
    x, w, b = mx.zeros((m, k), dtype=dtype), mx.zeros((n, k), dtype=dtype), mx.zeros((n,), dtype=dtype)
    key = mx.random.key(0)
    ks.dropout_mask(key, (m, k), p) if p > 0 else None
    if mixed:
        count = self_check.ADAPTERS
        ids = mx.array(self_check.mixed_ids(m))
        slots = layout.mixed_op_inputs(x, w, b, mx.zeros((count, k, r)), mx.zeros((count, r, n)), key, p, mx.ones((count,)), ids)  # fmt: skip
    else:
        slots = layout.op_inputs(x, w, b, mx.zeros((k, r)), mx.zeros((r, n)), key, p)
    mx.vjp(lambda *a: op(*a)[0], list(slots), [mx.zeros((m, n), dtype=dtype)])
    return recorder.launches


def variant_launches():
    """One launch of every kernel variant the op builds, by its CUDA source."""
    launches = {}
    for dtype in DTYPES:
        for r in RANK_CLASSES:
            for p in (0.0, 0.1):
                for mixed in (False, True):
                    for launch in record_op_launches(dtype, r=r, p=p, mixed=mixed):
                        launches.setdefault(cuda_source(launch), launch)
    return list(launches.values())


def mlx_metal_source(launch, tmp_dir):
    """The Metal source MLX 0.32.4 itself generates for `launch`, here without Metal: the
    kernel is recorded inside mx.export_function's tracing (which MLX allows without a
    Metal back-end) with verbose=True, and MLX's printout is read back from stdout."""
    import os
    import sys
    import tempfile

    header, body = kernels.kernel_source("metal", launch.name)
    _, input_names, output_names = bodies.KERNELS[launch.name]
    kernel = mx.fast.metal_kernel(
        name=f"mfl_{launch.name}", input_names=input_names, output_names=output_names, source=body, header=header
    )

    def run(*inputs):
        return kernel(
            inputs=list(inputs),
            template=launch.template,
            output_shapes=[tuple(s) for s, _ in launch.outputs],
            output_dtypes=[d for _, d in launch.outputs],
            grid=launch.grid,
            threadgroup=launch.threadgroup,
            verbose=True,
        )

    arrays = [mx.zeros(shape, dtype=dtype) for dtype, shape in launch.inputs]
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as out:
        os.dup2(out.fileno(), 1)
        try:
            mx.export_function(os.path.join(tmp_dir, f"{launch.name}.mlxfn"), run, *arrays)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        out.seek(0)
        printed = out.read().decode()
    return printed.split("```\n", 1)[1].rsplit("\n```", 1)[0]
