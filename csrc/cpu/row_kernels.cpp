#include "cpu/row_kernels.h"

#include "kernels/lora_dropout.h"

// The kernels are compiled twice, for the baseline x86-64 ISA and for AVX2 + FMA,
// and each call takes the best the CPU supports: the wheel runs everywhere and is
// fast where it can be. Elsewhere (arm64, clang) the compiler's default is used.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MFL_X86_DISPATCH 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace mfl::cpu::avx2 {
#include "cpu/row_kernels_impl.h"
}  // namespace mfl::cpu::avx2
#pragma GCC pop_options
#endif

namespace mfl::cpu::baseline {
#include "cpu/row_kernels_impl.h"
}  // namespace mfl::cpu::baseline

namespace mfl::cpu {

namespace {
#ifdef MFL_X86_DISPATCH
bool has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#define MFL_CALL(fn, ...) (has_avx2_fma() ? avx2::fn(__VA_ARGS__) : baseline::fn(__VA_ARGS__))
#else
#define MFL_CALL(fn, ...) baseline::fn(__VA_ARGS__)
#endif
}  // namespace

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

void dropout_row(float* out, const float* x, int64_t n, uint64_t index0, const Dropout& d) {
  MFL_CALL(dropout_row, out, x, n, index0, d);
}

void dot_4x2(const float* const rows[4], const float* const cols[2], int64_t n, float out[4][2]) {
  MFL_CALL(dot_4x2, rows, cols, n, out);
}

void row_times_matrix(const float* x, const float* a, int64_t k, int64_t r, float* h) {
  MFL_CALL(row_times_matrix, x, a, k, r, h);
}

void axpy_4_scaled(float* y, const float a[4], const float* const x[4], float s, int64_t n,
                   bool overwrite) {
  MFL_CALL(axpy_4_scaled, y, a, x, s, n, overwrite);
}

void axpy_4(float* y, const float a[4], const float* const x[4], int64_t n, bool overwrite) {
  MFL_CALL(axpy_4, y, a, x, n, overwrite);
}

}  // namespace mfl::cpu
