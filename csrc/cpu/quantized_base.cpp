// The quantized base's products (quantized_base.h): a tile of W dequantized into one
// reused float32 buffer, then a BLAS GEMM per tile; the primitive around it and its
// graph builder.
#include "cpu/quantized_base.h"

#include <bit>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <vector>

#include "cpu/checks.h"
#include "cpu/tiling.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/transforms.h"

namespace mfl {

namespace cpu {

namespace {

static_assert(std::endian::native == std::endian::little,
              "MLX's packed weights are read as a little-endian bit stream");

// Rows of W dequantized at once: 1 MiB of float32 (128 rows at K = 2048), the only
// extra memory of a float32 x. Big enough that the BLAS runs each tile at full speed.
constexpr int64_t kWeightTileElements = 1 << 18;
// Rows of a 16-bit x (or dY) widened to float32 at once, with a float32 accumulator of
// as many output rows: each at most 2 MiB. W is dequantized once per such block.
constexpr int64_t kInputBlockElements = 1 << 19;
// Rows of W per thread when dequantizing a tile.
constexpr int64_t kDequantizeGrain = 8;
// Up to this many rows of x (decode, DoRA's r rows of A^T) skip the BLAS: each thread
// dequantizes its own rows (or columns) of W and multiplies them in, one parallel pass
// in all. Measured here: OpenBLAS's threaded GEMM took ~55 ms per call for these small
// shapes when the 2 cores were shared with other processes (16 calls per product).
constexpr int64_t kDirectRows = 16;

// One row of W: out[k] = scales[k / group_size] * q[k] + biases[k / group_size], the q
// read LSB-first from the row's bytes `packed`. 4 and 8 bits (the common cases) have
// their own loops, which the compiler vectorizes.
template <typename S>
void dequantize_row(const uint8_t* packed, const S* scales, const S* biases, int64_t k,
                    int group_size, int bits, float* out) {
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t g = 0, k0 = 0; k0 < k; ++g, k0 += group_size) {
    const float s = static_cast<float>(scales[g]);
    const float b = static_cast<float>(biases[g]);
    float* o = out + k0;
    if (bits == 8) {
      const uint8_t* p = packed + k0;
      for (int j = 0; j < group_size; ++j) {
        o[j] = s * static_cast<float>(p[j]) + b;
      }
    } else if (bits == 4) {
      const uint8_t* p = packed + k0 / 2;
      for (int j = 0; j < group_size / 2; ++j) {
        o[2 * j] = s * static_cast<float>(p[j] & 15u) + b;
        o[2 * j + 1] = s * static_cast<float>(p[j] >> 4) + b;
      }
    } else {
      for (int j = 0; j < group_size; ++j) {
        const int64_t bit = (k0 + j) * bits;
        const int shift = static_cast<int>(bit & 7);
        uint32_t v = packed[bit >> 3];
        if (shift + bits > 8) {  // the value runs into the next byte (bits <= 8: never a third)
          v |= static_cast<uint32_t>(packed[(bit >> 3) + 1]) << 8;
        }
        o[j] = s * static_cast<float>((v >> shift) & mask) + b;
      }
    }
  }
}

// sum_k a[k] * b[k], in 8 independent partial sums so the compiler vectorizes it.
inline float dot(const float* a, const float* b, int64_t k) {
  float part[8] = {};
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    for (int l = 0; l < 8; ++l) {
      part[l] += a[i + l] * b[i + l];
    }
  }
  float sum = 0.0f;
  for (; i < k; ++i) {
    sum += a[i] * b[i];
  }
  for (int l = 0; l < 8; ++l) {
    sum += part[l];
  }
  return sum;
}

struct Quantized {
  const mx::array& weight;
  const mx::array& scales;
  const mx::array& biases;
  int group_size;
  int bits;
  int64_t n() const { return weight.shape(0); }
  int64_t k() const { return int64_t(weight.shape(1)) * 32 / bits; }
};

// c (rows x out_cols, leading dim ldc) = x32 (rows x in_cols, leading dim ldx) @ op(W),
// op(W) = W^T (transpose: in_cols = K, out_cols = N) or W (in_cols = N, out_cols = K).
// W comes `tile` rows at a time through w_tile. x @ W^T: each tile is a column block
// of c. dY @ W: each tile adds its share of the sum over N onto c (beta = 1).
void product(const Quantized& q, bool transpose, const float* x32, int64_t rows, int64_t ldx,
             float* c, int64_t ldc, int64_t tile, float* w_tile) {
  const int64_t n = q.n(), k = q.k();
  if (!transpose && n == 0) {  // an empty sum
    for (int64_t i = 0; i < rows; ++i) {
      std::fill(c + i * ldc, c + i * ldc + k, 0.0f);
    }
    return;
  }
  for (int64_t n0 = 0; n0 < n; n0 += tile) {
    const int64_t nt = std::min(tile, n - n0);
    dequantize_rows(q.weight, q.scales, q.biases, q.group_size, q.bits, n0, nt, w_tile);
    if (transpose) {
      sgemm(false, true, rows, nt, k, 1.0f, x32, ldx, w_tile, std::max<int64_t>(k, 1), 0.0f, c + n0,
            ldc);
    } else {
      sgemm(false, false, rows, k, nt, 1.0f, x32 + n0, ldx, w_tile, k, n0 == 0 ? 0.0f : 1.0f, c,
            ldc);
    }
  }
}

// c (rows x out_cols) = x32 (rows x in_cols) @ op(W) for a few rows, without the BLAS.
// x @ W^T: each thread takes rows of W, dequantizes one at a time and dots it with the
// rows of x. dY @ W: each thread takes groups of columns of W and adds dY[:, n] times
// that slice of row n for every n. Extra memory: one row (or slice) of W per thread.
template <typename S>
void direct_product(const Quantized& q, bool transpose, const float* x32, int64_t rows, float* c) {
  const int64_t n = q.n(), k = q.k(), gs = q.group_size, groups = k / gs;
  const int64_t row_bytes = int64_t(q.weight.shape(1)) * 4;
  const auto* packed = reinterpret_cast<const uint8_t*>(q.weight.data<uint32_t>());
  const S* sc = q.scales.data<S>();
  const S* bi = q.biases.data<S>();
  if (transpose) {
    parallel_for(n, kDequantizeGrain, [&](int64_t n0, int64_t n1, int) {
      std::vector<float> w_row(k);
      for (int64_t j = n0; j < n1; ++j) {
        dequantize_row(packed + j * row_bytes, sc + j * groups, bi + j * groups, k, q.group_size,
                       q.bits, w_row.data());
        for (int64_t i = 0; i < rows; ++i) {
          c[i * n + j] = dot(x32 + i * k, w_row.data(), k);
        }
      }
    });
    return;
  }
  // Column slices start on a group, so on a byte of the packed row (group_size * bits
  // is a multiple of 32 bits).
  parallel_for(groups, std::max<int64_t>(1, 256 / gs), [&](int64_t g0, int64_t g1, int) {
    const int64_t k0 = g0 * gs, width = (g1 - g0) * gs;
    std::vector<float> w_slice(width);
    for (int64_t i = 0; i < rows; ++i) {
      std::fill(c + i * k + k0, c + i * k + k0 + width, 0.0f);
    }
    for (int64_t j = 0; j < n; ++j) {
      dequantize_row(packed + j * row_bytes + k0 * q.bits / 8, sc + j * groups + g0,
                     bi + j * groups + g0, width, q.group_size, q.bits, w_slice.data());
      for (int64_t i = 0; i < rows; ++i) {
        const float d = x32[i * n + j];
        float* ci = c + i * k + k0;
        for (int64_t l = 0; l < width; ++l) {
          ci[l] += d * w_slice[l];
        }
      }
    }
  });
}

// The product by whichever path suits the number of rows (see kDirectRows); x32 and
// c dense (leading dims in_cols and out_cols).
void multiply(const Quantized& q, bool transpose, const float* x32, int64_t rows, float* c,
              int64_t tile, float* w_tile) {
  const int64_t in_cols = transpose ? q.k() : q.n(), out_cols = transpose ? q.n() : q.k();
  if (rows <= kDirectRows) {
    dispatch_float(q.scales.dtype(),
                   [&](auto tag) { direct_product<decltype(tag)>(q, transpose, x32, rows, c); });
  } else {
    product(q, transpose, x32, rows, std::max<int64_t>(in_cols, 1), c, out_cols, tile, w_tile);
  }
}

}  // namespace

void dequantize_rows(const mx::array& weight, const mx::array& scales, const mx::array& biases,
                     int group_size, int bits, int64_t row0, int64_t rows, float* dst) {
  const int64_t k = int64_t(weight.shape(1)) * 32 / bits;
  const int64_t groups = k / group_size;
  const int64_t row_bytes = int64_t(weight.shape(1)) * 4;
  const auto* packed = reinterpret_cast<const uint8_t*>(weight.data<uint32_t>());
  dispatch_float(scales.dtype(), [&](auto tag) {
    using S = decltype(tag);
    const S* s = scales.data<S>();
    const S* b = biases.data<S>();
    parallel_for(rows, kDequantizeGrain, [&](int64_t i0, int64_t i1, int) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = row0 + i;
        dequantize_row(packed + n * row_bytes, s + n * groups, b + n * groups, k, group_size, bits,
                       dst + i * k);
      }
    });
  });
}

void quantized_base_matmul(const mx::array& x, const mx::array& weight, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits, bool transpose,
                           mx::array& out) {
  if (out.size() == 0) {
    return;
  }
  const Quantized q{weight, scales, biases, group_size, bits};
  const int64_t m = x.shape(0), in_cols = x.shape(1), out_cols = out.shape(1);
  const int64_t tile =
      std::max<int64_t>(1, std::min(q.n(), kWeightTileElements / std::max<int64_t>(q.k(), 1)));
  Scratch w_tile(m <= kDirectRows ? 0 : tile * q.k());
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* xs = x.data<T>();
    T* ys = out.data<T>();
    if constexpr (std::is_same_v<T, float>) {
      // Straight from x into out: the tile is the only temporary.
      multiply(q, transpose, xs, m, ys, tile, w_tile.data());
    } else {
      // No half-precision GEMM in the BLAS: a block of rows is widened, multiplied into
      // a float32 accumulator and narrowed into out.
      const int64_t block = std::max<int64_t>(
          1, std::min(m, kInputBlockElements / std::max<int64_t>({in_cols, out_cols, 1})));
      Scratch x32(block * in_cols);
      Scratch acc(block * out_cols);
      for (int64_t r0 = 0; r0 < m; r0 += block) {
        const int64_t rows = std::min(block, m - r0);
        parallel_for(rows, kRowGrain, [&](int64_t i0, int64_t i1, int) {
          load_row(x32.data() + i0 * in_cols, xs + (r0 + i0) * in_cols, (i1 - i0) * in_cols);
        });
        multiply(q, transpose, x32.data(), rows, acc.data(), tile, w_tile.data());
        parallel_for(rows, kRowGrain, [&](int64_t i0, int64_t i1, int) {
          store_row(ys + (r0 + i0) * out_cols, acc.data() + i0 * out_cols, (i1 - i0) * out_cols);
        });
      }
    }
  });
}

}  // namespace cpu

namespace {

using checks::shape_str;

void require(bool ok, const std::string& msg) {
  checks::require(ok, "quantized_base_matmul: " + msg);
}

}  // namespace

mx::array quantized_base_matmul(const mx::array& x, const mx::array& weight,
                                const mx::array& scales, const mx::array& biases, int group_size,
                                int bits, bool transpose, mx::StreamOrDevice s) {
  require((bits >= 1 && bits <= 6) || bits == 8,
          "bits must be 1, 2, 3, 4, 5, 6 or 8 (MLX's affine quantization), got " +
              std::to_string(bits));
  require(group_size > 0 && group_size % 32 == 0,
          "group_size must be a positive multiple of 32 (MLX's are 32, 64 and 128), got " +
              std::to_string(group_size));
  require(x.ndim() == 2 && cpu::is_float(x.dtype()),
          "x must be a 2-D float32, float16 or bfloat16 array, got shape " + shape_str(x));
  require(weight.ndim() == 2 && weight.dtype() == mx::uint32,
          "weight must be a 2-D uint32 array (N, K * bits / 32), got shape " + shape_str(weight));
  const int n = weight.shape(0);
  const int k = int(int64_t(weight.shape(1)) * 32 / bits);
  require(int64_t(weight.shape(1)) * 32 % bits == 0 && k % group_size == 0,
          "weight " + shape_str(weight) + " holds no whole groups of " +
              std::to_string(group_size) + " " + std::to_string(bits) + "-bit values per row");
  for (const mx::array* a : {&scales, &biases}) {
    require(a->ndim() == 2 && a->shape(0) == n && a->shape(1) == k / group_size &&
                cpu::is_float(a->dtype()) && a->dtype() == scales.dtype(),
            "scales and biases must be (N, K / group_size) = (" + std::to_string(n) + ", " +
                std::to_string(k / group_size) + ") in one float dtype, got " + shape_str(*a));
  }
  const int inner = transpose ? k : n;
  require(x.shape(1) == inner, std::string("x must be (M, ") + (transpose ? "K" : "N") +
                                   ") = (M, " + std::to_string(inner) + "), got " + shape_str(x));
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs;
  for (const mx::array& a : {x, weight, scales, biases}) {
    inputs.push_back(mx::contiguous(a, /*allow_col_major=*/false, stream));
  }
  return mx::array({x.shape(0), transpose ? n : k}, x.dtype(),
                   std::make_shared<QuantizedBaseMatmul>(stream, group_size, bits, transpose),
                   std::move(inputs));
}

void QuantizedBaseMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  mx::cpu::get_command_encoder(stream()).dispatch(
      [inputs, out, g = group_size_, b = bits_, t = transpose_]() mutable {
        cpu::quantized_base_matmul(inputs[0], inputs[1], inputs[2], inputs[3], g, b, t, out);
      });
}

void QuantizedBaseMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[mlx_fused_lora] QuantizedBaseMatmul is a CPU primitive; on a GPU the op uses MLX's "
      "quantized_matmul.");
}

// The product is linear in x, in the scales and in the biases: along the scales it is
// the same product with the tangent as scales and zero biases, and the other way round.
// The packed integers have no derivative (zeros, as MLX's quantized_matmul gives none).
std::vector<mx::array> QuantizedBaseMatmul::jvp(const std::vector<mx::array>& primals,
                                                const std::vector<mx::array>& tangents,
                                                const std::vector<int>& argnums) {
  const mx::array &x = primals[0], &w = primals[1], &sc = primals[2], &bi = primals[3];
  const auto& s = stream();
  auto along = [&](const mx::array& xt, const mx::array& st, const mx::array& bt) {
    return quantized_base_matmul(xt, w, st, bt, group_size_, bits_, transpose_, s);
  };
  mx::array total = mx::zeros(output_shapes(primals)[0], x.dtype(), s);
  for (size_t i = 0; i < argnums.size(); ++i) {
    const mx::array& t = tangents[i];
    if (argnums[i] == 0) {
      total = mx::add(total, along(t, sc, bi), s);
    } else if (argnums[i] == 2) {
      total = mx::add(total, along(x, mx::astype(t, sc.dtype(), s), mx::zeros_like(bi, s)), s);
    } else if (argnums[i] == 3) {
      total = mx::add(total, along(x, mx::zeros_like(sc, s), mx::astype(t, bi.dtype(), s)), s);
    }
  }
  return {total};
}

// x's cotangent is the other product (dY @ W for x @ W^T and back); the scales' and
// biases' are MLX's quantized_matmul's (the same function of them); the packed weight
// gets zeros.
std::vector<mx::array> QuantizedBaseMatmul::vjp(const std::vector<mx::array>& primals,
                                                const std::vector<mx::array>& cotangents,
                                                const std::vector<int>& argnums,
                                                const std::vector<mx::array>&) {
  const mx::array &x = primals[0], &w = primals[1];
  const auto& s = stream();
  const mx::array& dy = cotangents[0];
  std::vector<mx::array> out;
  for (int arg : argnums) {
    if (arg == 0) {
      out.push_back(quantized_base_matmul(mx::astype(dy, x.dtype(), s), w, primals[2], primals[3],
                                          group_size_, bits_, !transpose_, s));
    } else if (arg == 1) {
      out.push_back(mx::zeros_like(w, s));
    } else if (x.size() == 0 || w.size() == 0) {
      // An empty product's scales and biases have zero gradient (MLX's quantized_matmul
      // would divide by zero on an empty dimension).
      out.push_back(mx::zeros_like(primals[arg], s));
    } else {
      const std::function<std::vector<mx::array>(const std::vector<mx::array>&)> product =
          [&](const std::vector<mx::array>& sb) {
            return std::vector<mx::array>{mx::quantized_matmul(x, w, sb[0], sb[1], transpose_,
                                                               group_size_, bits_, "affine", s)};
          };
      const std::vector<mx::array> scales_biases{primals[2], primals[3]}, dys{dy};
      auto grads = mx::vjp(product, scales_biases, dys).second;
      out.push_back(grads[arg - 2]);
    }
  }
  return out;
}

std::vector<mx::Shape> QuantizedBaseMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  const int k = int(int64_t(inputs[1].shape(1)) * 32 / bits_);
  return {{inputs[0].shape(0), transpose_ ? inputs[1].shape(0) : k}};
}

bool QuantizedBaseMatmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantizedBaseMatmul&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_ && transpose_ == o.transpose_;
}

}  // namespace mfl
