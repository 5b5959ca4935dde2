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
