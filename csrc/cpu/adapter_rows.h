// Which adapter each row of x uses, and the adapters as the rank-r passes read them.
//
// The op holds n adapters stacked, lora_a (n, K, r) and lora_b (n, r, N), and an id per
// row in [-1, n) (-1: the base product alone). The single-adapter op is the case n = 1
// with no ids array: every row on adapter 0. The passes (lora_passes.h) run the same
// code for both; only these classes know whether ids exist.
//
// Grouping (as SGMV does): a range of rows is ordered by adapter with a stable counting
// sort of the row indices (M int32s, never a copy of x), so the rank-r kernels take
// blocks of rows that share an adapter, through their row pointers. Without ids the
// order is the identity and no array is made. The ids are checked where they are read,
// at eval time in the pass that needs them (an id out of range throws a named
// std::invalid_argument, which MLX re-raises at mx.eval): a check before the graph runs
// would need the ids' values on the host, a synchronization in the hot path.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/tiling.h"

namespace mfl::cpu {

// The adapter of each row: ids (M int32 in [-1, n)) or none (every row on adapter 0).
class AdapterRows {
 public:
  // m rows; checks every id against [-1, n) (throws, naming the first bad one).
  AdapterRows(const mx::array* ids, int64_t n, int64_t m);

  int64_t count() const { return n_; }
  bool has_ids() const { return ids_ != nullptr; }
  int adapter(int64_t row) const { return ids_ ? ids_[row] : 0; }
  // Whether some row uses adapter i (always true for adapter 0 without ids).
  bool used(int64_t i) const { return slot_[i] >= 0; }
  // The used adapters numbered 0, 1, ... (their slot in per-adapter scratch), -1 if unused.
  int64_t slot(int64_t i) const { return slot_[i]; }
  int64_t used_count() const { return used_count_; }
  // How many rows use adapter i.
  int64_t rows_of(int64_t i) const { return rows_of_[i]; }

 private:
  const int32_t* ids_;
  int64_t n_;
  std::vector<int64_t> slot_, rows_of_;
  int64_t used_count_ = 0;
};

// Rows [row0, row0 + size), or the rows listed, ordered by adapter, -1 rows first
// (stably, so each adapter's rows keep their order). pos indexes the order.
class RowGroups {
 public:
  RowGroups(const AdapterRows& rows, int64_t row0, int64_t size);
  RowGroups(const AdapterRows& rows, const std::vector<int32_t>& listed);

  int64_t size() const { return size_; }
  int64_t row(int64_t pos) const { return order_.empty() ? row0_ + pos : order_[pos]; }
  int adapter(int64_t pos) const { return rows_.adapter(row(pos)); }
  // One past the last position of pos's adapter.
  int64_t group_end(int64_t pos) const;

 private:
  template <typename RowAt>
  void sort(RowAt&& row_at);

  const AdapterRows& rows_;
  int64_t row0_, size_;
  std::vector<int32_t> order_;  // empty: the identity (no ids)
  std::vector<int64_t> ends_;   // ends_[i + 1]: end of adapter i's positions (ends_[0]: -1's)
};

// One float32 matrix per wanted adapter (by default: each used one), from a stacked
// (n, rows, cols) or a single (rows, cols) array of any float dtype: multiplied by
// multiplier(i) and optionally transposed, one small copy per call (cheap next to a
// pass over x), or the adapter itself where nothing changes (float32, not transposed,
// multiplier 1), as x_row returns x's row. Other adapters get nothing (null).
class AdapterFloats {
 public:
  template <typename Multiplier, typename Wanted>
  AdapterFloats(const mx::array& stacked, const AdapterRows& rows, bool transpose,
                Multiplier&& multiplier, Wanted&& wanted);
  AdapterFloats(const mx::array& stacked, const AdapterRows& rows, bool transpose = false)
      : AdapterFloats(
            stacked, rows, transpose, [](int64_t) { return 1.0f; },
            [&rows](int64_t i) { return rows.used(i); }) {}

  const float* operator[](int64_t i) const { return matrix_[i]; }

 private:
  static bool in_place(const mx::array& stacked, bool transpose, float multiplier) {
    return stacked.dtype() == mx::float32 && !transpose && multiplier == 1.0f;
  }

  // The wanted adapters that need a copy (all but those used in place).
  template <typename Multiplier, typename Wanted>
  static std::vector<int64_t> to_copy(const mx::array& stacked, const AdapterRows& rows,
                                      bool transpose, Multiplier& multiplier, Wanted& wanted) {
    std::vector<int64_t> out;
    for (int64_t i = 0; i < rows.count(); ++i) {
      if (wanted(i) && !in_place(stacked, transpose, multiplier(i))) {
        out.push_back(i);
      }
    }
    return out;
  }

  std::vector<int64_t> copied_;
  std::vector<const float*> matrix_;
  Scratch data_;
};

// The per-adapter multipliers of the LoRA term: scale * scales[i] (scales: an (n,)
// float32 array, or none: 1).
class AdapterScales {
 public:
  AdapterScales(float scale, const mx::array* scales)
      : scale_(scale), scales_(scales ? scales->data<float>() : nullptr) {}
  float operator()(int64_t i) const { return scales_ ? scale_ * scales_[i] : scale_; }

 private:
  float scale_;
  const float* scales_;  // taken once: array::data is a call into libmlx
};

// The stacked dims of lora_a (n, K, r) / lora_b (n, r, N), or n = 1 for a 2-D one.
inline int64_t adapter_count(const mx::array& a) { return a.ndim() == 3 ? a.shape(0) : 1; }
inline int64_t adapter_dim(const mx::array& a, int i) { return a.shape(a.ndim() - 2 + i); }

// Writes per-used-adapter float32 blocks (`size` each, by slot) into a stacked output of
// any float dtype: an unused adapter's block is zeros.
inline void store_adapters(mx::array& out, const AdapterRows& rows, const float* src,
                           int64_t size) {
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = 0; i < rows.count(); ++i) {
      T* dst = out.data<T>() + i * size;
      if (rows.used(i)) {
        store_row(dst, src + rows.slot(i) * size, size);
      } else {
        std::fill(dst, dst + size, T(0.0f));
      }
    }
  });
}

// out = m * src (rows x cols), or its transpose (cols x rows), widened to float32. The
// plain copy vectorizes; the transpose goes by 16 x 16 tiles, writing each output row's
// 16 values in a row while the tile's 16 source lines stay in L1 (writing column-wise
// instead strides by K, a power of two: every store of a tile row hit one L1 set, and
// the copy took longer than the rank-r work it fed).
template <typename T>
void widen_matrix(const T* src, int64_t rows, int64_t cols, float m, bool transpose, float* out) {
  if (!transpose) {
    for (int64_t e = 0; e < rows * cols; ++e) {
      out[e] = m * static_cast<float>(src[e]);
    }
    return;
  }
  constexpr int64_t kTile = 16;
  for (int64_t a0 = 0; a0 < rows; a0 += kTile) {
    const int64_t a1 = std::min(a0 + kTile, rows);
    for (int64_t b0 = 0; b0 < cols; b0 += kTile) {
      const int64_t b1 = std::min(b0 + kTile, cols);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t a = a0; a < a1; ++a) {
          out[b * rows + a] = m * static_cast<float>(src[a * cols + b]);
        }
      }
    }
  }
}

template <typename Multiplier, typename Wanted>
AdapterFloats::AdapterFloats(const mx::array& stacked, const AdapterRows& rows, bool transpose,
                             Multiplier&& multiplier, Wanted&& wanted)
    : copied_(to_copy(stacked, rows, transpose, multiplier, wanted)),
      matrix_(rows.count(), nullptr),
      data_(copied_.size() * adapter_dim(stacked, 0) * adapter_dim(stacked, 1)) {
  const int64_t r0 = adapter_dim(stacked, 0), c0 = adapter_dim(stacked, 1), size = r0 * c0;
  for (int64_t i = 0; i < rows.count(); ++i) {
    if (wanted(i) && in_place(stacked, transpose, multiplier(i))) {
      matrix_[i] = stacked.data<float>() + i * size;
    }
  }
  dispatch_float(stacked.dtype(), [&](auto tag) {
    using T = decltype(tag);
    // One adapter per task: decoding with many adapters widens them all.
    parallel_for(copied_.size(), 1, [&](int64_t u0, int64_t u1, int) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t i = copied_[u];
        widen_matrix(stacked.data<T>() + i * size, r0, c0, multiplier(i), transpose,
                     data_.data() + u * size);
      }
    });
  });
  for (size_t u = 0; u < copied_.size(); ++u) {
    matrix_[copied_[u]] = data_.data() + u * size;
  }
}

}  // namespace mfl::cpu
