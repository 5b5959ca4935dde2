// Builders of the fused op's graph nodes (ops.h): validate, make the inputs
// row-contiguous, add the primitive.
#include "cpu/ops.h"

#include <cmath>
#include <sstream>
#include <stdexcept>

#include "cpu/checks.h"
#include "cpu/primitives.h"
#include "cpu/tiling.h"

namespace mfl {

namespace {

using checks::require;
using checks::shape_str;
using cpu::is_float;

void require_2d(std::initializer_list<const mx::array*> arrays) {
  for (const mx::array* a : arrays) {
    require(a->ndim() == 2, "expected 2-D arrays, got shape " + shape_str(*a));
  }
}

void check_dropout_and_key(const mx::array& key, float dropout) {
  std::ostringstream p;
  p << dropout;
  require(dropout >= 0.0f && dropout < 1.0f, "dropout must be in [0, 1), got " + p.str());
  require(key.dtype() == mx::uint32 && key.ndim() == 1 && key.shape(0) == 2,
          "key must be a uint32 array of shape (2,), got shape " + shape_str(key));
}

void check_scale(float scale) { require(std::isfinite(scale), "scale must be finite in float32"); }

// One adapter, (K, r) / (r, N), or n stacked, (n, K, r) / (n, r, N): the last two dims.
int dim(const mx::array& a, int i) { return a.shape(a.ndim() - 2 + i); }
int count(const mx::array& a) { return a.ndim() == 3 ? a.shape(0) : 1; }

void check_adapter_ndim(const mx::array& a, const char* name) {
  require(a.ndim() == 2 || a.ndim() == 3,
          std::string(name) + " must be 2-D (one adapter) or 3-D (n stacked), got shape " +
              shape_str(a));
  require(is_float(a.dtype()), std::string(name) + " must be float");
}

// Without ids every row is on adapter 0, so n must be 1; with them, (M,) int32.
void check_ids(const OptionalArray& ids, int n, int m) {
  if (!ids) {
    require(n == 1, "stacked adapters (n = " + std::to_string(n) + ") need adapter_ids");
    return;
  }
  require(ids->dtype() == mx::int32 && ids->ndim() == 1 && ids->shape(0) == m,
          "adapter_ids must be int32 of shape (M,) = (" + std::to_string(m) + ",), got shape " +
              shape_str(*ids));
}

// The mixed op gives scales ((n,) float) and ids together; the single-adapter op neither.
void check_routing(const OptionalArray& scales, const OptionalArray& ids, int n, int m) {
  require(scales.has_value() == ids.has_value(),
          "scales and adapter_ids are given together (the mixed op) or not at all");
  check_ids(ids, n, m);
  require(!scales || (scales->ndim() == 1 && scales->shape(0) == n && is_float(scales->dtype())),
          "scales must be float of shape (n,) = (" + std::to_string(n) + ",)");
}

// x (M, K), bias (N,) or (0,) in x's dtype, lora_a (K, r >= 1), lora_b (r, N) (or stacked).
void check_lora_inputs(const mx::array& x, int n, const mx::array& bias, const mx::array& lora_a,
                       const mx::array& lora_b, const OptionalArray& scales,
                       const OptionalArray& ids) {
  require_2d({&x});
  require(is_float(x.dtype()), "x must be float32, float16 or bfloat16");
  check_adapter_ndim(lora_a, "lora_a");
  check_adapter_ndim(lora_b, "lora_b");
  require(dim(lora_a, 0) == x.shape(1) && dim(lora_a, 1) >= 1,
          "lora_a must be (K, r) or (n, K, r) with K = " + std::to_string(x.shape(1)) +
              " and r >= 1, got " + shape_str(lora_a));
  require(lora_b.ndim() == lora_a.ndim() && count(lora_b) == count(lora_a) &&
              dim(lora_b, 0) == dim(lora_a, 1) && dim(lora_b, 1) == n,
          "lora_b must be (r, N) or (n, r, N) as lora_a is stacked, got " + shape_str(lora_b));
  require(bias.ndim() == 1 && (bias.size() == 0 || bias.shape(0) == n) && bias.dtype() == x.dtype(),
          "bias must be (N,) or (0,) (no bias) in x's dtype, got " + shape_str(bias));
  check_routing(scales, ids, count(lora_a), x.shape(0));
}

mx::array row_contiguous(const mx::array& a, const mx::Stream& s) {
  return mx::contiguous(a, /*allow_col_major=*/false, s);
}

// The inputs, row-contiguous, with the routing slots appended when present (scales as
// float32): the primitives know the mixed op by its input count.
std::vector<mx::array> slots(std::initializer_list<mx::array> arrays, const OptionalArray& scales,
                             const OptionalArray& ids, const mx::Stream& s) {
  std::vector<mx::array> out;
  for (const mx::array& a : arrays) {
    out.push_back(row_contiguous(a, s));
  }
  if (scales) {
    out.push_back(row_contiguous(mx::astype(*scales, mx::float32, s), s));
  }
  if (ids) {
    out.push_back(row_contiguous(*ids, s));
  }
  return out;
}

}  // namespace

std::vector<mx::array> lora_forward(const mx::array& x, const mx::array& weight,
                                    const mx::array& bias, const mx::array& lora_a,
                                    const mx::array& lora_b, const mx::array& key,
                                    const OptionalArray& scales, const OptionalArray& adapter_ids,
                                    float scale, float dropout, mx::StreamOrDevice s) {
  require_2d({&weight});
  check_lora_inputs(x, weight.shape(0), bias, lora_a, lora_b, scales, adapter_ids);
  require(weight.shape(1) == x.shape(1),
          "weight must be (N, K) with K = x.shape[-1] = " + std::to_string(x.shape(1)) + ", got " +
              shape_str(weight));
  require(x.dtype() == weight.dtype(), "x and weight must share a float dtype");
  check_scale(scale);
  check_dropout_and_key(key, dropout);
  auto stream = mx::to_stream(s);
  const int m = x.shape(0), n = weight.shape(0), r = dim(lora_a, 1);
  return mx::array::make_arrays(
      {{m, n}, {m, r}}, {x.dtype(), mx::float32},
      std::make_shared<LoRAForward>(stream, scale, dropout),
      slots({x, weight, bias, lora_a, lora_b, key}, scales, adapter_ids, stream));
}

std::vector<mx::array> lora_forward_onto(const mx::array& x, const mx::array& base,
                                         const mx::array& bias, const mx::array& lora_a,
                                         const mx::array& lora_b, const mx::array& key,
                                         const OptionalArray& scales,
                                         const OptionalArray& adapter_ids, float scale,
                                         float dropout, mx::StreamOrDevice s) {
  require_2d({&base});
  check_lora_inputs(x, base.shape(1), bias, lora_a, lora_b, scales, adapter_ids);
  require(base.shape(0) == x.shape(0) && base.dtype() == x.dtype(),
          "base must be (M, N) with M = x.shape[0] = " + std::to_string(x.shape(0)) +
              " in x's dtype, got " + shape_str(base));
  check_scale(scale);
  check_dropout_and_key(key, dropout);
  auto stream = mx::to_stream(s);
  const int m = x.shape(0), n = base.shape(1), r = dim(lora_a, 1);
  return mx::array::make_arrays(
      {{m, n}, {m, r}}, {x.dtype(), mx::float32},
      std::make_shared<LoRAForwardOnto>(stream, scale, dropout),
      slots({x, base, bias, lora_a, lora_b, key}, scales, adapter_ids, stream));
}

std::vector<mx::array> lora_low_rank_grad(const mx::array& cotangent, const mx::array& h,
                                          const mx::array& lora_b, const OptionalArray& scales,
                                          const OptionalArray& adapter_ids, float scale,
                                          mx::StreamOrDevice s) {
  require_2d({&cotangent, &h});
  check_adapter_ndim(lora_b, "lora_b");
  require(h.shape(0) == cotangent.shape(0) && h.shape(1) == dim(lora_b, 0) &&
              dim(lora_b, 1) == cotangent.shape(1),
          "cotangent (M, N), h (M, r), lora_b (r, N) or (n, r, N) disagree");
  require(h.dtype() == mx::float32 && is_float(cotangent.dtype()),
          "h must be float32, cotangent float");
  check_routing(scales, adapter_ids, count(lora_b), h.shape(0));
  check_scale(scale);
  auto stream = mx::to_stream(s);
  const int m = h.shape(0), r = h.shape(1);
  return mx::array::make_arrays({{m, r}, lora_b.shape()}, {mx::float32, lora_b.dtype()},
                                std::make_shared<LoRALowRankGrad>(stream, scale),
                                slots({cotangent, h, lora_b}, scales, adapter_ids, stream));
}

mx::array lora_down_grad(const mx::array& x, const mx::array& ds, const mx::array& lora_a,
                         const mx::array& key, const OptionalArray& adapter_ids, float dropout,
                         mx::StreamOrDevice s) {
  require_2d({&x, &ds});
  check_adapter_ndim(lora_a, "lora_a");
  require(
      ds.shape(0) == x.shape(0) && dim(lora_a, 0) == x.shape(1) && dim(lora_a, 1) == ds.shape(1),
      "x (M, K), ds (M, r), lora_a (K, r) or (n, K, r) disagree");
  require(ds.dtype() == mx::float32 && is_float(x.dtype()), "ds must be float32, x float");
  check_ids(adapter_ids, count(lora_a), x.shape(0));
  check_dropout_and_key(key, dropout);
  auto stream = mx::to_stream(s);
  return mx::array(lora_a.shape(), lora_a.dtype(),
                   std::make_shared<LoRADownGrad>(stream, dropout, lora_a.shape()),
                   slots({x, ds, key}, std::nullopt, adapter_ids, stream));
}

mx::array lora_input_grad(const mx::array& cotangent, const mx::array& weight, const mx::array& ds,
                          const mx::array& lora_a, const mx::array& key,
                          const OptionalArray& adapter_ids, float dropout, mx::StreamOrDevice s) {
  require_2d({&cotangent, &weight, &ds});
  check_adapter_ndim(lora_a, "lora_a");
  require(weight.shape(0) == cotangent.shape(1) && ds.shape(0) == cotangent.shape(0) &&
              dim(lora_a, 0) == weight.shape(1) && dim(lora_a, 1) == ds.shape(1),
          "cotangent (M, N), weight (N, K), ds (M, r), lora_a (K, r) or (n, K, r) disagree");
  require(is_float(cotangent.dtype()) && cotangent.dtype() == weight.dtype(),
          "cotangent and weight must share a float dtype");
  require(ds.dtype() == mx::float32, "ds must be float32");
  check_ids(adapter_ids, count(lora_a), cotangent.shape(0));
  check_dropout_and_key(key, dropout);
  auto stream = mx::to_stream(s);
  const int m = cotangent.shape(0), k = weight.shape(1);
  return mx::array({m, k}, cotangent.dtype(), std::make_shared<LoRAInputGrad>(stream, dropout),
                   slots({cotangent, weight, ds, lora_a, key}, std::nullopt, adapter_ids, stream));
}

mx::array lora_input_grad_onto(const mx::array& base, const mx::array& ds, const mx::array& lora_a,
                               const mx::array& key, const OptionalArray& adapter_ids,
                               float dropout, mx::StreamOrDevice s) {
  require_2d({&base, &ds});
  check_adapter_ndim(lora_a, "lora_a");
  require(ds.shape(0) == base.shape(0) && dim(lora_a, 0) == base.shape(1) &&
              dim(lora_a, 1) == ds.shape(1),
          "base (M, K), ds (M, r), lora_a (K, r) or (n, K, r) disagree");
  require(is_float(base.dtype()), "base must be float32, float16 or bfloat16");
  require(ds.dtype() == mx::float32, "ds must be float32");
  check_ids(adapter_ids, count(lora_a), base.shape(0));
  check_dropout_and_key(key, dropout);
  auto stream = mx::to_stream(s);
  return mx::array(base.shape(), base.dtype(), std::make_shared<LoRAInputGradOnto>(stream, dropout),
                   slots({base, ds, lora_a, key}, std::nullopt, adapter_ids, stream));
}

mx::array dropout_mask(const mx::array& key, const mx::Shape& shape, float dropout, mx::Dtype dtype,
                       mx::StreamOrDevice s) {
  check_dropout_and_key(key, dropout);
  require(is_float(dtype), "dropout_mask dtype must be float32, float16 or bfloat16");
  for (int d : shape) {
    require(d >= 0, "dropout_mask shape must have dimensions >= 0");
  }
  auto stream = mx::to_stream(s);
  return mx::array(shape, dtype, std::make_shared<DropoutMask>(stream, dropout, shape),
                   {row_contiguous(key, stream)});
}

}  // namespace mfl
