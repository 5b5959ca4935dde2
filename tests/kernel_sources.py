"""The full sources MLX builds around a kernel body, for checking them without a GPU.

The signatures follow MLX 0.32.4's generators (mlx/backend/common/metal_kernel.cpp,
mlx/backend/cuda/custom_kernel.cpp): inputs in order, then outputs; Metal puts arrays
of fewer than 8 elements in `constant`, passes 0-d inputs by reference and adds the
built-in attributes the body names.
"""

METAL_ATTRIBUTES = {
    "thread_position_in_grid": "uint3",
    "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3",
    "threads_per_threadgroup": "uint3",
    "thread_index_in_simdgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint",
}


def metal_source(name, inputs, outputs, header, body):
    """inputs: [(name, type, size, ndim)], outputs: [(name, type)]."""
    params = []
    for i, (arg, type_, size, ndim) in enumerate(inputs):
        space = "constant" if size < 8 else "device"
        params.append(f"  const {space} {type_}{'&' if ndim == 0 else '*'} {arg} [[buffer({i})]]")
    for j, (arg, type_) in enumerate(outputs):
        params.append(f"  device {type_}* {arg} [[buffer({len(inputs) + j})]]")
    params += [f"  {t} {a} [[{a}]]" for a, t in METAL_ATTRIBUTES.items() if a in body]
    return f"{header}\n[[kernel]] void {name}(\n" + ",\n".join(params) + ") {\n" + body + "\n}\n"


def cuda_source(name, inputs, outputs, header, body):
    """inputs: [(name, type, size, ndim)], outputs: [(name, type)]; as NVRTC sees it."""
    params = [f"    const {type_}* {arg}" for arg, type_, _, _ in inputs]
    params += [f"    {type_}* {arg}" for arg, type_ in outputs]
    return (
        "#include <cstdint>\n#include <cooperative_groups.h>\n"
        + header
        + "\nnamespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
        + f"__global__ void {name}(\n" + ",\n".join(params) + ") {\n" + body + "\n}\n}\n"
    )
