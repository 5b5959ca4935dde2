// A stand-in for Apple's <Accelerate/Accelerate.h>, for .ci/cross_build.py only: Apple's SDK
// headers cannot be had off a Mac. It declares what csrc/cpu/blas.h uses, the way the macOS SDK
// (13.3 and later) declares it:
// - with ACCELERATE_NEW_LAPACK, cblas_sgemm is bound to the `_cblas_sgemm$NEWLAPACK` symbol (the
//   one libmlx.dylib imports too), available from macOS 13.3: a deployment target below that is
//   a -Wunguarded-availability-new warning, as it is on a Mac;
// - without it, the old interface is deprecated: a -Wdeprecated-declarations warning.
#pragma once

enum CBLAS_ORDER { CblasRowMajor = 101, CblasColMajor = 102 };
enum CBLAS_TRANSPOSE { CblasNoTrans = 111, CblasTrans = 112, CblasConjTrans = 113 };

#ifdef __cplusplus
extern "C" {
#endif

#if defined(ACCELERATE_NEW_LAPACK)
void cblas_sgemm(enum CBLAS_ORDER order, enum CBLAS_TRANSPOSE trans_a, enum CBLAS_TRANSPOSE trans_b,
                 int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                 float beta, float* c, int ldc) __asm("_cblas_sgemm$NEWLAPACK")
    __attribute__((availability(macos, introduced = 13.3)));
#else
void cblas_sgemm(enum CBLAS_ORDER order, enum CBLAS_TRANSPOSE trans_a, enum CBLAS_TRANSPOSE trans_b,
                 int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                 float beta, float* c, int ldc)
    __attribute__((deprecated("define ACCELERATE_NEW_LAPACK for the macOS 13.3+ interface")));
#endif

#ifdef __cplusplus
}
#endif
