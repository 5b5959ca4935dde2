// Bodies of the row kernels (row_kernels.h), included by row_kernels.cpp once per
// instruction set it builds them for, each time inside its own namespace.
// No include guard, on purpose.

inline void dropout_row(float* out, const float* x, int64_t n, uint64_t index0, const Dropout& d) {
  const unsigned int key0 = d.key0, key1 = d.key1, threshold = d.threshold;
  const float keep_scale = d.keep_scale;
  const unsigned int lo0 = static_cast<unsigned int>(index0);
  const unsigned int hi0 = static_cast<unsigned int>(index0 >> 32);
  if (uint64_t(lo0) + uint64_t(n) <= (uint64_t(1) << 32)) {
    // The common case: the high word is the same across the row, so the loop is
    // pure 32-bit arithmetic and vectorizes.
    for (unsigned int k = 0; k < static_cast<unsigned int>(n); ++k) {
      unsigned int bits = mfl_dropout_bits(key0, key1, lo0 + k, hi0);
      out[k] = x[k] * mfl_dropout_multiplier(bits, threshold, keep_scale);
    }
    return;
  }
  for (int64_t k = 0; k < n; ++k) {
    uint64_t index = index0 + uint64_t(k);
    unsigned int bits = mfl_dropout_bits(key0, key1, static_cast<unsigned int>(index),
                                         static_cast<unsigned int>(index >> 32));
    out[k] = x[k] * mfl_dropout_multiplier(bits, threshold, keep_scale);
  }
}

inline void dot_4x2(const float* const rows[4], const float* const cols[2], int64_t n,
                    float out[4][2]) {
  // acc[p][l]: eight independent lanes per (row, col) pair, which the compiler
  // keeps in vector registers (it may not reassociate one scalar float sum).
  float acc[8][8] = {};
  const float *x0 = rows[0], *x1 = rows[1], *x2 = rows[2], *x3 = rows[3];
  const float *c0 = cols[0], *c1 = cols[1];
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int l = 0; l < 8; ++l) {
      const float a0 = c0[k + l], a1 = c1[k + l];
      acc[0][l] += x0[k + l] * a0;
      acc[1][l] += x0[k + l] * a1;
      acc[2][l] += x1[k + l] * a0;
      acc[3][l] += x1[k + l] * a1;
      acc[4][l] += x2[k + l] * a0;
      acc[5][l] += x2[k + l] * a1;
      acc[6][l] += x3[k + l] * a0;
      acc[7][l] += x3[k + l] * a1;
    }
  }
  for (int p = 0; p < 8; ++p) {
    const float* x = rows[p / 2];
    const float* c = cols[p % 2];
    float tail = 0.0f;
    for (int64_t t = k; t < n; ++t) {
      tail += x[t] * c[t];
    }
    const float* a = acc[p];
    out[p / 2][p % 2] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])) + tail;
  }
}

inline void row_times_matrix(const float* x, const float* a, int64_t k, int64_t r, float* h) {
  // Each h[j] is summed exactly as dot_4x2 sums a row against column j (eight lanes over
  // k mod 8, paired, then the tail), so reading A in place gives the bits of the blocked
  // kernels on a transposed copy. Eight columns at a time: the lanes are 8 x 8 floats.
  const int64_t k8 = k - k % 8;
  int64_t j0 = 0;
  for (; j0 + 8 <= r; j0 += 8) {
    float acc[8][8] = {};
    for (int64_t kk = 0; kk < k8; kk += 8) {
      for (int l = 0; l < 8; ++l) {
        const float xv = x[kk + l];
        const float* row = a + (kk + l) * r + j0;
        for (int c = 0; c < 8; ++c) {
          acc[l][c] += xv * row[c];
        }
      }
    }
    for (int c = 0; c < 8; ++c) {
      float tail = 0.0f;
      for (int64_t t = k8; t < k; ++t) {
        tail += x[t] * a[t * r + j0 + c];
      }
      h[j0 + c] = ((acc[0][c] + acc[1][c]) + (acc[2][c] + acc[3][c])) +
                  ((acc[4][c] + acc[5][c]) + (acc[6][c] + acc[7][c])) + tail;
    }
  }
  for (; j0 < r; ++j0) {
    float lanes[8] = {};
    for (int64_t kk = 0; kk < k8; kk += 8) {
      for (int l = 0; l < 8; ++l) {
        lanes[l] += x[kk + l] * a[(kk + l) * r + j0];
      }
    }
    float tail = 0.0f;
    for (int64_t t = k8; t < k; ++t) {
      tail += x[t] * a[t * r + j0];
    }
    h[j0] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
            ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) + tail;
  }
}

inline void axpy_4_scaled(float* y, const float a[4], const float* const x[4], float s, int64_t n,
                          bool overwrite) {
  const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  if (overwrite) {
    for (int64_t k = 0; k < n; ++k) {
      y[k] = (a0 * (s * x0[k]) + a1 * (s * x1[k])) + (a2 * (s * x2[k]) + a3 * (s * x3[k]));
    }
  } else {
    for (int64_t k = 0; k < n; ++k) {
      y[k] += (a0 * (s * x0[k]) + a1 * (s * x1[k])) + (a2 * (s * x2[k]) + a3 * (s * x3[k]));
    }
  }
}

inline void axpy_4(float* y, const float a[4], const float* const x[4], int64_t n, bool overwrite) {
  const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  if (overwrite) {
    for (int64_t k = 0; k < n; ++k) {
      y[k] = (a0 * x0[k] + a1 * x1[k]) + (a2 * x2[k] + a3 * x3[k]);
    }
  } else {
    for (int64_t k = 0; k < n; ++k) {
      y[k] += (a0 * x0[k] + a1 * x1[k]) + (a2 * x2[k] + a3 * x3[k]);
    }
  }
}
