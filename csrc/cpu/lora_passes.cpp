// Bodies of the fused op's CPU passes (lora_passes.h): the rank-r work over blocks
// of rows, with the dropout mask recomputed per row, around the BLAS GEMMs.
#include "cpu/lora_passes.h"

#include <cstring>
#include <type_traits>

#include "cpu/parallel.h"
#include "cpu/row_kernels.h"
#include "cpu/tiling.h"

namespace mfl::cpu {

namespace {

Dropout dropout_from(float p, const mx::array* key) {
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
void project_rows(const float* const rows[kBlock], int64_t count, const float* a_t, int64_t k,
                  int64_t r, float* h) {
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

// out (len) = init + sum_j coef[j * coef_stride] * vecs[j * ld] over j < r: one row
// of a rank-r product, one pass per four ranks. init may be null (0) or out itself.
// zeros holds at least len zeros.
void combine_rows(float* out, const float* coef, int64_t coef_stride, const float* vecs, int64_t ld,
                  int64_t r, int64_t len, const float* init, const float* zeros) {
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
    axpy_4(out, a, x, len, /*overwrite=*/!init && j == 0);
  }
}

// The forward's rank-r part: h = (mask ⊙ x) @ A and, onto each output row's
// starting value, + scale * h @ B. One pass over x, each row block read once.
template <typename T>
class LowRankForward {
 public:
  LowRankForward(const mx::array& x, const mx::array* bias, const mx::array& a, const mx::array& b,
                 const mx::array* key, float scale, float p, mx::array& h)
      : x_(x.data<T>()),
        k_(x.shape(1)),
        n_(b.shape(1)),
        r_(a.shape(1)),
        d_(dropout_from(p, key)),
        a_t_(adapter_as_float(a, 1.0f, /*transpose=*/true)),  // (r, K)
        b_scaled_(adapter_as_float(b, scale)),                // (r, N)
        bias_(bias ? n_ : 0),
        zeros_(n_, 0.0f),
        has_bias_(bias != nullptr),
        h_(h.data<float>()) {
    if (bias) {
      load_row(bias_.data(), bias->data<T>(), n_);
    }
  }

  const float* bias() { return has_bias_ ? bias_.data() : nullptr; }

  // Output rows [row0, row0 + rows) into acc (leading dim N). start(row, acc_row)
  // returns the row's starting value: null (zero), any float row, or acc_row
  // after filling it.
  template <typename Start>
  void rows(int64_t row0, int64_t rows, float* acc, Start&& start) {
    parallel_for(rows, kRowGrain, [&](int64_t i0, int64_t i1, int) {
      Scratch buf(kBlock * k_);
      for (int64_t i = i0; i < i1; i += kBlock) {
        const int64_t count = std::min(kBlock, i1 - i);
        const float* xr[kBlock];
        for (int64_t q = 0; q < kBlock; ++q) {
          xr[q] = q < count ? x_row(x_, k_, row0 + i + q, 0, k_, d_, buf.data() + q * k_) : xr[0];
        }
        float* hr = h_ + (row0 + i) * r_;
        project_rows(xr, count, a_t_.data(), k_, r_, hr);
        for (int64_t q = 0; q < count; ++q) {
          float* out = acc + (i + q) * n_;
          combine_rows(out, hr + q * r_, 1, b_scaled_.data(), n_, r_, n_, start(row0 + i + q, out),
                       zeros_.data());
        }
      }
    });
  }

 private:
  const T* x_;
  int64_t k_, n_, r_;
  Dropout d_;
  Scratch a_t_, b_scaled_, bias_, zeros_;
  bool has_bias_;
  float* h_;
};

// Forward, dense base: the rank-r pass writes each row block of y as bias +
// scale * h @ B, then the base GEMM accumulates onto y. Passes: x twice (this, the
// GEMM), y written then updated by the GEMM.
template <typename T>
void forward_impl(const mx::array& x, const mx::array& w, const mx::array* bias, const mx::array& a,
                  const mx::array& b, const mx::array* key, float scale, float p, mx::array& y,
                  mx::array& h) {
  LowRankForward<T> lora(x, bias, a, b, key, scale, p, h);
  const int64_t m = x.shape(0), k = x.shape(1), n = w.shape(0);
  gemm_onto(x.data<T>(), w.data<T>(), /*transpose_w=*/true, m, k, n, y.data<T>(),
            [&](int64_t row0, int64_t rows, float* acc) {
              lora.rows(row0, rows, acc, [&](int64_t, float*) { return lora.bias(); });
            });
}

// Forward onto a given base product: y = base + bias + scale * h @ B, y's rows
// written once (y may share base's buffer: each row is read before it is written).
template <typename T>
void forward_onto_impl(const mx::array& x, const mx::array& base, const mx::array* bias,
                       const mx::array& a, const mx::array& b, const mx::array* key, float scale,
                       float p, mx::array& y, mx::array& h) {
  LowRankForward<T> lora(x, bias, a, b, key, scale, p, h);
  const int64_t m = x.shape(0), n = b.shape(1);
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

// dS = scale * dY @ B^T, dB = scale * h^T @ dY: two rank-r GEMMs over dY, no mask.
// scale multiplies the (small) results, not the BLAS's alpha: with alpha = 0 a BLAS
// skips the product, and scale = 0 must give 0 * inf = NaN as plain MLX does.
template <typename T>
void low_rank_grad_impl(const mx::array& dy, const mx::array& h, const mx::array& b, float scale,
                        mx::array& ds, mx::array& db) {
  const int64_t m = dy.shape(0), n = dy.shape(1), r = h.shape(1);
  Scratch b32 = adapter_as_float(b);  // (r, N)
  Scratch db32(r * n, 0.0f);
  float* dsp = ds.data<float>();
  const float* hp = h.data<float>();
  for_each_float_tile(dy.data<T>(), m, n, [&](int64_t row0, int64_t rows, const float* tile) {
    sgemm(false, true, rows, r, n, 1.0f, tile, n, b32.data(), n, 0.0f, dsp + row0 * r, r);
    sgemm(true, false, r, n, rows, 1.0f, hp + row0 * r, r, tile, n, 1.0f, db32.data(), n);
  });
  for (int64_t i = 0; i < m * r; ++i) {
    dsp[i] *= scale;
  }
  for (int64_t i = 0; i < r * n; ++i) {
    db32[i] *= scale;
  }
  store_as(db, db32.data());
}

// dA = (mask ⊙ x)^T @ dS in one pass over x: each worker owns a slab of x's
// columns, accumulates dA^T for it over row blocks, and needs no reduction.
template <typename T>
void down_grad_impl(const mx::array& x, const mx::array& ds, const mx::array* key, float p,
                    mx::array& da) {
  const int64_t m = x.shape(0), k = x.shape(1), r = ds.shape(1);
  const Dropout d = dropout_from(p, key);
  Scratch da32(k * r);
  Scratch zeros(k, 0.0f);
  const T* xp = x.data<T>();
  const float* dsp = ds.data<float>();
  parallel_for(k, kColumnGrain, [&](int64_t k0, int64_t k1, int) {
    const int64_t len = k1 - k0;
    Scratch acc_t(r * len, 0.0f);  // (r, len): this slab of dA^T
    Scratch buf(kBlock * len);
    for (int64_t i = 0; i < m; i += kBlock) {
      const int64_t count = std::min(kBlock, m - i);
      const float* xr[kBlock];
      for (int64_t q = 0; q < kBlock; ++q) {
        xr[q] = q < count ? x_row(xp, k, i + q, k0, len, d, buf.data() + q * len) : zeros.data();
      }
      for (int64_t j = 0; j < r; ++j) {
        float coef[kBlock];
        for (int64_t q = 0; q < kBlock; ++q) {
          coef[q] = q < count ? dsp[(i + q) * r + j] : 0.0f;
        }
        axpy_4(acc_t.data() + j * len, coef, xr, len, /*overwrite=*/false);
      }
    }
    for (int64_t kk = 0; kk < len; ++kk) {
      for (int64_t j = 0; j < r; ++j) {
        da32[(k0 + kk) * r + j] = acc_t[j * len + kk];
      }
    }
  });
  store_as(da, da32.data());
}

// Row i of the masked rank-r term of dX, mask ⊙ (dS @ A^T), into row (length K).
void masked_rank_r_row(float* row, const float* ds_row, const float* a_t, int64_t k, int64_t r,
                       int64_t i, const Dropout& d, const float* zeros) {
  combine_rows(row, ds_row, 1, a_t, k, r, k, nullptr, zeros);
  if (d.active) {
    dropout_row(row, row, k, uint64_t(i) * uint64_t(k), d);
  }
}

// dX = dY @ W + mask ⊙ (dS @ A^T): the masked rank-r term is written row by row
// (one write pass, mask applied while the row is in cache), then the GEMM
// accumulates onto it.
template <typename T>
void input_grad_impl(const mx::array& dy, const mx::array& w, const mx::array& ds,
                     const mx::array& a, const mx::array* key, float p, mx::array& dx) {
  const int64_t m = dy.shape(0), n = dy.shape(1), k = w.shape(1), r = a.shape(1);
  const Dropout d = dropout_from(p, key);
  Scratch a_t = adapter_as_float(a, 1.0f, /*transpose=*/true);  // (r, K)
  Scratch zeros(k, 0.0f);
  const float* dsp = ds.data<float>();
  auto init = [&](int64_t row0, int64_t rows, float* acc) {
    parallel_for(rows, kRowGrain, [&](int64_t i0, int64_t i1, int) {
      for (int64_t i = i0; i < i1; ++i) {
        masked_rank_r_row(acc + i * k, dsp + (row0 + i) * r, a_t.data(), k, r, row0 + i, d,
                          zeros.data());
      }
    });
  };
  gemm_onto(dy.data<T>(), w.data<T>(), /*transpose_w=*/false, m, n, k, dx.data<T>(), init);
}

// dX = base + mask ⊙ (dS @ A^T), dX's rows written once (dX may share base's buffer).
template <typename T>
void input_grad_onto_impl(const mx::array& base, const mx::array& ds, const mx::array& a,
                          const mx::array* key, float p, mx::array& dx) {
  const int64_t m = ds.shape(0), k = a.shape(0), r = a.shape(1);
  const Dropout d = dropout_from(p, key);
  Scratch a_t = adapter_as_float(a, 1.0f, /*transpose=*/true);  // (r, K)
  Scratch zeros(k, 0.0f);
  const float* dsp = ds.data<float>();
  const T* bp = base.data<T>();
  T* out = dx.data<T>();
  parallel_for(m, kRowGrain, [&](int64_t i0, int64_t i1, int) {
    Scratch row(k);
    for (int64_t i = i0; i < i1; ++i) {
      masked_rank_r_row(row.data(), dsp + i * r, a_t.data(), k, r, i, d, zeros.data());
      for (int64_t kk = 0; kk < k; ++kk) {
        out[i * k + kk] = static_cast<T>(static_cast<float>(bp[i * k + kk]) + row[kk]);
      }
    }
  });
}

}  // namespace

#define MFL_DISPATCH(array, call)                 \
  dispatch_float((array).dtype(), [&](auto tag) { \
    using T = decltype(tag);                      \
    call;                                         \
  })

void forward(const mx::array& x, const mx::array& w, const mx::array* bias, const mx::array& a,
             const mx::array& b, const mx::array* key, float scale, float p, mx::array& y,
             mx::array& h) {
  MFL_DISPATCH(x, forward_impl<T>(x, w, bias, a, b, key, scale, p, y, h));
}

void forward_onto(const mx::array& x, const mx::array& base, const mx::array* bias,
                  const mx::array& a, const mx::array& b, const mx::array* key, float scale,
                  float p, mx::array& y, mx::array& h) {
  MFL_DISPATCH(x, forward_onto_impl<T>(x, base, bias, a, b, key, scale, p, y, h));
}

void low_rank_grad(const mx::array& dy, const mx::array& h, const mx::array& b, float scale,
                   mx::array& ds, mx::array& db) {
  MFL_DISPATCH(dy, low_rank_grad_impl<T>(dy, h, b, scale, ds, db));
}

void down_grad(const mx::array& x, const mx::array& ds, const mx::array* key, float p,
               mx::array& da) {
  MFL_DISPATCH(x, down_grad_impl<T>(x, ds, key, p, da));
}

void input_grad(const mx::array& dy, const mx::array& w, const mx::array& ds, const mx::array& a,
                const mx::array* key, float p, mx::array& dx) {
  MFL_DISPATCH(dy, input_grad_impl<T>(dy, w, ds, a, key, p, dx));
}

void input_grad_onto(const mx::array& base, const mx::array& ds, const mx::array& a,
                     const mx::array* key, float p, mx::array& dx) {
  MFL_DISPATCH(base, input_grad_onto_impl<T>(base, ds, a, key, p, dx));
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

#undef MFL_DISPATCH

}  // namespace mfl::cpu
