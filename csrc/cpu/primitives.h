// CPU primitives of the fused LoRA linear op, laid out like MLX's extension example
// (examples/extensions/axpby): a Primitive per graph node, its builder in ops.h.
//
//   y = base(x) + bias + c_id * h @ B_id,   h = (mask ⊙ x) @ A_id
//
// with x (M, K), W (N, K), adapters A (K, r), B (r, N) or n of them stacked, each row
// on its adapter id (the mixed op's extra slots, scales and adapter_ids, appended to
// the inputs; without them n = 1 and c = scale: the single-adapter op, same code), and
// the dropout mask recomputed from (key, element index) wherever it is needed
// (csrc/kernels/lora_dropout.h). The
// op's reverse-mode derivative is defined once, in Python (an mx.custom_function
// over these primitives, python/mlx_fused_lora/ops/backends/cpu.py), so they carry
// no vjp; the forwards have the op's jvp. The backward is split by cotangent so
// MLX evaluates only what was asked:
//
//   LoRALowRankGrad    dS = c * dY @ B^T (M, r), dB = c * h^T @ dY (dY twice, no mask)
//   LoRADownGrad       dA = (mask ⊙ x)^T @ dS                       (one pass over x)
//   LoRAInputGrad      dX = dY @ W + mask ⊙ (dS @ A^T)               (GEMM + epilogue)
//
// and the frozen weight's gradient is never computed here. The *Onto forms take the
// base product as an input instead of W (MLX's quantized matmul computes it), so a
// quantized base runs the same rank-r passes and mask. Inputs sit in fixed slots
// (python/mlx_fused_lora/ops/layout.py): the bias slot is 0-size when there is no
// bias, the key slot is always there and read only when p > 0.
#pragma once

#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace mfl {

// (x, weight, bias, lora_a, lora_b, key[, scales, adapter_ids])
//   -> (y (M, N) in x's dtype, h (M, r) float32)
class LoRAForward : public mx::Primitive {
 public:
  LoRAForward(mx::Stream stream, float scale, float dropout)
      : mx::Primitive(stream), scale_(scale), dropout_(dropout) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
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

// (x, base (M, N), bias, lora_a, lora_b, key[, scales, adapter_ids]) -> (y = base + bias + c * h @
// B, h)
class LoRAForwardOnto : public mx::Primitive {
 public:
  LoRAForwardOnto(mx::Stream stream, float scale, float dropout)
      : mx::Primitive(stream), scale_(scale), dropout_(dropout) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> jvp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override { return "LoRAForwardOnto"; }

 private:
  float scale_;
  float dropout_;
};

// (cotangent (M, N), h (M, r), lora_b[, scales, adapter_ids])
//   -> (dS (M, r) float32, dB in lora_b's shape and dtype)
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

// (x, ds, key[, adapter_ids]) -> dA in lora_a's shape (given) and dtype
class LoRADownGrad : public mx::UnaryPrimitive {
 public:
  LoRADownGrad(mx::Stream stream, float dropout, mx::Shape shape)
      : mx::UnaryPrimitive(stream), dropout_(dropout), shape_(std::move(shape)) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override { return "LoRADownGrad"; }

 private:
  float dropout_;
  mx::Shape shape_;
};

// (cotangent, weight, ds, lora_a, key[, adapter_ids]) -> dX (M, K) in the cotangent's dtype
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

// (base (M, K), ds, lora_a, key[, adapter_ids]) -> dX = base + mask ⊙ (dS @ A^T) in base's dtype
class LoRAInputGradOnto : public mx::UnaryPrimitive {
 public:
  LoRAInputGradOnto(mx::Stream stream, float dropout)
      : mx::UnaryPrimitive(stream), dropout_(dropout) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override { return "LoRAInputGradOnto"; }

 private:
  float dropout_;
};

// (key) -> the dropout multipliers for an x of `shape`
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

}  // namespace mfl
