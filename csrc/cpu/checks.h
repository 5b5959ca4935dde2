// Argument checks shared by the op builders: the "[mlx_fused_lora] ..." error and an
// array's shape written as Python writes a tuple.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

#include "mlx/array.h"

namespace mx = mlx::core;

namespace mfl::checks {

// Throws std::invalid_argument (ValueError in Python) with the package's prefix.
inline void require(bool ok, const std::string& msg) {
  if (!ok) {
    throw std::invalid_argument("[mlx_fused_lora] " + msg);
  }
}

inline std::string shape_str(const mx::array& a) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < a.ndim(); ++i) {
    s << (i ? ", " : "") << a.shape(i);
  }
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

}  // namespace mfl::checks
