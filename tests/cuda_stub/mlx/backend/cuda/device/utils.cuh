// Stand-in for MLX's JIT device header, which libmlx embeds for NVRTC and does not ship
// as a file: it declares what the custom-kernel source MLX generates relies on (fixed-
// width integers, CUDA's half and bfloat16 types, Shape and Strides), so that nvcc can
// compile that source as NVRTC would.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cuda/std/array>

#define MAX_NDIM 10

namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, MAX_NDIM>;
using Strides = cuda::std::array<int64_t, MAX_NDIM>;
}  // namespace mlx::core::cu
