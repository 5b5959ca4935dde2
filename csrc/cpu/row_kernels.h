// The extension's own hot loops, on float32 rows: the rank-r passes of the fused op
// that carry the dropout mask. Each runs inside one worker thread over a few rows
// at a time, so a pass over x or dY reads each row once, from cache, with the mask
// recomputed from the shared counter hash (csrc/kernels/lora_dropout.h) on the fly.
#pragma once

#include <cstdint>

namespace mfl::cpu {

// The dropout of one call, as every kernel needs it: inactive means p = 0.
struct Dropout {
  bool active = false;
  unsigned int key0 = 0, key1 = 0;
  unsigned int threshold = 0;
  float keep_scale = 1.0f;
};

Dropout make_dropout(float p, const unsigned int* key);

// out[k] = x[k] * dropout multiplier of element (index0 + k); out may alias x.
void dropout_row(float* out, const float* x, int64_t n, uint64_t index0, const Dropout& d);

// For i < 4, j < 2: out[i][j] = sum_k rows[i][k] * cols[j][k]. Eight dot products
// that share their loads (rows may repeat a pointer when fewer than 4 are real).
void dot_4x2(const float* const rows[4], const float* const cols[2], int64_t n, float out[4][2]);

// h[j] = sum_k x[k] a[k * r + j] for j < r: one row times a row-major (K x r) matrix,
// read in place (the BGMV case: one row per adapter, where copying the adapter into
// another layout would cost more than the product). Each h[j] has the bits dot_4x2
// gives for x against column j.
void row_times_matrix(const float* x, const float* a, int64_t k, int64_t r, float* h);

// axpy_4 on s * x[i] (each product rounded, as a copy of x scaled by s would be): the
// rows of a matrix read in place with a multiplier, with the bits of the scaled copy.
void axpy_4_scaled(float* y, const float a[4], const float* const x[4], float s, int64_t n,
                   bool overwrite);

// y[k] (+)= a[0] x[0][k] + a[1] x[1][k] + a[2] x[2][k] + a[3] x[3][k]; one load and
// store of y per four multiply-adds. With overwrite, y's old value is ignored.
void axpy_4(float* y, const float a[4], const float* const x[4], int64_t n, bool overwrite);

}  // namespace mfl::cpu
