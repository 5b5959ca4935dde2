#include "cpu/fused_lora.h"

#include <cstring>
#include <sstream>
#include <stdexcept>

#include "cpu/blas.h"
#include "cpu/parallel.h"
#include "cpu/row_kernels.h"
#include "mlx/backend/cpu/encoder.h"

namespace mfl {

namespace {

using cpu::Dropout;
using cpu::parallel_for;

// Rows handed to one thread at least, so tiny problems (decode, M = 1) stay serial.
constexpr int64_t kRowGrain = 16;
constexpr int64_t kColumnGrain = 256;
// Elements of a half-precision matrix widened to float32 at once for the BLAS (256
// KiB): big enough for it to run at full speed on a tile, small enough for cache.
constexpr int64_t kTileElements = 1 << 16;

[[noreturn]] void gpu_unsupported(const char* name) {
  std::ostringstream msg;
  msg << "[mlx_fused_lora] " << name
      << " is a CPU primitive; GPU streams are served by mlx_fused_lora.ops, "
         "not by the C++ extension.";
  throw std::runtime_error(msg.str());
}

void require(bool ok, const std::string& msg) {
  if (!ok) {
    throw std::invalid_argument("[mlx_fused_lora] " + msg);
  }
}

std::string shape_str(const mx::array& a) {
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < a.ndim(); ++i) {
    s << (i ? ", " : "") << a.shape(i);
  }
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

bool is_float(mx::Dtype t) { return t == mx::float32 || t == mx::float16 || t == mx::bfloat16; }

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
class Scratch {
 public:
  explicit Scratch(int64_t count)
      : data_(mx::allocator::malloc(std::max<int64_t>(count, 1) * sizeof(float))) {}
  Scratch(int64_t count, float fill) : Scratch(count) { std::fill(data(), data() + count, fill); }
  float* data() { return static_cast<float*>(data_.buffer().raw_ptr()); }
  float& operator[](int64_t i) { return data()[i]; }

 private:
  mx::allocator::Data data_;
};

// Adapters are small (K x r, r x N): one float32 copy per call, scaled and
// optionally transposed, is cheap next to a pass over x.
Scratch adapter_as_float(const mx::array& a, float multiplier = 1.0f, bool transpose = false) {
  const int64_t rows = a.shape(0), cols = a.shape(1);
  Scratch out(rows * cols);
  dispatch_float(a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* src = a.data<T>();
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) {
        out[transpose ? j * rows + i : i * cols + j] =
            multiplier * static_cast<float>(src[i * cols + j]);
      }
    }
  });
  return out;
}

// Writes float32 values into an already allocated output of any float dtype.
void store_as(mx::array& out, const float* src) {
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    store_row(out.data<T>(), src, out.size());
  });
}

Dropout dropout_from(float p, const mx::array* key) {
  return cpu::make_dropout(p, key ? key->data<unsigned int>() : nullptr);
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
    cpu::dropout_row(buf, src, len, index0, d);
  } else {
    load_row(buf, src, len);
    if (d.active) {
      cpu::dropout_row(buf, buf, len, index0, d);
    }
  }
  return buf;
}

// The rank-r building blocks, over blocks of up to four rows (kernels take exactly
// four; missing rows repeat row 0 with a zero coefficient or a discarded result).
constexpr int64_t kBlock = 4;

// h[q * r + j] = rows[q] . a_t[j] for q < count: rows @ A with A given as A^T (r x k).
void project_rows(const float* const rows[kBlock], int64_t count, const float* a_t, int64_t k,
                  int64_t r, float* h) {
  for (int64_t j = 0; j < r; j += 2) {
    const float* cols[2] = {a_t + j * k, a_t + std::min(j + 1, r - 1) * k};
    float out[kBlock][2];
    cpu::dot_4x2(rows, cols, k, out);
    for (int64_t q = 0; q < count; ++q) {
      h[q * r + j] = out[q][0];
      if (j + 1 < r) {
        h[q * r + j + 1] = out[q][1];
      }
    }
  }
}

// out (len) = init + sum_j coef[j * coef_stride] * vecs[j * ld] over j < r: one row
// of a rank-r product, written with one pass per four ranks. init may be null (0).
void combine_rows(float* out, const float* coef, int64_t coef_stride, const float* vecs, int64_t ld,
                  int64_t r, int64_t len, const float* init) {
  if (init) {
    std::memcpy(out, init, len * sizeof(float));
  }
  for (int64_t j = 0; j < r; j += kBlock) {
    float a[kBlock];
    const float* x[kBlock];
    for (int64_t q = 0; q < kBlock; ++q) {
      const bool real = j + q < r;
      a[q] = real ? coef[(j + q) * coef_stride] : 0.0f;
      x[q] = vecs + (real ? j + q : 0) * ld;
    }
    cpu::axpy_4(out, a, x, len, /*overwrite=*/!init && j == 0);
  }
}

// Float32 row tiles of a matrix for the BLAS: fn(row0, rows, tile). Float32 is
// handed over whole and uncopied; half types are widened one tile at a time.
template <typename T, typename Fn>
void for_each_float_tile(const T* a, int64_t m, int64_t k, Fn&& fn) {
  if constexpr (std::is_same_v<T, float>) {
    fn(int64_t(0), m, a);
  } else {
    const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(m, kTileElements / k));
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
  const int ldw = transpose_w ? k_in : n_out;
  if constexpr (std::is_same_v<T, float>) {
    init(int64_t(0), m, out);
    cpu::sgemm(false, transpose_w, m, n_out, k_in, 1.0f, a, k_in, w, ldw, 1.0f, out, n_out);
  } else {
    // No half-precision GEMM in the BLAS: W is widened once per call (a
    // weight-sized temporary), x a tile at a time.
    Scratch w32(n_out * k_in);
    load_row(w32.data(), w, n_out * k_in);
    Scratch acc(std::min<int64_t>(m, std::max<int64_t>(1, kTileElements / k_in)) * n_out);
    for_each_float_tile(a, m, k_in, [&](int64_t row0, int64_t rows, const float* a_tile) {
      init(row0, rows, acc.data());
      cpu::sgemm(false, transpose_w, rows, n_out, k_in, 1.0f, a_tile, k_in, w32.data(), ldw, 1.0f,
                 acc.data(), n_out);
      parallel_for(rows, kRowGrain, [&](int64_t i0, int64_t i1, int) {
        store_row(out + (row0 + i0) * n_out, acc.data() + i0 * n_out, (i1 - i0) * n_out);
      });
    });
  }
}

// Forward. One pass over x computes h = (mask ⊙ x) @ A and writes y's rows as
// bias + scale * h @ B (each row block of x read once, from cache); the base GEMM
// then accumulates onto y. Passes: x twice (this, the GEMM), y written then updated
// by the GEMM.
template <typename T>
void forward_impl(const mx::array& x, const mx::array& w, const mx::array* bias, const mx::array& a,
                  const mx::array& b, const mx::array* key, float scale, float p, mx::array& y,
                  mx::array& h) {
  const int64_t k = x.shape(1), n = w.shape(0), r = a.shape(1);
  const Dropout d = dropout_from(p, key);
  Scratch a_t = adapter_as_float(a, 1.0f, /*transpose=*/true);  // (r, K)
  Scratch b_scaled = adapter_as_float(b, scale);                // (r, N)
  Scratch bias32(bias ? n : 0);
  if (bias) {
    load_row(bias32.data(), bias->data<T>(), n);
  }
  const T* xp = x.data<T>();
  float* hp = h.data<float>();
  auto init = [&](int64_t row0, int64_t rows, float* acc) {
    parallel_for(rows, kRowGrain, [&](int64_t i0, int64_t i1, int) {
      Scratch buf(kBlock * k);
      for (int64_t i = i0; i < i1; i += kBlock) {
        const int64_t count = std::min(kBlock, i1 - i);
        const float* xr[kBlock];
        for (int64_t q = 0; q < kBlock; ++q) {
          xr[q] = q < count ? x_row(xp, k, row0 + i + q, 0, k, d, buf.data() + q * k) : xr[0];
        }
        float* hr = hp + (row0 + i) * r;
        project_rows(xr, count, a_t.data(), k, r, hr);
        for (int64_t q = 0; q < count; ++q) {
          combine_rows(acc + (i + q) * n, hr + q * r, 1, b_scaled.data(), n, r, n,
                       bias ? bias32.data() : nullptr);
        }
      }
    });
  };
  gemm_onto(xp, w.data<T>(), /*transpose_w=*/true, x.shape(0), k, n, y.data<T>(), init);
}

// dS = scale * dY @ B^T, dB = scale * h^T @ dY: two rank-r GEMMs over dY, no mask.
template <typename T>
void low_rank_grad_impl(const mx::array& dy, const mx::array& h, const mx::array& b, float scale,
                        mx::array& ds, mx::array& db) {
  const int64_t m = dy.shape(0), n = dy.shape(1), r = h.shape(1);
  Scratch b32 = adapter_as_float(b);  // (r, N)
  Scratch db32(r * n, 0.0f);
  float* dsp = ds.data<float>();
  const float* hp = h.data<float>();
  for_each_float_tile(dy.data<T>(), m, n, [&](int64_t row0, int64_t rows, const float* tile) {
    cpu::sgemm(false, true, rows, r, n, scale, tile, n, b32.data(), n, 0.0f, dsp + row0 * r, r);
    cpu::sgemm(true, false, r, n, rows, scale, hp + row0 * r, r, tile, n, 1.0f, db32.data(), n);
  });
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
        xr[q] = q < count ? x_row(xp, k, i + q, k0, len, d, buf.data() + q * len) : xr[0];
      }
      for (int64_t j = 0; j < r; ++j) {
        float coef[kBlock];
        for (int64_t q = 0; q < kBlock; ++q) {
          coef[q] = q < count ? dsp[(i + q) * r + j] : 0.0f;
        }
        cpu::axpy_4(acc_t.data() + j * len, coef, xr, len, /*overwrite=*/false);
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

// dX = dY @ W + mask ⊙ (dS @ A^T): the masked rank-r term is written row by row
// (one write pass, mask applied while the row is in cache), then the GEMM
// accumulates onto it.
template <typename T>
void input_grad_impl(const mx::array& dy, const mx::array& w, const mx::array& ds,
                     const mx::array& a, const mx::array* key, float p, mx::array& dx) {
  const int64_t m = dy.shape(0), n = dy.shape(1), k = w.shape(1), r = a.shape(1);
  const Dropout d = dropout_from(p, key);
  Scratch a_t = adapter_as_float(a, 1.0f, /*transpose=*/true);  // (r, K)
  const float* dsp = ds.data<float>();
  auto init = [&](int64_t row0, int64_t rows, float* acc) {
    parallel_for(rows, kRowGrain, [&](int64_t i0, int64_t i1, int) {
      for (int64_t i = i0; i < i1; ++i) {
        float* row = acc + i * k;
        combine_rows(row, dsp + (row0 + i) * r, 1, a_t.data(), k, r, k, nullptr);
        if (d.active) {
          cpu::dropout_row(row, row, k, uint64_t(row0 + i) * uint64_t(k), d);
        }
      }
    });
  };
  gemm_onto(dy.data<T>(), w.data<T>(), /*transpose_w=*/false, m, n, k, dx.data<T>(), init);
}

mx::array row_contiguous(const mx::array& a, const mx::Stream& s) {
  return mx::contiguous(a, /*allow_col_major=*/false, s);
}

void check_key(const mx::array& key, float dropout) {
  require(dropout >= 0.0f && dropout < 1.0f, "dropout must be in [0, 1)");
  require(key.dtype() == mx::uint32 && key.ndim() == 1 && key.shape(0) == 2,
          "key must be a uint32 array of shape (2,), got shape " + shape_str(key));
}

// The one place that decides which optional inputs are present. The primitives
// always receive fixed slots (python/mlx_fused_lora/ops/layout.py): a 0-size bias
// slot means no bias, and the key slot (always passed) is read only when p > 0.
struct Present {
  const mx::array* bias;
  const mx::array* key;
};
Present present(const mx::array* bias_slot, const mx::array& key_slot, float dropout) {
  return {bias_slot && bias_slot->size() > 0 ? bias_slot : nullptr,
          dropout > 0.0f ? &key_slot : nullptr};
}

}  // namespace

///////////////////////////////////////////////////////////////////////////////
// Builders: validate, make inputs row-contiguous, and add the primitive.
///////////////////////////////////////////////////////////////////////////////

std::vector<mx::array> lora_forward(const mx::array& x, const mx::array& weight,
                                    const mx::array& bias, const mx::array& lora_a,
                                    const mx::array& lora_b, const mx::array& key, float scale,
                                    float dropout, mx::StreamOrDevice s) {
  require(x.ndim() == 2 && weight.ndim() == 2 && lora_a.ndim() == 2 && lora_b.ndim() == 2,
          "lora_forward takes 2-D x, weight, lora_a and lora_b");
  require(weight.shape(1) == x.shape(1),
          "weight must be (N, K) with K = x.shape[-1] = " + std::to_string(x.shape(1)) + ", got " +
              shape_str(weight));
  require(lora_a.shape(0) == x.shape(1), "lora_a must be (K, r), got " + shape_str(lora_a));
  require(lora_b.shape(0) == lora_a.shape(1) && lora_b.shape(1) == weight.shape(0),
          "lora_b must be (r, N), got " + shape_str(lora_b));
  require(is_float(x.dtype()) && x.dtype() == weight.dtype(),
          "x and weight must share a float dtype");
  require(is_float(lora_a.dtype()) && is_float(lora_b.dtype()), "adapters must be float");
  require(bias.ndim() == 1 && (bias.size() == 0 || bias.shape(0) == weight.shape(0)) &&
              bias.dtype() == x.dtype(),
          "bias must be (N,) or (0,) (no bias) in x's dtype, got " + shape_str(bias));
  check_key(key, dropout);
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs = {row_contiguous(x, stream),      row_contiguous(weight, stream),
                                   row_contiguous(bias, stream),   row_contiguous(lora_a, stream),
                                   row_contiguous(lora_b, stream), row_contiguous(key, stream)};
  const int m = x.shape(0), n = weight.shape(0), r = lora_a.shape(1);
  return mx::array::make_arrays({{m, n}, {m, r}}, {x.dtype(), mx::float32},
                                std::make_shared<LoRAForward>(stream, scale, dropout), inputs);
}

std::vector<mx::array> lora_low_rank_grad(const mx::array& cotangent, const mx::array& h,
                                          const mx::array& lora_b, float scale,
                                          mx::StreamOrDevice s) {
  require(cotangent.ndim() == 2 && h.ndim() == 2 && lora_b.ndim() == 2, "expected 2-D arrays");
  require(h.shape(0) == cotangent.shape(0) && h.shape(1) == lora_b.shape(0) &&
              lora_b.shape(1) == cotangent.shape(1),
          "cotangent (M, N), h (M, r), lora_b (r, N) disagree");
  require(h.dtype() == mx::float32 && is_float(cotangent.dtype()) && is_float(lora_b.dtype()),
          "h must be float32, cotangent and lora_b float");
  auto stream = mx::to_stream(s);
  const int m = h.shape(0), r = h.shape(1), n = lora_b.shape(1);
  return mx::array::make_arrays({{m, r}, {r, n}}, {mx::float32, lora_b.dtype()},
                                std::make_shared<LoRALowRankGrad>(stream, scale),
                                {row_contiguous(cotangent, stream), row_contiguous(h, stream),
                                 row_contiguous(lora_b, stream)});
}

mx::array lora_down_grad(const mx::array& x, const mx::array& ds, const mx::array& lora_a,
                         const mx::array& key, float dropout, mx::StreamOrDevice s) {
  require(x.ndim() == 2 && ds.ndim() == 2 && lora_a.ndim() == 2, "expected 2-D arrays");
  require(
      ds.shape(0) == x.shape(0) && lora_a.shape(0) == x.shape(1) && lora_a.shape(1) == ds.shape(1),
      "x (M, K), ds (M, r), lora_a (K, r) disagree");
  require(ds.dtype() == mx::float32 && is_float(x.dtype()) && is_float(lora_a.dtype()),
          "ds must be float32, x and lora_a float");
  check_key(key, dropout);
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs = {row_contiguous(x, stream), row_contiguous(ds, stream),
                                   row_contiguous(key, stream)};
  return mx::array(lora_a.shape(), lora_a.dtype(), std::make_shared<LoRADownGrad>(stream, dropout),
                   inputs);
}

mx::array lora_input_grad(const mx::array& cotangent, const mx::array& weight, const mx::array& ds,
                          const mx::array& lora_a, const mx::array& key, float dropout,
                          mx::StreamOrDevice s) {
  require(cotangent.ndim() == 2 && weight.ndim() == 2 && ds.ndim() == 2 && lora_a.ndim() == 2,
          "expected 2-D arrays");
  require(weight.shape(0) == cotangent.shape(1) && ds.shape(0) == cotangent.shape(0) &&
              lora_a.shape(0) == weight.shape(1) && lora_a.shape(1) == ds.shape(1),
          "cotangent (M, N), weight (N, K), ds (M, r), lora_a (K, r) disagree");
  require(is_float(cotangent.dtype()) && cotangent.dtype() == weight.dtype(),
          "cotangent and weight must share a float dtype");
  require(ds.dtype() == mx::float32 && is_float(lora_a.dtype()),
          "ds must be float32, lora_a float");
  check_key(key, dropout);
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs = {row_contiguous(cotangent, stream),
                                   row_contiguous(weight, stream), row_contiguous(ds, stream),
                                   row_contiguous(lora_a, stream), row_contiguous(key, stream)};
  const int m = cotangent.shape(0), k = weight.shape(1);
  return mx::array({m, k}, cotangent.dtype(), std::make_shared<LoRAInputGrad>(stream, dropout),
                   inputs);
}

mx::array dropout_mask(const mx::array& key, const mx::Shape& shape, float dropout, mx::Dtype dtype,
                       mx::StreamOrDevice s) {
  check_key(key, dropout);
  require(is_float(dtype), "dropout_mask dtype must be float32, float16 or bfloat16");
  auto stream = mx::to_stream(s);
  return mx::array(shape, dtype, std::make_shared<DropoutMask>(stream, dropout, shape),
                   {row_contiguous(mx::astype(key, mx::uint32, stream), stream)});
}

mx::array blas_matmul(const mx::array& a, const mx::array& b, bool transpose_b,
                      mx::StreamOrDevice s) {
  require(a.ndim() == 2 && b.ndim() == 2, "blas_matmul takes 2-D arrays");
  require(a.dtype() == b.dtype() && is_float(a.dtype()), "a and b must share a float dtype");
  const int inner = transpose_b ? b.shape(1) : b.shape(0);
  require(inner == a.shape(1), "inner dimensions disagree");
  auto stream = mx::to_stream(s);
  const int m = a.shape(0), n = transpose_b ? b.shape(0) : b.shape(1);
  return mx::array({m, n}, a.dtype(), std::make_shared<BlasMatmul>(stream, transpose_b),
                   {row_contiguous(a, stream), row_contiguous(b, stream)});
}

///////////////////////////////////////////////////////////////////////////////
// Primitives
///////////////////////////////////////////////////////////////////////////////

void LoRAForward::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.dispatch([inputs, outputs, scale = scale_, p = dropout_]() mutable {
    // inputs: x, weight, bias, lora_a, lora_b, key
    const Present in = present(&inputs[2], inputs[5], p);
    dispatch_float(inputs[0].dtype(), [&](auto tag) {
      forward_impl<decltype(tag)>(inputs[0], inputs[1], in.bias, inputs[3], inputs[4], in.key,
                                  scale, p, outputs[0], outputs[1]);
    });
  });
}

void LoRALowRankGrad::eval_cpu(const std::vector<mx::array>& inputs,
                               std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.dispatch([inputs, outputs, scale = scale_]() mutable {
    dispatch_float(inputs[0].dtype(), [&](auto tag) {
      low_rank_grad_impl<decltype(tag)>(inputs[0], inputs[1], inputs[2], scale, outputs[0],
                                        outputs[1]);
    });
  });
}

void LoRADownGrad::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.dispatch([inputs, out, p = dropout_]() mutable {
    dispatch_float(inputs[0].dtype(), [&](auto tag) {
      down_grad_impl<decltype(tag)>(inputs[0], inputs[1], present(nullptr, inputs[2], p).key, p,
                                    out);
    });
  });
}

void LoRAInputGrad::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.dispatch([inputs, out, p = dropout_]() mutable {
    dispatch_float(inputs[0].dtype(), [&](auto tag) {
      input_grad_impl<decltype(tag)>(inputs[0], inputs[1], inputs[2], inputs[3],
                                     present(nullptr, inputs[4], p).key, p, out);
    });
  });
}

void DropoutMask::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.dispatch([inputs, out, p = dropout_]() mutable {
    const Dropout d = dropout_from(p, &inputs[0]);
    const int64_t size = out.size();
    const int64_t row = out.ndim() ? std::max<int64_t>(out.shape(-1), 1) : 1;
    std::vector<float> ones(row, 1.0f), mask(size);
    parallel_for(size / row, kRowGrain, [&](int64_t i0, int64_t i1, int) {
      for (int64_t i = i0; i < i1; ++i) {
        if (d.active) {
          cpu::dropout_row(mask.data() + i * row, ones.data(), row, uint64_t(i) * uint64_t(row), d);
        } else {
          std::copy(ones.begin(), ones.end(), mask.begin() + i * row);
        }
      }
    });
    store_as(out, mask.data());
  });
}

void BlasMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.dispatch([inputs, out, transpose_b = transpose_b_]() mutable {
    const mx::array& a = inputs[0];
    const mx::array& b = inputs[1];
    const int64_t n_out = out.shape(1);
    dispatch_float(a.dtype(), [&](auto tag) {
      using T = decltype(tag);
      if constexpr (std::is_same_v<T, float>) {
        // The bare GEMM (beta = 0): the limit must not pay for anything else.
        cpu::sgemm(false, transpose_b, a.shape(0), n_out, a.shape(1), 1.0f, a.data<float>(),
                   a.shape(1), b.data<float>(), b.shape(1), 0.0f, out.data<float>(), n_out);
      } else {
        gemm_onto(a.data<T>(), b.data<T>(), transpose_b, a.shape(0), a.shape(1), n_out,
                  out.data<T>(), [&](int64_t, int64_t rows, float* acc) {
                    std::memset(acc, 0, rows * n_out * sizeof(float));
                  });
      }
    });
  });
}

#define MFL_CPU_ONLY(Class, ...) \
  void Class::eval_gpu(const std::vector<mx::array>&, __VA_ARGS__) { gpu_unsupported(#Class); }
MFL_CPU_ONLY(LoRAForward, std::vector<mx::array>&)
MFL_CPU_ONLY(LoRALowRankGrad, std::vector<mx::array>&)
MFL_CPU_ONLY(LoRADownGrad, mx::array&)
MFL_CPU_ONLY(LoRAInputGrad, mx::array&)
MFL_CPU_ONLY(DropoutMask, mx::array&)
MFL_CPU_ONLY(BlasMatmul, mx::array&)
#undef MFL_CPU_ONLY

// y is linear in x, W and bias and bilinear in (A, B), so with m the dropout
// multipliers and c = scale:
//   dh = (m*dx) @ A + (m*x) @ dA
//   dy = dx @ W^T + c (m*dx) @ A @ B  +  x @ dW^T + db  +  c ((m*x) @ dA @ B + h @ dB)
// The dx term is this op applied to dx without bias, so it reuses the same mask.
std::vector<mx::array> LoRAForward::jvp(const std::vector<mx::array>& primals,
                                        const std::vector<mx::array>& tangents,
                                        const std::vector<int>& argnums) {
  const mx::Stream s = stream();
  // primals: x, weight, bias, lora_a, lora_b, key (fixed slots)
  const mx::array& x = primals[0];
  const mx::array& w = primals[1];
  const mx::array a = mx::astype(primals[3], mx::float32, s);
  const mx::array b = mx::astype(primals[4], mx::float32, s);
  const mx::array& key = primals[5];
  mx::array x_masked = mx::astype(x, mx::float32, s);
  if (dropout_ > 0.0f) {
    x_masked = mx::multiply(x_masked, dropout_mask(key, x.shape(), dropout_, mx::float32, s), s);
  }
  mx::array dy = mx::zeros({x.shape(0), w.shape(0)}, mx::float32, s);
  mx::array dh = mx::zeros({x.shape(0), a.shape(1)}, mx::float32, s);
  for (size_t i = 0; i < argnums.size(); ++i) {
    const int arg = argnums[i];
    const mx::array t = tangents[i];
    if (arg == 0) {
      const mx::array no_bias = mx::zeros({0}, x.dtype(), s);
      auto along_x = lora_forward(t, w, no_bias, primals[3], primals[4], key, scale_, dropout_, s);
      dy = mx::add(dy, mx::astype(along_x[0], mx::float32, s), s);
      dh = mx::add(dh, along_x[1], s);
    } else if (arg == 1) {
      dy = mx::add(dy,
                   mx::matmul(mx::astype(x, mx::float32, s),
                              mx::transpose(mx::astype(t, mx::float32, s), s), s),
                   s);
    } else if (arg == 2 && t.size() > 0) {
      dy = mx::add(dy, mx::astype(t, mx::float32, s), s);
    } else if (arg == 3) {
      mx::array dh_a = mx::matmul(x_masked, mx::astype(t, mx::float32, s), s);
      dh = mx::add(dh, dh_a, s);
      dy = mx::add(dy, mx::multiply(mx::array(scale_), mx::matmul(dh_a, b, s), s), s);
    } else if (arg == 4) {
      mx::array h = mx::matmul(x_masked, a, s);
      dy = mx::add(
          dy, mx::multiply(mx::array(scale_), mx::matmul(h, mx::astype(t, mx::float32, s), s), s),
          s);
    }
  }
  return {mx::astype(dy, x.dtype(), s), dh};
}

std::vector<mx::Shape> LoRAForward::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[1].shape(0)}, {inputs[0].shape(0), inputs[3].shape(1)}};
}
std::vector<mx::Shape> LoRALowRankGrad::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[1].shape(), inputs[2].shape()};
}
std::vector<mx::Shape> LoRADownGrad::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(1), inputs[1].shape(1)}};
}
std::vector<mx::Shape> LoRAInputGrad::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[1].shape(1)}};
}
std::vector<mx::Shape> DropoutMask::output_shapes(const std::vector<mx::array>&) {
  return {shape_};
}
std::vector<mx::Shape> BlasMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), transpose_b_ ? inputs[1].shape(0) : inputs[1].shape(1)}};
}

bool LoRAForward::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const LoRAForward&>(other);
  return scale_ == o.scale_ && dropout_ == o.dropout_;
}
bool LoRALowRankGrad::is_equivalent(const mx::Primitive& other) const {
  return scale_ == static_cast<const LoRALowRankGrad&>(other).scale_;
}
bool LoRADownGrad::is_equivalent(const mx::Primitive& other) const {
  return dropout_ == static_cast<const LoRADownGrad&>(other).dropout_;
}
bool LoRAInputGrad::is_equivalent(const mx::Primitive& other) const {
  return dropout_ == static_cast<const LoRAInputGrad&>(other).dropout_;
}
bool DropoutMask::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const DropoutMask&>(other);
  return dropout_ == o.dropout_ && shape_ == o.shape_;
}
bool BlasMatmul::is_equivalent(const mx::Primitive& other) const {
  return transpose_b_ == static_cast<const BlasMatmul&>(other).transpose_b_;
}

}  // namespace mfl
