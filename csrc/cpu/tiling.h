// Tiling helpers of the CPU passes: dtype dispatch, row conversion, scratch memory
// from MLX's allocator, float32 row tiles for the BLAS and the GEMM that accumulates
// onto a starting value (so the op never makes an M x N temporary).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "cpu/blas.h"
#include "cpu/parallel.h"
#include "mlx/allocator.h"
#include "mlx/array.h"

namespace mx = mlx::core;

namespace mfl::cpu {

// Rows handed to one thread at least, so tiny problems (decode, M = 1) stay serial.
constexpr int64_t kRowGrain = 16;
constexpr int64_t kColumnGrain = 256;
// Elements of a half-precision matrix widened to float32 at once for the BLAS (256
// KiB): big enough for it to run at full speed on a tile, small enough for cache.
constexpr int64_t kTileElements = 1 << 16;

// Rows of a tile of `cols` columns: at least 1, and never a division by zero when
// a dimension is empty.
inline int64_t tile_rows(int64_t rows, int64_t cols) {
  return std::max<int64_t>(1, std::min<int64_t>(rows, kTileElements / std::max<int64_t>(cols, 1)));
}

inline bool is_float(mx::Dtype t) {
  return t == mx::float32 || t == mx::float16 || t == mx::bfloat16;
}

template <typename Fn>
void dispatch_float(mx::Dtype t, Fn&& fn) {
  if (t == mx::float32) {
    fn(float{});
  } else if (t == mx::float16) {
    fn(mx::float16_t{});
  } else if (t == mx::bfloat16) {
    fn(mx::bfloat16_t{});
  } else {
    throw std::invalid_argument("[mlx_fused_lora] expected float32, float16 or bfloat16");
  }
}

template <typename T>
void load_row(float* dst, const T* src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    dst[k] = static_cast<float>(src[k]);
  }
}

template <typename T>
void store_row(T* dst, const float* src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    dst[k] = static_cast<T>(src[k]);
  }
}

// Float32 scratch memory from MLX's allocator, so that mx.get_peak_memory() counts
// the op's temporaries like any array's.
// The pointer is taken once: Buffer::raw_ptr is a call into libmlx, too slow per element.
class Scratch {
 public:
  explicit Scratch(int64_t count)
      : data_(mx::allocator::malloc(std::max<int64_t>(count, 1) * sizeof(float))),
        ptr_(static_cast<float*>(data_.buffer().raw_ptr())) {}
  Scratch(int64_t count, float fill) : Scratch(count) { std::fill(data(), data() + count, fill); }
  float* data() { return ptr_; }
  const float* data() const { return ptr_; }
  float& operator[](int64_t i) { return ptr_[i]; }

 private:
  mx::allocator::Data data_;
  float* ptr_;
};

// Float32 row tiles of a matrix for the BLAS: fn(row0, rows, tile). Float32 is
// handed over whole and uncopied; half types are widened one tile at a time.
template <typename T, typename Fn>
void for_each_float_tile(const T* a, int64_t m, int64_t k, Fn&& fn) {
  if constexpr (std::is_same_v<T, float>) {
    fn(int64_t(0), m, a);
  } else {
    const int64_t tile = tile_rows(m, k);
    Scratch buf(tile * k);
    for (int64_t t0 = 0; t0 < m; t0 += tile) {
      const int64_t rows = std::min(tile, m - t0);
      parallel_for(rows * k, kTileElements / 8, [&](int64_t e0, int64_t e1, int) {
        load_row(buf.data() + e0, a + t0 * k + e0, e1 - e0);
      });
      fn(t0, rows, static_cast<const float*>(buf.data()));
    }
  }
}

// out (m x n_out) = init + a (m x k_in) @ op(w), op(w) = w^T for w (n_out x k_in)
// else w (k_in x n_out). init(row0, rows, acc) writes the float32 starting value of
// those rows into acc (leading dim n_out); the GEMM then accumulates onto it
// (beta = 1), straight into out for float32, so no m x n_out temporary exists.
template <typename T, typename Init>
void gemm_onto(const T* a, const T* w, bool transpose_w, int64_t m, int64_t k_in, int64_t n_out,
               T* out, Init&& init) {
  const int ldw = std::max<int64_t>(1, transpose_w ? k_in : n_out);
  const int lda = std::max<int64_t>(1, k_in);
  if constexpr (std::is_same_v<T, float>) {
    init(int64_t(0), m, out);
    sgemm(false, transpose_w, m, n_out, k_in, 1.0f, a, lda, w, ldw, 1.0f, out, n_out);
  } else {
    // No half-precision GEMM in the BLAS: W is widened once per call (a
    // weight-sized temporary), x a tile at a time.
    Scratch w32(n_out * k_in);
    load_row(w32.data(), w, n_out * k_in);
    Scratch acc(tile_rows(m, k_in) * n_out);
    for_each_float_tile(a, m, k_in, [&](int64_t row0, int64_t rows, const float* a_tile) {
      init(row0, rows, acc.data());
      sgemm(false, transpose_w, rows, n_out, k_in, 1.0f, a_tile, lda, w32.data(), ldw, 1.0f,
            acc.data(), n_out);
      parallel_for(rows, kRowGrain, [&](int64_t i0, int64_t i1, int) {
        store_row(out + (row0 + i0) * n_out, acc.data() + i0 * n_out, (i1 - i0) * n_out);
      });
    });
  }
}

}  // namespace mfl::cpu
