// A strict stand-in for the Metal Shading Language, for `clang -fsyntax-only` to check the
// kernel sources MLX would build on a Mac (tests/kernel_sources.py), here, without one.
//
// Strict where Metal is: `device`, `constant` and `threadgroup` are distinct clang address
// spaces, so mixing their pointers fails as it does in Metal; `atomic<T>` exists only for
// the types Metal has atomics for (int, uint, bool, float); only Metal's names are
// declared (no CUDA or OpenCL built-ins, no C library), so any other name fails. Metal's
// attributes ([[kernel]], [[buffer(n)]], ...) are left to clang (-Wno-unknown-attributes).
// Vectors are clang's ext_vector_type, as Metal's are: component access (.x ... .w),
// whole-vector loads and stores through any address space; a packed vector has its
// element's alignment. What it cannot check: Metal's own overloads and the code generation.
// Needs a clang with _Float16 on the host (clang >= 15 on x86; the test extra's ziglang).
#pragma once

#define kernel
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread
// A threadgroup array is shared by the group: static storage here, as clang has no
// automatic variables in a non-default address space (the Metal prelude's hook).
#define MFL_SHARED_STORAGE static

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef unsigned long uint64_t;
typedef long int64_t;
typedef unsigned long size_t;
struct uint3 {
  uint x, y, z;
};

// MLX's utils.h: float16_t is half, bfloat16_t is bfloat (MSL >= 3.1). Here half is
// _Float16 and bfloat clang's __fp16: 16-bit floats that convert to and from float in any
// address space, as Metal's do.
typedef _Float16 half;
typedef __fp16 bfloat;
typedef half float16_t;
typedef bfloat bfloat16_t;

typedef float float4 __attribute__((ext_vector_type(4)));
typedef ushort ushort4 __attribute__((ext_vector_type(4)));
typedef float packed_float4 __attribute__((ext_vector_type(4), aligned(4)));
typedef half packed_half4 __attribute__((ext_vector_type(4), aligned(2)));
typedef ushort packed_ushort4 __attribute__((ext_vector_type(4), aligned(2)));

// Metal's bit cast between types of one size.
template <typename T, typename U>
T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs types of one size");
  return __builtin_bit_cast(T, u);
}

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
