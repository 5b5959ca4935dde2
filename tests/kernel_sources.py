"""The full sources MLX builds around a kernel body, for checking them without a GPU.

The signatures follow MLX 0.32.4's generators (mlx/backend/common/metal_kernel.cpp,
mlx/backend/cuda/custom_kernel.cpp): inputs in order, each followed by its `_shape`
when the body names it, then outputs. Metal puts arrays of fewer than 8 elements in
`constant`, passes 0-d inputs by reference, makes outputs `atomic<T>` on request,
takes template arguments as template parameters (instantiated here, as MLX does) and
adds the built-in attributes the body names; CUDA writes template arguments as
`constexpr` / `using` lines at the top of the body.
"""

METAL_TYPES = {
    "float": "float",
    "uint32_t": "uint32_t",
    "uint64_t": "uint64_t",
    "bfloat16": "bfloat16_t",
    "float16": "float16_t",
}
CUDA_TYPES = {
    "float": "float",
    "uint32_t": "uint32_t",
    "uint64_t": "uint64_t",
    "bfloat16": "__nv_bfloat16",
    "float16": "__half",
}

METAL_ATTRIBUTES = {
    "thread_position_in_grid": "uint3",
    "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3",
    "threads_per_threadgroup": "uint3",
    "thread_index_in_simdgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint",
}


def _template_value(value, types):
    return types[value] if isinstance(value, str) else str(value)


def metal_source(name, inputs, outputs, header, body, template=(), atomic=False):
    """inputs: [(name, type, size, ndim)]; outputs: [(name, type)]; template: [(name, int | type)]."""
    params, index = [], 0
    for arg, type_, size, ndim in inputs:
        space = "constant" if size < 8 else "device"
        params.append(f"  const {space} {METAL_TYPES[type_]}{'&' if ndim == 0 else '*'} {arg} [[buffer({index})]]")
        index += 1
        if ndim > 0 and f"{arg}_shape" in body:
            params.append(f"  const constant int* {arg}_shape [[buffer({index})]]")
            index += 1
    for arg, type_ in outputs:
        type_ = METAL_TYPES[type_]
        params.append(f"  device {'atomic<' + type_ + '>' if atomic else type_}* {arg} [[buffer({index})]]")
        index += 1
    params += [f"  {t} {a} [[{a}]]" for a, t in METAL_ATTRIBUTES.items() if a in body]
    source = header + "\n"
    if template:
        source += (
            "template <" + ", ".join(f"{'typename' if isinstance(v, str) else 'int'} {n}" for n, v in template) + ">\n"
        )
    source += f"[[kernel]] void {name}(\n" + ",\n".join(params) + ") {\n" + body + "\n}\n"
    if template:
        args = ", ".join(_template_value(v, METAL_TYPES) for _, v in template)
        source += f"template [[kernel]] decltype({name}<{args}>) {name}<{args}>;\n"
    return source


def cuda_constants(template):
    return "".join(
        f"  using {n} = {CUDA_TYPES[v]};\n" if isinstance(v, str) else f"  constexpr int {n} = {v};\n"
        for n, v in template
    )


def cuda_source(name, inputs, outputs, header, body, template=()):
    """As NVRTC sees it, with MLX's Shape type declared."""
    params = []
    for arg, type_, _, ndim in inputs:
        params.append(f"    const {CUDA_TYPES[type_]}* {arg}")
        if ndim > 0 and f"{arg}_shape" in body:
            params.append(f"    const __grid_constant__ Shape {arg}_shape")
    params += [f"    {CUDA_TYPES[type_]}* {arg}" for arg, type_ in outputs]
    return (
        "#include <cstdint>\n#include <cooperative_groups.h>\n#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n"
        "#include <cuda/std/array>\nusing Shape = cuda::std::array<int32_t, 10>;\n"
        + header
        + "\nnamespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
        + f"__global__ void {name}(\n"
        + ",\n".join(params)
        + ") {\n"
        + cuda_constants(template)
        + body
        + "\n}\n}\n"
    )
