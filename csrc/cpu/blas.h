// The one BLAS entry point the extension uses: single-precision GEMM.
// MLX's Linux CPU wheel ships the netlib reference BLAS (~4 GFLOP/s), so the
// extension links a real one: Accelerate on macOS, OpenBLAS from the
// scipy-openblas32 wheel on Linux (which prefixes its symbols with scipy_).
#pragma once

#if defined(__APPLE__)
// The CBLAS of macOS 13.3+ (`cblas_sgemm$NEWLAPACK`, the one libmlx.dylib imports). MLX's
// CMake target already passes -DACCELERATE_NEW_LAPACK; defining it again would be a
// -Wmacro-redefined warning on every Mac build.
#ifndef ACCELERATE_NEW_LAPACK
#define ACCELERATE_NEW_LAPACK
#endif
#include <Accelerate/Accelerate.h>
#define MFL_CBLAS_SGEMM cblas_sgemm
#else
#include <cblas.h>
#define MFL_CBLAS_SGEMM scipy_cblas_sgemm
#endif

namespace mfl::cpu {

// C (m x n, row-major) = alpha * op(A) @ op(B) + beta * C, op(X) = X or X^T as
// stored row-major with the given leading dims. beta = 1 accumulates onto C, which
// is how the fused op adds the base GEMM to the LoRA term without an M x N temporary.
inline void sgemm(bool transpose_a, bool transpose_b, int m, int n, int k, float alpha,
                  const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  if (m == 0 || n == 0) {
    return;
  }
  if (k == 0) {
    // An empty sum: C = beta * C. Not handed to the BLAS, which rejects a leading
    // dimension of 0.
    if (beta != 1.0f) {
      for (int i = 0; i < m; ++i) {
        for (int j = 0; j < n; ++j) {
          c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
        }
      }
    }
    return;
  }
  MFL_CBLAS_SGEMM(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans,
                  transpose_b ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda, b, ldb, beta, c,
                  ldc);
}

}  // namespace mfl::cpu
