// The quantized base's products on the CPU: x @ W^T and dY @ W for a weight quantized
// as MLX's affine mode stores it, through the extension's BLAS, one tile of W at a time.
//
// MLX 0.32's CPU quantized_matmul runs no BLAS and does not scale with M (measured:
// 6.8 s at M = 512, K = N = 2048, 4-bit, against 0.41 s for dequantize + BLAS GEMM).
// This primitive dequantizes `tile` rows of W (tile x K float32, one buffer reused
// for every tile) and hands each tile to the BLAS, so no dequantized copy of the
// whole weight ever exists.
//
// Quantization (mx.quantize, affine): w[n, k] = scales[n, g] * q[n, k] + biases[n, g]
// with g = k / group_size, and the q of each row a little-endian bit stream of
// `bits`-bit values, least significant bits first, in uint32 words (N, K * bits / 32).
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace mfl {

// (x, weight, scales, biases) -> x @ W^T (M, N) when transpose, else x @ W (M, K)
// for x (M, N); in x's dtype, accumulated in float32.
class QuantizedBaseMatmul : public mx::UnaryPrimitive {
 public:
  QuantizedBaseMatmul(mx::Stream stream, int group_size, int bits, bool transpose)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits), transpose_(transpose) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> jvp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override { return "QuantizedBaseMatmul"; }

 private:
  int group_size_;
  int bits_;
  bool transpose_;
};

// Validates and builds the node: x (M, K) float when transpose else (M, N); weight
// (N, K * bits / 32) uint32; scales and biases (N, K / group_size), one float dtype;
// bits in 1..6 or 8 (what mx.quantize makes), K a multiple of group_size.
mx::array quantized_base_matmul(const mx::array& x, const mx::array& weight,
                                const mx::array& scales, const mx::array& biases, int group_size,
                                int bits, bool transpose, mx::StreamOrDevice s = {});

namespace cpu {

// The pass itself, on row-contiguous inputs (out allocated, of the output shape).
void quantized_base_matmul(const mx::array& x, const mx::array& weight, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits, bool transpose,
                           mx::array& out);

// Rows [row0, row0 + rows) of the dequantized weight into dst (rows x K float32).
void dequantize_rows(const mx::array& weight, const mx::array& scales, const mx::array& biases,
                     int group_size, int bits, int64_t row0, int64_t rows, float* dst);

}  // namespace cpu

}  // namespace mfl
