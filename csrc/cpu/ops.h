// Builders of the fused op's graph nodes, the extension's C++ API: each validates
// its inputs, makes them row-contiguous and adds one primitive (primitives.h).
// Slots are fixed (python/mlx_fused_lora/ops/layout.py): `bias` is (N,) or (0,) for
// none, `key` is always a uint32 (2,) array, read only when dropout > 0.
//
// Adapters are lora_a (K, r) and lora_b (r, N), one adapter, or stacked, (n, K, r) and
// (n, r, N). The mixed op passes `scales` ((n,) float32: adapter i's multiplier is
// scale * scales[i]) and `adapter_ids` ((M,) int32 in [-1, n), -1: base only) together;
// without them (the single-adapter op) n must be 1 and every row uses adapter 0. An id
// out of range is reported when the node is evaluated (csrc/cpu/adapter_rows.h).
#pragma once

#include <optional>

#include "mlx/ops.h"

namespace mx = mlx::core;

namespace mfl {

using OptionalArray = std::optional<mx::array>;

// Returns {y (M, N) in x's dtype, h (M, r) float32}: y = x @ W^T + bias + c_id * h @ B_id.
std::vector<mx::array> lora_forward(const mx::array& x, const mx::array& weight,
                                    const mx::array& bias, const mx::array& lora_a,
                                    const mx::array& lora_b, const mx::array& key,
                                    const OptionalArray& scales, const OptionalArray& adapter_ids,
                                    float scale, float dropout, mx::StreamOrDevice s = {});

// The same onto a given base product `base` (M, N) in x's dtype: y = base + bias + c_id * h @ B_id.
std::vector<mx::array> lora_forward_onto(const mx::array& x, const mx::array& base,
                                         const mx::array& bias, const mx::array& lora_a,
                                         const mx::array& lora_b, const mx::array& key,
                                         const OptionalArray& scales,
                                         const OptionalArray& adapter_ids, float scale,
                                         float dropout, mx::StreamOrDevice s = {});

// Returns {dS (M, r) float32, dB in lora_b's shape and dtype}.
std::vector<mx::array> lora_low_rank_grad(const mx::array& cotangent, const mx::array& h,
                                          const mx::array& lora_b, const OptionalArray& scales,
                                          const OptionalArray& adapter_ids, float scale,
                                          mx::StreamOrDevice s = {});

// Returns dA in lora_a's shape and dtype.
mx::array lora_down_grad(const mx::array& x, const mx::array& ds, const mx::array& lora_a,
                         const mx::array& key, const OptionalArray& adapter_ids, float dropout,
                         mx::StreamOrDevice s = {});

// Returns dX = dY @ W + mask ⊙ (dS @ A_id^T), (M, K) in the cotangent's dtype.
mx::array lora_input_grad(const mx::array& cotangent, const mx::array& weight, const mx::array& ds,
                          const mx::array& lora_a, const mx::array& key,
                          const OptionalArray& adapter_ids, float dropout,
                          mx::StreamOrDevice s = {});

// Returns dX = base + mask ⊙ (dS @ A_id^T) for the base's own dY @ W `base` (M, K).
mx::array lora_input_grad_onto(const mx::array& base, const mx::array& ds, const mx::array& lora_a,
                               const mx::array& key, const OptionalArray& adapter_ids,
                               float dropout, mx::StreamOrDevice s = {});

// The dropout multipliers the op applies to an x of this shape: 1/(1-p) where
// kept, 0 where dropped.
mx::array dropout_mask(const mx::array& key, const mx::Shape& shape, float dropout,
                       mx::Dtype dtype = mx::float32, mx::StreamOrDevice s = {});

}  // namespace mfl
