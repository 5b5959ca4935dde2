// Python bindings of the CPU extension: mlx_fused_lora._ext. Thin on purpose; the
// public API, its validation and the op's derivative live in mlx_fused_lora.ops.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "cpu/fused_lora.h"
#include "cpu/row_kernels.h"
#include "kernels/lora_dropout.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_ext, m) {
  m.doc() = "CPU primitives of the fused LoRA linear op (see csrc/cpu/fused_lora.h).";
  m.attr("mlx_version") = MFL_BUILT_AGAINST_MLX;

  m.def("lora_forward", &mfl::lora_forward, "x"_a, "weight"_a, "bias"_a, "lora_a"_a, "lora_b"_a,
        "key"_a, nb::kw_only(), "scale"_a, "dropout"_a, "stream"_a = nb::none(),
        "Returns (y, h): y = x @ W^T + bias + scale * h @ B, h = (mask * x) @ A.");
  m.def("lora_low_rank_grad", &mfl::lora_low_rank_grad, "cotangent"_a, "h"_a, "lora_b"_a,
        nb::kw_only(), "scale"_a, "stream"_a = nb::none(),
        "Returns (dS, dB): dS = scale * dY @ B^T, dB = scale * h^T @ dY.");
  m.def("lora_down_grad", &mfl::lora_down_grad, "x"_a, "ds"_a, "lora_a"_a, "key"_a, nb::kw_only(),
        "dropout"_a, "stream"_a = nb::none(), "Returns dA = (mask * x)^T @ dS.");
  m.def("lora_input_grad", &mfl::lora_input_grad, "cotangent"_a, "weight"_a, "ds"_a, "lora_a"_a,
        "key"_a, nb::kw_only(), "dropout"_a, "stream"_a = nb::none(),
        "Returns dX = dY @ W + mask * (dS @ A^T).");
  m.def(
      "dropout_mask",
      [](const mx::array& key, const std::vector<int>& shape, float dropout, mx::Dtype dtype,
         mx::StreamOrDevice s) {
        return mfl::dropout_mask(key, mx::Shape(shape.begin(), shape.end()), dropout, dtype, s);
      },
      "key"_a, "shape"_a, "dropout"_a, "dtype"_a, nb::kw_only(), "stream"_a = nb::none(),
      "The dropout multipliers the op applies.");
  m.def(
      "dropout_bits",
      [](uint32_t key0, uint32_t key1, uint64_t index0, int64_t count) {
        // The raw hash for flat indices [index0, index0 + count): lets the tests hold
        // the header against its spec, including where the index crosses 2^32.
        std::vector<uint32_t> bits(count);
        for (int64_t i = 0; i < count; ++i) {
          const uint64_t index = index0 + uint64_t(i);
          bits[i] = mfl_dropout_bits(key0, key1, uint32_t(index), uint32_t(index >> 32));
        }
        return bits;
      },
      "key0"_a, "key1"_a, "index0"_a, "count"_a);
  m.def(
      "dropout_row",
      [](uint32_t key0, uint32_t key1, float p, uint64_t index0, int64_t count) {
        // The CPU kernel's multipliers for flat indices [index0, index0 + count).
        const uint32_t key[2] = {key0, key1};
        const mfl::cpu::Dropout d = mfl::cpu::make_dropout(p, key);
        std::vector<float> ones(count, 1.0f), out(count);
        mfl::cpu::dropout_row(out.data(), ones.data(), count, index0, d);
        return out;
      },
      "key0"_a, "key1"_a, "p"_a, "index0"_a, "count"_a);
  m.def("blas_matmul", &mfl::blas_matmul, "a"_a, "b"_a, nb::kw_only(), "transpose_b"_a = false,
        "stream"_a = nb::none(), "a @ b (or a @ b.T) through the extension's BLAS.");
}
