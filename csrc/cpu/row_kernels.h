// The extension's hot loops, on float32 rows. Every rank-r pass of the fused op is
// a sequence of these over one row (or a slice of one), vectorized along the row;
// dropout is applied inside them from the shared counter hash, never stored.
#pragma once

#include <cstdint>

namespace mfl::cpu {

// The dropout of one call, as every kernel needs it: inactive means p = 0.
struct Dropout {
  bool active = false;
  unsigned int key0 = 0, key1 = 0;
  unsigned int threshold = 0;
  float keep_scale = 1.0f;
};

Dropout make_dropout(float p, const unsigned int* key);

// out[k] = x[k] * dropout multiplier of element (index0 + k); out may alias x.
void dropout_row(float* out, const float* x, int64_t n, uint64_t index0, const Dropout& d);

} // namespace mfl::cpu
