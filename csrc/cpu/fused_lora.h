// CPU primitives of the fused LoRA linear op.
//
//   y = x @ W^T + bias + scale * h @ B,   h = (mask ⊙ x) @ A
//
// with x (M, K), W (N, K), A (K, r), B (r, N) and the dropout mask recomputed from
// (key, element index) wherever it is needed (csrc/kernels/lora_dropout.h). The op's
// reverse-mode derivative is defined once, in Python (ops/fused_lora_linear.py, an
// mx.custom_function over these primitives), so they carry no vjp of their own;
// LoRAForward has the op's jvp. Nothing has a vmap yet (MLX's default raises).
// The backward is split by cotangent so that MLX evaluates only what was asked:
//
//   LoRALowRankGrad  dS = scale * dY @ B^T (M, r), dB = scale * h^T @ dY  (one pass over dY)
//   LoRADownGrad     dA = (mask ⊙ x)^T @ dS                               (one pass over x)
//   LoRAInputGrad    dX = dY @ W + mask ⊙ (dS @ A^T)                       (GEMM + epilogue)
//
// and the frozen weight's gradient is never computed here. Every input is
// row-contiguous (the builders make it so); x and W share a dtype (f32, f16, bf16),
// adapters may be any float dtype; accumulation is float32.
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace mfl {

// Returns {y (M, N) in x's dtype, h (M, r) float32}.
std::vector<mx::array> lora_forward(const mx::array& x, const mx::array& weight,
                                    const mx::array& bias, const mx::array& lora_a,
                                    const mx::array& lora_b, const mx::array& key, float scale,
                                    float dropout, mx::StreamOrDevice s = {});

// Returns {dS (M, r) float32, dB (r, N) in lora_b's dtype}.
std::vector<mx::array> lora_low_rank_grad(const mx::array& cotangent, const mx::array& h,
                                          const mx::array& lora_b, float scale,
                                          mx::StreamOrDevice s = {});

// Returns dA (K, r) in lora_a's dtype.
mx::array lora_down_grad(const mx::array& x, const mx::array& ds, const mx::array& lora_a,
                         const mx::array& key, float dropout, mx::StreamOrDevice s = {});

// Returns dX (M, K) in the cotangent's dtype.
mx::array lora_input_grad(const mx::array& cotangent, const mx::array& weight, const mx::array& ds,
                          const mx::array& lora_a, const mx::array& key, float dropout,
                          mx::StreamOrDevice s = {});

// The dropout multipliers the op applies to an x of this shape: 1/(1-p) where
// kept, 0 where dropped.
mx::array dropout_mask(const mx::array& key, const mx::Shape& shape, float dropout,
                       mx::Dtype dtype = mx::float32, mx::StreamOrDevice s = {});

// a @ b (or a @ b^T) through the extension's BLAS: the speed limit the fused op is
// measured against.
mx::array blas_matmul(const mx::array& a, const mx::array& b, bool transpose_b,
                      mx::StreamOrDevice s = {});

class LoRAForward : public mx::Primitive {
 public:
  LoRAForward(mx::Stream stream, float scale, float dropout)
      : mx::Primitive(stream), scale_(scale), dropout_(dropout) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  // Forward mode (mx.jvp) differentiates the traced graph primitive by primitive.
  std::vector<mx::array> jvp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override { return "LoRAForward"; }

 private:
  float scale_;
  float dropout_;
};

class LoRALowRankGrad : public mx::Primitive {
 public:
  LoRALowRankGrad(mx::Stream stream, float scale) : mx::Primitive(stream), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override { return "LoRALowRankGrad"; }

 private:
  float scale_;
};

class LoRADownGrad : public mx::UnaryPrimitive {
 public:
  LoRADownGrad(mx::Stream stream, float dropout) : mx::UnaryPrimitive(stream), dropout_(dropout) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override { return "LoRADownGrad"; }

 private:
  float dropout_;
};

class LoRAInputGrad : public mx::UnaryPrimitive {
 public:
  LoRAInputGrad(mx::Stream stream, float dropout) : mx::UnaryPrimitive(stream), dropout_(dropout) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override { return "LoRAInputGrad"; }

 private:
  float dropout_;
};

class DropoutMask : public mx::UnaryPrimitive {
 public:
  DropoutMask(mx::Stream stream, float dropout, mx::Shape shape)
      : mx::UnaryPrimitive(stream), dropout_(dropout), shape_(std::move(shape)) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override { return "DropoutMask"; }

 private:
  float dropout_;
  mx::Shape shape_;
};

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

}  // namespace mfl
