#include "cpu/row_kernels.h"

#include "kernels/lora_dropout.h"

// Built for the baseline ISA and again for AVX2+FMA; the loader picks per machine,
// so the wheel runs everywhere and is fast where it can be.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MFL_HOT __attribute__((target_clones("avx2,fma", "default")))
#else
#define MFL_HOT
#endif

namespace mfl::cpu {

Dropout make_dropout(float p, const unsigned int* key) {
  Dropout d;
  d.active = p > 0.0f;
  if (d.active) {
    d.key0 = key[0];
    d.key1 = key[1];
    d.threshold = mfl_keep_threshold(p);
    d.keep_scale = mfl_keep_scale(p);
  }
  return d;
}

MFL_HOT void dropout_row(float* out, const float* x, int64_t n, uint64_t index0, const Dropout& d) {
  const unsigned int key0 = d.key0, key1 = d.key1, threshold = d.threshold;
  const float keep_scale = d.keep_scale;
  const unsigned int lo0 = static_cast<unsigned int>(index0);
  const unsigned int hi0 = static_cast<unsigned int>(index0 >> 32);
  if (uint64_t(lo0) + uint64_t(n) <= (uint64_t(1) << 32)) {
    // The common case: the high word is the same across the row, so the loop is
    // pure 32-bit arithmetic and vectorizes.
    for (unsigned int k = 0; k < static_cast<unsigned int>(n); ++k) {
      unsigned int bits = mfl_dropout_bits(key0, key1, lo0 + k, hi0);
      out[k] = x[k] * mfl_dropout_multiplier(bits, threshold, keep_scale);
    }
    return;
  }
  for (int64_t k = 0; k < n; ++k) {
    uint64_t index = index0 + uint64_t(k);
    unsigned int bits = mfl_dropout_bits(
        key0, key1, static_cast<unsigned int>(index), static_cast<unsigned int>(index >> 32));
    out[k] = x[k] * mfl_dropout_multiplier(bits, threshold, keep_scale);
  }
}

} // namespace mfl::cpu
