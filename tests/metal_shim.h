// A strict stand-in for the Metal Shading Language, for `clang++ -fsyntax-only` to check
// the kernel sources MLX would build on a Mac (tests/kernel_sources.py), here, without one.
//
// Strict where Metal is: `device`, `constant` and `threadgroup` are distinct clang address
// spaces, so mixing their pointers fails as it does in Metal; `atomic<T>` exists only for
// the types Metal has atomics for (int, uint, bool, float); only Metal's names are
// declared (no CUDA or OpenCL built-ins, no C library), so any other name fails. Metal's
// attributes ([[kernel]], [[buffer(n)]], ...) are left to clang (-Wno-unknown-attributes).
// What it cannot check: Metal's own overloads and the code generation.
#pragma once

#define kernel
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
// A threadgroup array is shared by the group: static storage here, as clang has no
// automatic variables in a non-default address space.
#define threadgroup static __attribute__((address_space(3)))
#define thread

typedef unsigned int uint;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef unsigned long uint64_t;
typedef long int64_t;
typedef unsigned long size_t;
struct uint3 {
  uint x, y, z;
};

// MLX's utils.h: float16_t is half, bfloat16_t is bfloat (MSL >= 3.1). Both are clang's
// __fp16 here: a 16-bit float that converts to and from float in any address space, as
// Metal's do (clang 14 on x86 has no _Float16 or __bf16 arithmetic).
typedef __fp16 half;
typedef __fp16 bfloat;
typedef half float16_t;
typedef bfloat bfloat16_t;

namespace mem_flags {
enum flags { mem_none, mem_device, mem_threadgroup, mem_texture };
}
void threadgroup_barrier(mem_flags::flags);

template <typename T>
struct mfl_metal_has_atomic {
  static constexpr bool value = false;
};
template <>
struct mfl_metal_has_atomic<int> {
  static constexpr bool value = true;
};
template <>
struct mfl_metal_has_atomic<uint> {
  static constexpr bool value = true;
};
template <>
struct mfl_metal_has_atomic<bool> {
  static constexpr bool value = true;
};
template <>
struct mfl_metal_has_atomic<float> {
  static constexpr bool value = true;
};
template <typename T>
struct atomic {
  static_assert(mfl_metal_has_atomic<T>::value, "Metal has no atomic<T> for this T");
  T value;
};
enum memory_order { memory_order_relaxed };
template <typename T>
T atomic_fetch_add_explicit(device atomic<T>* object, T operand, memory_order order);
