// Python bindings of the CPU extension: mlx_fused_lora._ext, and the test and
// benchmark hooks in _ext.testing. Thin on purpose; the public API, its validation
// and the op's derivative live in mlx_fused_lora.ops.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "cpu/ops.h"
#include "cpu/quantized_base.h"
#include "cpu/testing.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_ext, m) {
  m.doc() = "CPU primitives of the fused LoRA linear op (see csrc/cpu/primitives.h).";
  m.attr("mlx_version") = MFL_BUILT_AGAINST_MLX;

  // scales and adapter_ids: the mixed op's routing slots (csrc/cpu/ops.h), None for the
  // single-adapter op.
  m.def("lora_forward", &mfl::lora_forward, "x"_a, "weight"_a, "bias"_a, "lora_a"_a, "lora_b"_a,
        "key"_a, "scales"_a = nb::none(), "adapter_ids"_a = nb::none(), nb::kw_only(), "scale"_a,
        "dropout"_a, "stream"_a = nb::none(),
        "Returns (y, h): y = x @ W^T + bias + c_id * h @ B_id, h = (mask * x) @ A_id.");
  m.def("lora_forward_onto", &mfl::lora_forward_onto, "x"_a, "base"_a, "bias"_a, "lora_a"_a,
        "lora_b"_a, "key"_a, "scales"_a = nb::none(), "adapter_ids"_a = nb::none(), nb::kw_only(),
        "scale"_a, "dropout"_a, "stream"_a = nb::none(),
        "Returns (y, h): y = base + bias + c_id * h @ B_id, h = (mask * x) @ A_id.");
  m.def("lora_low_rank_grad", &mfl::lora_low_rank_grad, "cotangent"_a, "h"_a, "lora_b"_a,
        "scales"_a = nb::none(), "adapter_ids"_a = nb::none(), nb::kw_only(), "scale"_a,
        "stream"_a = nb::none(),
        "Returns (dS, dB): dS = c_id * dY @ B_id^T, dB_i = c_i * h_i^T @ dY_i.");
  m.def("lora_down_grad", &mfl::lora_down_grad, "x"_a, "ds"_a, "lora_a"_a, "key"_a,
        "adapter_ids"_a = nb::none(), nb::kw_only(), "dropout"_a, "stream"_a = nb::none(),
        "Returns dA_i = (mask * x_i)^T @ dS_i.");
  m.def("lora_input_grad", &mfl::lora_input_grad, "cotangent"_a, "weight"_a, "ds"_a, "lora_a"_a,
        "key"_a, "adapter_ids"_a = nb::none(), nb::kw_only(), "dropout"_a, "stream"_a = nb::none(),
        "Returns dX = dY @ W + mask * (dS @ A_id^T).");
  m.def("lora_input_grad_onto", &mfl::lora_input_grad_onto, "base"_a, "ds"_a, "lora_a"_a, "key"_a,
        "adapter_ids"_a = nb::none(), nb::kw_only(), "dropout"_a, "stream"_a = nb::none(),
        "Returns dX = base + mask * (dS @ A_id^T).");
  m.def("quantized_base_matmul", &mfl::quantized_base_matmul, "x"_a, "weight"_a, "scales"_a,
        "biases"_a, nb::kw_only(), "group_size"_a, "bits"_a, "transpose"_a, "stream"_a = nb::none(),
        "x @ W.T (transpose) or x @ W for an affine-quantized W, dequantized a tile of rows "
        "at a time into the BLAS (csrc/cpu/quantized_base.h).");
  m.def(
      "dropout_mask",
      [](const mx::array& key, const std::vector<int>& shape, float dropout, mx::Dtype dtype,
         mx::StreamOrDevice s) {
        return mfl::dropout_mask(key, mx::Shape(shape.begin(), shape.end()), dropout, dtype, s);
      },
      "key"_a, "shape"_a, "dropout"_a, "dtype"_a, nb::kw_only(), "stream"_a = nb::none(),
      "The dropout multipliers the op applies.");

  nb::module_ testing = m.def_submodule("testing", "Test and benchmark hooks; not the op's API.");
  testing.def("dropout_bits", &mfl::testing::dropout_bits, "key0"_a, "key1"_a, "index0"_a,
              "count"_a, "The raw dropout hash for flat indices [index0, index0 + count).");
  testing.def("dropout_row", &mfl::testing::dropout_row, "key0"_a, "key1"_a, "p"_a, "index0"_a,
              "count"_a,
              "The CPU row kernel's multipliers for flat indices [index0, index0 + count).");
  testing.def("blas_matmul", &mfl::testing::blas_matmul, "a"_a, "b"_a, nb::kw_only(),
              "transpose_b"_a = false, "stream"_a = nb::none(),
              "a @ b (or a @ b.T) through the extension's BLAS.");
}
