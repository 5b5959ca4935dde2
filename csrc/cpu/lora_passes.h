// The fused op's passes over whole arrays on the CPU: each computes one primitive's
// outputs (csrc/cpu/primitives.h) from row-contiguous inputs, dtype dispatched. With
// c_i = scale * scales[i] the multiplier of adapter i and id(row) the row's adapter
// (A_i, B_i its matrices; a row with id -1 gets the base product alone):
//
//   forward          y = x @ W^T + bias + c_id * h @ B_id,  h = (mask ⊙ x) @ A_id
//   forward_onto     y = base + bias + c_id * h @ B_id      (base: any base product)
//   low_rank_grad    dS = c_id * dY @ B_id^T,  dB_i = c_i * h_i^T @ dY_i
//   down_grad        dA_i = (mask ⊙ x_i)^T @ dS_i
//   input_grad       dX = dY @ W + mask ⊙ (dS @ A_id^T)
//   input_grad_onto  dX = base + mask ⊙ (dS @ A_id^T)       (base: the base's dY @ W)
//
// (x_i, h_i, dY_i, dS_i: the rows on adapter i.) The single-adapter op is n = 1 with
// no ids and no scales: the same code (adapter_rows.h), every row on adapter 0. A null
// bias means no bias, a null key no dropout, null scales all 1, null ids no ids (the
// primitives decide which). The *_onto passes let a base product the extension does
// not compute (MLX's quantized matmul) sit where the dense GEMM sits.
#pragma once

#include "mlx/array.h"

namespace mx = mlx::core;

namespace mfl::cpu {

// The mixed op's routing inputs, each null when absent: scales (n,) float32, ids (M,) int32.
struct Routing {
  const mx::array* scales = nullptr;
  const mx::array* ids = nullptr;
};

void forward(const mx::array& x, const mx::array& w, const mx::array* bias, const mx::array& a,
             const mx::array& b, const mx::array* key, float scale, float p, Routing route,
             mx::array& y, mx::array& h);
void forward_onto(const mx::array& x, const mx::array& base, const mx::array* bias,
                  const mx::array& a, const mx::array& b, const mx::array* key, float scale,
                  float p, Routing route, mx::array& y, mx::array& h);
void low_rank_grad(const mx::array& dy, const mx::array& h, const mx::array& b, float scale,
                   Routing route, mx::array& ds, mx::array& db);
void down_grad(const mx::array& x, const mx::array& ds, const mx::array* key, float p,
               const mx::array* ids, mx::array& da);
void input_grad(const mx::array& dy, const mx::array& w, const mx::array& ds, const mx::array& a,
                const mx::array* key, float p, const mx::array* ids, mx::array& dx);
void input_grad_onto(const mx::array& base, const mx::array& ds, const mx::array& a,
                     const mx::array* key, float p, const mx::array* ids, mx::array& dx);
// out = the dropout multipliers for an x of out's shape (key may be null: all ones).
void dropout_mask(const mx::array* key, float p, mx::array& out);

}  // namespace mfl::cpu
