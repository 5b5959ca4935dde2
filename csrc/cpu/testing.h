// Hooks for the tests and benchmarks only (bound as mlx_fused_lora._ext.testing):
// the raw dropout hash, the CPU row kernel's multipliers, and the bare BLAS GEMM
// the fused op is measured against. Not part of the op.
#pragma once

#include <cstdint>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace mfl::testing {

// The raw hash for flat indices [index0, index0 + count).
std::vector<uint32_t> dropout_bits(uint32_t key0, uint32_t key1, uint64_t index0, int64_t count);

// The CPU row kernel's multipliers for flat indices [index0, index0 + count).
std::vector<float> dropout_row(uint32_t key0, uint32_t key1, float p, uint64_t index0,
                               int64_t count);

// a @ b (or a @ b^T) through the extension's BLAS: the speed limit the fused op is
// measured against.
mx::array blas_matmul(const mx::array& a, const mx::array& b, bool transpose_b,
                      mx::StreamOrDevice s = {});

class BlasMatmul : public mx::UnaryPrimitive {
 public:
  BlasMatmul(mx::Stream stream, bool transpose_b)
      : mx::UnaryPrimitive(stream), transpose_b_(transpose_b) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override { return "BlasMatmul"; }

 private:
  bool transpose_b_;
};

}  // namespace mfl::testing
