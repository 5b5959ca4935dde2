// The fused op's passes over whole arrays on the CPU: each computes one primitive's
// outputs (csrc/cpu/primitives.h) from row-contiguous inputs, dtype dispatched.
//
//   forward          y = x @ W^T + bias + scale * h @ B,  h = (mask ⊙ x) @ A
//   forward_onto     y = base + bias + scale * h @ B      (base: any base product)
//   low_rank_grad    dS = scale * dY @ B^T,  dB = scale * h^T @ dY
//   down_grad        dA = (mask ⊙ x)^T @ dS
//   input_grad       dX = dY @ W + mask ⊙ (dS @ A^T)
//   input_grad_onto  dX = base + mask ⊙ (dS @ A^T)       (base: the base's dY @ W)
//
// A null bias means no bias, a null key no dropout (the primitives decide which).
// The *_onto passes let a base product the extension does not compute (MLX's
// quantized matmul) sit where the dense GEMM sits; the rank-r work and the mask
// are the same code.
#pragma once

#include "mlx/array.h"

namespace mx = mlx::core;

namespace mfl::cpu {

void forward(const mx::array& x, const mx::array& w, const mx::array* bias, const mx::array& a,
             const mx::array& b, const mx::array* key, float scale, float p, mx::array& y,
             mx::array& h);
void forward_onto(const mx::array& x, const mx::array& base, const mx::array* bias,
                  const mx::array& a, const mx::array& b, const mx::array* key, float scale,
                  float p, mx::array& y, mx::array& h);
void low_rank_grad(const mx::array& dy, const mx::array& h, const mx::array& b, float scale,
                   mx::array& ds, mx::array& db);
void down_grad(const mx::array& x, const mx::array& ds, const mx::array* key, float p,
               mx::array& da);
void input_grad(const mx::array& dy, const mx::array& w, const mx::array& ds, const mx::array& a,
                const mx::array* key, float p, mx::array& dx);
void input_grad_onto(const mx::array& base, const mx::array& ds, const mx::array& a,
                     const mx::array* key, float p, mx::array& dx);
// out = the dropout multipliers for an x of out's shape (key may be null: all ones).
void dropout_mask(const mx::array* key, float p, mx::array& out);

}  // namespace mfl::cpu
