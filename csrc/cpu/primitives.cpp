// The fused op's primitives (primitives.h): eval_cpu runs a pass of lora_passes.h
// on MLX's CPU stream, eval_gpu refuses, and the forwards' jvp, output shapes and
// equivalence for MLX's graph.
#include "cpu/primitives.h"

#include <sstream>
#include <stdexcept>

#include "cpu/lora_passes.h"
#include "cpu/ops.h"
#include "mlx/backend/cpu/encoder.h"

namespace mfl {

namespace {

// The one place that decides which optional inputs are present: the primitives
// always receive fixed slots, a 0-size bias slot means no bias, and the key slot is
// read only when p > 0. Null means absent.
struct Present {
  const mx::array* bias;
  const mx::array* key;
};
Present present(const mx::array* bias_slot, const mx::array& key_slot, float dropout) {
  return {bias_slot && bias_slot->size() > 0 ? bias_slot : nullptr,
          dropout > 0.0f ? &key_slot : nullptr};
}

void allocate(mx::array& out) { out.set_data(mx::allocator::malloc(out.nbytes())); }

// out takes over `in`'s buffer when nothing else holds it (as MLX's elementwise ops
// do): the *Onto passes then add their term in place of a second M x N array.
void allocate_or_donate(mx::array& out, const mx::array& in) {
  if (in.is_donatable() && in.flags().row_contiguous && in.dtype() == out.dtype() &&
      in.size() == out.size()) {
    out.copy_shared_buffer(in);
  } else {
    allocate(out);
  }
}

template <typename Fn>
void run_on_cpu(const mx::Stream& stream, Fn&& fn) {
  mx::cpu::get_command_encoder(stream).dispatch(std::forward<Fn>(fn));
}

[[noreturn]] void gpu_unsupported(const char* name) {
  std::ostringstream msg;
  msg << "[mlx_fused_lora] " << name
      << " is a CPU primitive; GPU streams are served by mlx_fused_lora.ops, "
         "not by the C++ extension.";
  throw std::runtime_error(msg.str());
}

// The mixed op's routing slots when present (appended after the fixed slots from
// position `first` on): scales then adapter_ids; ids_at for the passes that take ids only.
cpu::Routing routing(const std::vector<mx::array>& inputs, size_t first) {
  if (inputs.size() <= first) {
    return {};
  }
  return {&inputs[first], &inputs[first + 1]};
}
const mx::array* ids_at(const std::vector<mx::array>& inputs, size_t i) {
  return inputs.size() > i ? &inputs[i] : nullptr;
}
OptionalArray optional_at(const std::vector<mx::array>& inputs, size_t i) {
  return inputs.size() > i ? OptionalArray(inputs[i]) : std::nullopt;
}

// y is linear in x, the base, the bias and each c_i, and bilinear in (A_i, B_i), so
// with m the dropout multipliers:
//   dh = (m*dx) @ A + (m*x) @ dA
//   dy = d(base) + db + c (m*dx) @ A @ B + c (m*x) @ dA @ B + c h @ dB + dc h @ B
// where d(base) = dx @ W^T + x @ dW^T for the dense op and the base's tangent for
// the Onto form. Each LoRA term is this op itself (onto zeros, without bias) with one
// input replaced by its tangent, so it reuses the same mask and routing and never
// materializes the mask.
std::vector<mx::array> forward_jvp(bool onto, float scale, float p, const mx::Stream& s,
                                   const std::vector<mx::array>& primals,
                                   const std::vector<mx::array>& tangents,
                                   const std::vector<int>& argnums) {
  // primals: x, weight or base, bias, lora_a, lora_b, key[, scales, adapter_ids]
  const mx::array& x = primals[0];
  const mx::array &a = primals[3], &b = primals[4], &key = primals[5];
  const OptionalArray scales = optional_at(primals, 6), ids = optional_at(primals, 7);
  const int m = x.shape(0), n = onto ? primals[1].shape(1) : primals[1].shape(0);
  const mx::array no_bias = mx::zeros({0}, x.dtype(), s);
  const mx::array no_base = mx::zeros({m, n}, x.dtype(), s);
  auto lora_term = [&](const mx::array& xx, const mx::array& aa, const mx::array& bb,
                       const OptionalArray& cc) {
    return lora_forward_onto(xx, no_base, no_bias, aa, bb, key, cc, ids, scale, p, s);
  };
  mx::array dy = mx::zeros({m, n}, mx::float32, s);
  mx::array dh = mx::zeros({m, b.shape(b.ndim() - 2)}, mx::float32, s);
  auto add = [&](const std::vector<mx::array>& term, bool with_h) {
    dy = mx::add(dy, mx::astype(term[0], mx::float32, s), s);
    if (with_h) {
      dh = mx::add(dh, term[1], s);
    }
  };
  for (size_t i = 0; i < argnums.size(); ++i) {
    const int arg = argnums[i];
    const mx::array& t = tangents[i];
    if (arg == 0) {
      add(onto ? lora_term(t, a, b, scales)
               : lora_forward(t, primals[1], no_bias, a, b, key, scales, ids, scale, p, s),
          true);
    } else if (arg == 1) {
      const mx::array t32 = mx::astype(t, mx::float32, s);
      dy = mx::add(
          dy, onto ? t32 : mx::matmul(mx::astype(x, mx::float32, s), mx::transpose(t32, s), s), s);
    } else if (arg == 2 && t.size() > 0) {
      dy = mx::add(dy, mx::astype(t, mx::float32, s), s);
    } else if (arg == 3) {
      add(lora_term(x, t, b, scales), true);
    } else if (arg == 4) {
      add(lora_term(x, a, t, scales), false);
    } else if (arg == 6) {
      add(lora_term(x, a, b, t), false);
    }
  }
  return {mx::astype(dy, x.dtype(), s), dh};
}

}  // namespace

void LoRAForward::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  allocate(outputs[0]);
  allocate(outputs[1]);
  run_on_cpu(stream(), [inputs, outputs, scale = scale_, p = dropout_]() mutable {
    const Present in = present(&inputs[2], inputs[5], p);
    cpu::forward(inputs[0], inputs[1], in.bias, inputs[3], inputs[4], in.key, scale, p,
                 routing(inputs, 6), outputs[0], outputs[1]);
  });
}

void LoRAForwardOnto::eval_cpu(const std::vector<mx::array>& inputs,
                               std::vector<mx::array>& outputs) {
  allocate_or_donate(outputs[0], inputs[1]);
  allocate(outputs[1]);
  run_on_cpu(stream(), [inputs, outputs, scale = scale_, p = dropout_]() mutable {
    const Present in = present(&inputs[2], inputs[5], p);
    cpu::forward_onto(inputs[0], inputs[1], in.bias, inputs[3], inputs[4], in.key, scale, p,
                      routing(inputs, 6), outputs[0], outputs[1]);
  });
}

void LoRALowRankGrad::eval_cpu(const std::vector<mx::array>& inputs,
                               std::vector<mx::array>& outputs) {
  allocate(outputs[0]);
  allocate(outputs[1]);
  run_on_cpu(stream(), [inputs, outputs, scale = scale_]() mutable {
    cpu::low_rank_grad(inputs[0], inputs[1], inputs[2], scale, routing(inputs, 3), outputs[0],
                       outputs[1]);
  });
}

void LoRADownGrad::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  allocate(out);
  run_on_cpu(stream(), [inputs, out, p = dropout_]() mutable {
    cpu::down_grad(inputs[0], inputs[1], present(nullptr, inputs[2], p).key, p, ids_at(inputs, 3),
                   out);
  });
}

void LoRAInputGrad::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  allocate(out);
  run_on_cpu(stream(), [inputs, out, p = dropout_]() mutable {
    cpu::input_grad(inputs[0], inputs[1], inputs[2], inputs[3], present(nullptr, inputs[4], p).key,
                    p, ids_at(inputs, 5), out);
  });
}

void LoRAInputGradOnto::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  allocate_or_donate(out, inputs[0]);
  run_on_cpu(stream(), [inputs, out, p = dropout_]() mutable {
    cpu::input_grad_onto(inputs[0], inputs[1], inputs[2], present(nullptr, inputs[3], p).key, p,
                         ids_at(inputs, 4), out);
  });
}

void DropoutMask::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  allocate(out);
  run_on_cpu(stream(), [inputs, out, p = dropout_]() mutable {
    cpu::dropout_mask(present(nullptr, inputs[0], p).key, p, out);
  });
}

#define MFL_CPU_ONLY(Class, ...) \
  void Class::eval_gpu(const std::vector<mx::array>&, __VA_ARGS__) { gpu_unsupported(#Class); }
MFL_CPU_ONLY(LoRAForward, std::vector<mx::array>&)
MFL_CPU_ONLY(LoRAForwardOnto, std::vector<mx::array>&)
MFL_CPU_ONLY(LoRALowRankGrad, std::vector<mx::array>&)
MFL_CPU_ONLY(LoRADownGrad, mx::array&)
MFL_CPU_ONLY(LoRAInputGrad, mx::array&)
MFL_CPU_ONLY(LoRAInputGradOnto, mx::array&)
MFL_CPU_ONLY(DropoutMask, mx::array&)
#undef MFL_CPU_ONLY

std::vector<mx::array> LoRAForward::jvp(const std::vector<mx::array>& primals,
                                        const std::vector<mx::array>& tangents,
                                        const std::vector<int>& argnums) {
  return forward_jvp(/*onto=*/false, scale_, dropout_, stream(), primals, tangents, argnums);
}

std::vector<mx::array> LoRAForwardOnto::jvp(const std::vector<mx::array>& primals,
                                            const std::vector<mx::array>& tangents,
                                            const std::vector<int>& argnums) {
  return forward_jvp(/*onto=*/true, scale_, dropout_, stream(), primals, tangents, argnums);
}

std::vector<mx::Shape> LoRAForward::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[1].shape(0)}, {inputs[0].shape(0), inputs[3].shape(-1)}};
}
std::vector<mx::Shape> LoRAForwardOnto::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[1].shape(), {inputs[0].shape(0), inputs[3].shape(-1)}};
}
std::vector<mx::Shape> LoRALowRankGrad::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[1].shape(), inputs[2].shape()};
}
std::vector<mx::Shape> LoRADownGrad::output_shapes(const std::vector<mx::array>&) {
  return {shape_};
}
std::vector<mx::Shape> LoRAInputGrad::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[1].shape(1)}};
}
std::vector<mx::Shape> LoRAInputGradOnto::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}
std::vector<mx::Shape> DropoutMask::output_shapes(const std::vector<mx::array>&) {
  return {shape_};
}

bool LoRAForward::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const LoRAForward&>(other);
  return scale_ == o.scale_ && dropout_ == o.dropout_;
}
bool LoRAForwardOnto::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const LoRAForwardOnto&>(other);
  return scale_ == o.scale_ && dropout_ == o.dropout_;
}
bool LoRALowRankGrad::is_equivalent(const mx::Primitive& other) const {
  return scale_ == static_cast<const LoRALowRankGrad&>(other).scale_;
}
bool LoRADownGrad::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const LoRADownGrad&>(other);
  return dropout_ == o.dropout_ && shape_ == o.shape_;
}
bool LoRAInputGrad::is_equivalent(const mx::Primitive& other) const {
  return dropout_ == static_cast<const LoRAInputGrad&>(other).dropout_;
}
bool LoRAInputGradOnto::is_equivalent(const mx::Primitive& other) const {
  return dropout_ == static_cast<const LoRAInputGradOnto&>(other).dropout_;
}
bool DropoutMask::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const DropoutMask&>(other);
  return dropout_ == o.dropout_ && shape_ == o.shape_;
}

}  // namespace mfl
