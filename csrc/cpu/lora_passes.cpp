// Bodies of the fused op's forward passes (lora_passes.h): the rank-r work over blocks
// of rows that share an adapter, with the dropout mask recomputed per row, around the
// base GEMM. The backward passes are in lora_grad_passes.cpp.
//
// Memory passes (M x K: x, M x N: y), the same for n adapters as for one: x is read
// once by the rank-r pass (each row once, in its adapter's group) and once by the GEMM;
// y is written once by the rank-r pass, then updated by the GEMM (beta = 1). Beyond
// those, each used adapter (K x r and r x N) is read once per row block: widened to
// float32 once per call when it serves many rows, read in place when it serves few.
#include "cpu/lora_passes.h"

#include <cstring>
#include <type_traits>

#include "cpu/adapter_rows.h"
#include "cpu/parallel.h"
#include "cpu/row_blocks.h"

namespace mfl::cpu {

namespace {

// An adapter that serves at least this many rows of a call is widened to float32 once
// (A transposed, B scaled) for the blocked row kernels; a float32 adapter that serves
// fewer (decoding, one row per adapter) is read in place, row by row, with the same
// arithmetic (the same bits): copying it would cost more than its rows.
constexpr int64_t kCopyRows = kRowGrain;

// The forward's rank-r part: h = (mask ⊙ x) @ A_id and, onto each output row's
// starting value, + c_id * h @ B_id. One pass over x, each row block read once.
template <typename T>
class LowRankForward {
 public:
  LowRankForward(const mx::array& x, const mx::array* bias, const mx::array& a, const mx::array& b,
                 const mx::array* key, float scale, float p, Routing route, mx::array& h)
      : x_(x.data<T>()),
        k_(x.shape(1)),
        n_(adapter_dim(b, 1)),
        r_(adapter_dim(a, 1)),
        d_(dropout_from(p, key)),
        c_(scale, route.scales),
        adapters_(route.ids, adapter_count(a), x.shape(0)),
        a_(a),
        b_(b),
        a_in_place_(a.dtype() == mx::float32 ? a.data<float>() : nullptr),
        b_in_place_(b.dtype() == mx::float32 ? b.data<float>() : nullptr),
        a_t_(a, adapters_, /*transpose=*/true, One{}, Copied{this}),  // (r, K) each
        b_scaled_(b, adapters_, false, c_, Copied{this}),             // (r, N) each
        bias_(bias ? n_ : 0),
        zeros_(n_, 0.0f),
        has_bias_(bias != nullptr),
        h_(h.data<float>()) {
    if (bias) {
      load_row(bias_.data(), bias->data<T>(), n_);
    }
    // A row read in place streams its adapter (r x (K + N) floats) from memory: a
    // block of them is worth a thread, where rows on widened adapters are not.
    for (int64_t i = 0; i < adapters_.count(); ++i) {
      if (adapters_.used(i) && !copied(i)) {
        grain_ = kBlock;
      }
    }
  }

  const float* bias() { return has_bias_ ? bias_.data() : nullptr; }

  // Output rows [row0, row0 + rows) into acc (leading dim N). start(row, acc_row)
  // returns the row's starting value: null (zero), any float row, or acc_row
  // after filling it.
  template <typename Start>
  void rows(int64_t row0, int64_t rows, float* acc, Start&& start) {
    const RowGroups groups(adapters_, row0, rows);
    parallel_for(rows, grain_, [&](int64_t i0, int64_t i1, int) {
      Scratch buf(kBlock * k_);
      Scratch h_block(kBlock * r_);
      for_each_block(groups, i0, i1, [&](int64_t pos, int64_t count, int adapter) {
        if (adapter < 0 || !copied(adapter)) {
          for (int64_t q = 0; q < count; ++q) {
            const int64_t row = groups.row(pos + q);
            float* out = acc + (row - row0) * n_;
            if (adapter < 0) {
              base_only(row, out, start);
            } else {
              in_place(row, adapter, out, start(row, out), buf.data());
            }
          }
          return;
        }
        const float* xr[kBlock];
        for (int64_t q = 0; q < kBlock; ++q) {
          xr[q] = q < count ? x_row(x_, k_, groups.row(pos + q), 0, k_, d_, buf.data() + q * k_)
                            : xr[0];
        }
        project_rows(xr, count, a_t_[adapter], k_, r_, h_block.data());
        for (int64_t q = 0; q < count; ++q) {
          const int64_t row = groups.row(pos + q);
          float* out = acc + (row - row0) * n_;
          std::memcpy(h_ + row * r_, h_block.data() + q * r_, r_ * sizeof(float));
          combine_rows(out, h_block.data() + q * r_, 1, b_scaled_[adapter], n_, r_, n_,
                       start(row, out), zeros_.data());
        }
      });
    });
  }

 private:
  struct One {
    float operator()(int64_t) const { return 1.0f; }
  };
  // Which adapters the blocked kernels take (widened once), the others being read in place.
  struct Copied {
    const LowRankForward* self;
    bool operator()(int64_t i) const { return self->adapters_.used(i) && self->copied(i); }
  };
  bool copied(int64_t i) const {
    return a_.dtype() != mx::float32 || b_.dtype() != mx::float32 ||
           adapters_.rows_of(i) >= kCopyRows;
  }

  // A row on no adapter (id -1): h = 0 and the output row is its starting value.
  template <typename Start>
  void base_only(int64_t row, float* out, Start& start) {
    std::fill(h_ + row * r_, h_ + (row + 1) * r_, 0.0f);
    const float* init = start(row, out);
    if (!init) {
      std::fill(out, out + n_, 0.0f);
    } else if (init != out) {
      std::memcpy(out, init, n_ * sizeof(float));
    }
  }

  // A row on a float32 adapter read in place: h = x_row @ A_i, out = init + h @ (c_i B_i),
  // with the bits of the widened path (row_times_matrix, combine_rows' vec_scale).
  void in_place(int64_t row, int adapter, float* out, const float* init, float* buf) {
    const float* xr = x_row(x_, k_, row, 0, k_, d_, buf);
    float* h = h_ + row * r_;
    row_times_matrix(xr, a_in_place_ + adapter * k_ * r_, k_, r_, h);
    combine_rows(out, h, 1, b_in_place_ + adapter * r_ * n_, n_, r_, n_, init, zeros_.data(),
                 c_(adapter));
  }

  const T* x_;
  int64_t k_, n_, r_;
  Dropout d_;
  AdapterScales c_;
  AdapterRows adapters_;
  const mx::array &a_, &b_;
  const float *a_in_place_, *b_in_place_;  // the float32 adapters, read in place
  AdapterFloats a_t_, b_scaled_;
  Scratch bias_, zeros_;
  bool has_bias_;
  float* h_;
  int64_t grain_ = kRowGrain;
};

// Forward, dense base: the rank-r pass writes each row block of y as bias +
// c_id * h @ B_id, then the one base GEMM over all rows accumulates onto y.
template <typename T>
void forward_impl(const mx::array& x, const mx::array& w, const mx::array* bias, const mx::array& a,
                  const mx::array& b, const mx::array* key, float scale, float p, Routing route,
                  mx::array& y, mx::array& h) {
  LowRankForward<T> lora(x, bias, a, b, key, scale, p, route, h);
  const int64_t m = x.shape(0), k = x.shape(1), n = w.shape(0);
  gemm_onto(x.data<T>(), w.data<T>(), /*transpose_w=*/true, m, k, n, y.data<T>(),
            [&](int64_t row0, int64_t rows, float* acc) {
              lora.rows(row0, rows, acc, [&](int64_t, float*) { return lora.bias(); });
            });
}

// Forward onto a given base product: y = base + bias + c_id * h @ B_id, y's rows
// written once (y may share base's buffer: each row is read before it is written).
template <typename T>
void forward_onto_impl(const mx::array& x, const mx::array& base, const mx::array* bias,
                       const mx::array& a, const mx::array& b, const mx::array* key, float scale,
                       float p, Routing route, mx::array& y, mx::array& h) {
  LowRankForward<T> lora(x, bias, a, b, key, scale, p, route, h);
  const int64_t m = x.shape(0), n = adapter_dim(b, 1);
  const T* bp = base.data<T>();
  const float* bias32 = lora.bias();
  auto start = [&](int64_t row, float* out) -> const float* {
    const T* src = bp + row * n;
    if constexpr (std::is_same_v<T, float>) {
      if (!bias32) {
        return src;
      }
    }
    load_row(out, src, n);
    for (int64_t j = 0; bias32 && j < n; ++j) {
      out[j] += bias32[j];
    }
    return out;
  };
  if constexpr (std::is_same_v<T, float>) {
    lora.rows(0, m, y.data<float>(), start);
  } else {
    const int64_t tile = tile_rows(m, n);
    Scratch acc(tile * n);
    for (int64_t t0 = 0; t0 < m; t0 += tile) {
      const int64_t rows = std::min(tile, m - t0);
      lora.rows(t0, rows, acc.data(), start);
      store_row(y.data<T>() + t0 * n, acc.data(), rows * n);
    }
  }
}

}  // namespace

void forward(const mx::array& x, const mx::array& w, const mx::array* bias, const mx::array& a,
             const mx::array& b, const mx::array* key, float scale, float p, Routing route,
             mx::array& y, mx::array& h) {
  dispatch_float(x.dtype(), [&](auto tag) {
    forward_impl<decltype(tag)>(x, w, bias, a, b, key, scale, p, route, y, h);
  });
}

void forward_onto(const mx::array& x, const mx::array& base, const mx::array* bias,
                  const mx::array& a, const mx::array& b, const mx::array* key, float scale,
                  float p, Routing route, mx::array& y, mx::array& h) {
  dispatch_float(x.dtype(), [&](auto tag) {
    forward_onto_impl<decltype(tag)>(x, base, bias, a, b, key, scale, p, route, y, h);
  });
}

void dropout_mask(const mx::array* key, float p, mx::array& out) {
  // The mask depends on the flat index only: chunks of the flattened output, so the
  // scratch is small whatever the shape.
  constexpr int64_t kChunk = 4096;
  const Dropout d = dropout_from(p, key);
  const int64_t size = out.size();
  const int64_t chunks = (size + kChunk - 1) / kChunk;
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* dst = out.data<T>();
    parallel_for(chunks, 4, [&](int64_t c0, int64_t c1, int) {
      Scratch ones(kChunk, 1.0f);
      Scratch mask(kChunk, 1.0f);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t begin = c * kChunk, len = std::min(kChunk, size - begin);
        if (d.active) {
          dropout_row(mask.data(), ones.data(), len, uint64_t(begin), d);
        }
        store_row(dst + begin, mask.data(), len);
      }
    });
  });
}

}  // namespace mfl::cpu
