// Just enough of the Metal Shading Language for `g++ -fsyntax-only` to check the
// kernels this package generates: address spaces, the scalar and vector types and
// the built-ins they use. Attributes ([[kernel]], [[buffer(n)]], ...) are left to
// the compiler, run with -Wno-attributes. An undeclared name or a typo still fails.
#pragma once

#include <cstdint>

#define kernel
#define device
#define constant
#define threadgroup
#define thread

using uint = unsigned int;
struct uint3 {
  uint x, y, z;
};

// Only declared: a syntax check never runs them.
using float16_t = _Float16;  // MLX: typedef half float16_t
struct bfloat16_t {
  bfloat16_t(float);
  operator float() const;
};
template <typename T>
struct atomic {
  T value;
};
enum memory_order { memory_order_relaxed };
template <typename T>
T atomic_fetch_add_explicit(device atomic<T>* object, T operand, memory_order order);
