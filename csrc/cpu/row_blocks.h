// Building blocks of the CPU passes (lora_passes.cpp, lora_grad_passes.cpp): a row of x
// with its dropout applied, and the rank-r products over blocks of up to four rows
// that share an adapter, on the row kernels (row_kernels.h).
#pragma once

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cpu/row_kernels.h"
#include "cpu/tiling.h"

namespace mfl::cpu {

inline Dropout dropout_from(float p, const mx::array* key) {
  return make_dropout(key ? p : 0.0f, key ? key->data<unsigned int>() : nullptr);
}

// Row i of x, columns [k0, k0 + len), as float32 with dropout applied. Returns x
// itself when nothing changes (float32, no dropout), else fills `buf`: so a masked
// or widened row exists only in a worker's row buffer, never as a copy of x.
template <typename T>
const float* x_row(const T* x, int64_t row_len, int64_t i, int64_t k0, int64_t len,
                   const Dropout& d, float* buf) {
  const T* src = x + i * row_len + k0;
  const uint64_t index0 = uint64_t(i) * uint64_t(row_len) + uint64_t(k0);
  if constexpr (std::is_same_v<T, float>) {
    if (!d.active) {
      return src;
    }
    dropout_row(buf, src, len, index0, d);
  } else {
    load_row(buf, src, len);
    if (d.active) {
      dropout_row(buf, buf, len, index0, d);
    }
  }
  return buf;
}

// The rank-r building blocks work on blocks of up to four rows (the row kernels
// take exactly four). A missing row of a product whose result is discarded repeats
// row 0; a missing term of a sum is a row of zeros with a zero coefficient, never a
// real row (0 * inf would turn a real ±inf into NaN).
constexpr int64_t kBlock = 4;

// h[q * r + j] = rows[q] . a_t[j] for q < count: rows @ A with A given as A^T (r x k).
inline void project_rows(const float* const rows[kBlock], int64_t count, const float* a_t,
                         int64_t k, int64_t r, float* h) {
  for (int64_t j = 0; j < r; j += 2) {
    const float* cols[2] = {a_t + j * k, a_t + std::min(j + 1, r - 1) * k};
    float out[kBlock][2];
    dot_4x2(rows, cols, k, out);
    for (int64_t q = 0; q < count; ++q) {
      h[q * r + j] = out[q][0];
      if (j + 1 < r) {
        h[q * r + j + 1] = out[q][1];
      }
    }
  }
}

// out (len) = init + sum_j coef[j * coef_stride] * (vec_scale * vecs[j * ld]) over j < r:
// one row of a rank-r product, one pass per four ranks (vec_scale applied as a scaled copy
// of vecs would have it). init may be null (0) or out itself. zeros holds at least len zeros.
inline void combine_rows(float* out, const float* coef, int64_t coef_stride, const float* vecs,
                         int64_t ld, int64_t r, int64_t len, const float* init, const float* zeros,
                         float vec_scale = 1.0f) {
  if (init && init != out) {
    std::memcpy(out, init, len * sizeof(float));
  }
  for (int64_t j = 0; j < r; j += kBlock) {
    float a[kBlock];
    const float* x[kBlock];
    for (int64_t q = 0; q < kBlock; ++q) {
      const bool real = j + q < r;
      a[q] = real ? coef[(j + q) * coef_stride] : 0.0f;
      x[q] = real ? vecs + (j + q) * ld : zeros;
    }
    if (vec_scale == 1.0f) {
      axpy_4(out, a, x, len, /*overwrite=*/!init && j == 0);
    } else {
      axpy_4_scaled(out, a, x, vec_scale, len, /*overwrite=*/!init && j == 0);
    }
  }
}

// acc (r x len, leading dim ld) += sum over q < count of coefs[q][j] * rows[q] for each
// j < r: the outer-product update of a block of rows (dA^T from x and dS, dB from h and
// dY). rows[q] for q >= count must be zeros (their coefficients are 0).
inline void accumulate_outer(float* acc, int64_t ld, const float* const coefs[kBlock],
                             int64_t count, const float* const rows[kBlock], int64_t r,
                             int64_t len) {
  for (int64_t j = 0; j < r; ++j) {
    float c[kBlock];
    for (int64_t q = 0; q < kBlock; ++q) {
      c[q] = q < count ? coefs[q][j] : 0.0f;
    }
    axpy_4(acc + j * ld, c, rows, len, /*overwrite=*/false);
  }
}

// Positions [pos, end) of `groups` in blocks of at most kBlock rows of one adapter:
// fn(first position, count, adapter).
template <typename Groups, typename Fn>
void for_each_block(const Groups& groups, int64_t pos, int64_t end, Fn&& fn) {
  while (pos < end) {
    const int64_t count = std::min({kBlock, end - pos, groups.group_end(pos) - pos});
    fn(pos, count, groups.adapter(pos));
    pos += count;
  }
}

}  // namespace mfl::cpu
