// Test and benchmark hooks (testing.h): the hash, the row kernel, the bare GEMM.
#include "cpu/testing.h"

#include <cstring>
#include <stdexcept>

#include "cpu/row_kernels.h"
#include "cpu/tiling.h"
#include "kernels/lora_dropout.h"
#include "mlx/backend/cpu/encoder.h"

namespace mfl::testing {

std::vector<uint32_t> dropout_bits(uint32_t key0, uint32_t key1, uint64_t index0, int64_t count) {
  std::vector<uint32_t> bits(std::max<int64_t>(count, 0));
  for (size_t i = 0; i < bits.size(); ++i) {
    const uint64_t index = index0 + uint64_t(i);
    bits[i] = mfl_dropout_bits(key0, key1, uint32_t(index), uint32_t(index >> 32));
  }
  return bits;
}

std::vector<float> dropout_row(uint32_t key0, uint32_t key1, float p, uint64_t index0,
                               int64_t count) {
  const uint32_t key[2] = {key0, key1};
  const cpu::Dropout d = cpu::make_dropout(p, key);
  const size_t n = std::max<int64_t>(count, 0);
  std::vector<float> ones(n, 1.0f), out(n);
  cpu::dropout_row(out.data(), ones.data(), n, index0, d);
  return out;
}

mx::array blas_matmul(const mx::array& a, const mx::array& b, bool transpose_b,
                      mx::StreamOrDevice s) {
  if (a.ndim() != 2 || b.ndim() != 2 || a.dtype() != b.dtype() || !cpu::is_float(a.dtype()) ||
      (transpose_b ? b.shape(1) : b.shape(0)) != a.shape(1)) {
    throw std::invalid_argument(
        "[mlx_fused_lora] blas_matmul takes 2-D float a, b of one dtype with matching inner "
        "dimensions");
  }
  auto stream = mx::to_stream(s);
  const int m = a.shape(0), n = transpose_b ? b.shape(0) : b.shape(1);
  return mx::array({m, n}, a.dtype(), std::make_shared<BlasMatmul>(stream, transpose_b),
                   {mx::contiguous(a, false, stream), mx::contiguous(b, false, stream)});
}

void BlasMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.dispatch([inputs, out, transpose_b = transpose_b_]() mutable {
    const mx::array& a = inputs[0];
    const mx::array& b = inputs[1];
    const int64_t n_out = out.shape(1);
    cpu::dispatch_float(a.dtype(), [&](auto tag) {
      using T = decltype(tag);
      if constexpr (std::is_same_v<T, float>) {
        // The bare GEMM (beta = 0): the limit must not pay for anything else.
        cpu::sgemm(false, transpose_b, a.shape(0), n_out, a.shape(1), 1.0f, a.data<float>(),
                   std::max(a.shape(1), 1), b.data<float>(), std::max(b.shape(1), 1), 0.0f,
                   out.data<float>(), n_out);
      } else {
        cpu::gemm_onto(a.data<T>(), b.data<T>(), transpose_b, a.shape(0), a.shape(1), n_out,
                       out.data<T>(), [&](int64_t, int64_t rows, float* acc) {
                         std::memset(acc, 0, rows * n_out * sizeof(float));
                       });
      }
    });
  });
}

void BlasMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[mlx_fused_lora] BlasMatmul is a CPU primitive.");
}

std::vector<mx::Shape> BlasMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), transpose_b_ ? inputs[1].shape(0) : inputs[1].shape(1)}};
}

bool BlasMatmul::is_equivalent(const mx::Primitive& other) const {
  return transpose_b_ == static_cast<const BlasMatmul&>(other).transpose_b_;
}

}  // namespace mfl::testing
