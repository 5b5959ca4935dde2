// Exports the standard CBLAS GEMM names MLX's Linux CPU backend imports and forwards them to
// the OpenBLAS of the scipy-openblas32 wheel (whose own names carry a scipy_ prefix).
//
// MLX's Linux wheel leaves cblas_sgemm/dgemm/cgemm to the netlib reference BLAS it bundles.
// Loaded with RTLD_GLOBAL before libmlx.so, this library comes first in the global symbol
// scope, so libmlx.so binds those three names here (see python/mlx_fused_lora/fast_blas.py).
//
// OpenBLAS is opened with dlopen(RTLD_LOCAL), not linked: a DT_NEEDED dependency of a library
// loaded RTLD_GLOBAL becomes global too, and libscipy_openblas.so also exports a few unprefixed
// LAPACK internals (claqz0_, dlaqz0_, ...) that would then shadow the bundled LAPACK's own.
// Only the names defined in this file become global. The bare-name dlopen searches this
// library's RUNPATH ($ORIGIN/../scipy_openblas32/lib), set by CMakeLists.txt.
#include <cblas.h>  // scipy-openblas32's own header: the types and the scipy_ names
#include <dlfcn.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#ifndef MFL_OPENBLAS_SONAME
#error "CMakeLists.txt defines MFL_OPENBLAS_SONAME (lib<name>.so of scipy-openblas32)"
#endif

#define MFL_EXPORT extern "C" __attribute__((visibility("default")))

// MLX passes 32-bit ints; a 64-bit-index OpenBLAS (scipy-openblas64) would need another shim.
static_assert(std::is_same_v<blasint, int>, "scipy-openblas32 uses 32-bit BLAS ints");

namespace {

struct OpenBlas {
  decltype(&scipy_cblas_sgemm) sgemm = nullptr;
  decltype(&scipy_cblas_dgemm) dgemm = nullptr;
  decltype(&scipy_cblas_cgemm) cgemm = nullptr;
  decltype(&scipy_openblas_get_config) get_config = nullptr;
  const char* error = nullptr;  // why opening failed; nullptr when every symbol resolved
};

template <typename Fn>
Fn resolve(void* handle, const char* name, const char** error) {
  void* symbol = dlsym(handle, name);
  if (symbol == nullptr && *error == nullptr) {
    *error = dlerror();
  }
  return reinterpret_cast<Fn>(symbol);
}

OpenBlas open_openblas() {
  OpenBlas blas;
  void* handle = dlopen(MFL_OPENBLAS_SONAME, RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    blas.error = dlerror();
    return blas;
  }
  blas.sgemm = resolve<decltype(blas.sgemm)>(handle, "scipy_cblas_sgemm", &blas.error);
  blas.dgemm = resolve<decltype(blas.dgemm)>(handle, "scipy_cblas_dgemm", &blas.error);
  blas.cgemm = resolve<decltype(blas.cgemm)>(handle, "scipy_cblas_cgemm", &blas.error);
  blas.get_config =
      resolve<decltype(blas.get_config)>(handle, "scipy_openblas_get_config", &blas.error);
  return blas;
}

// Opened on first use (thread-safe static init), so the library also works when preloaded.
const OpenBlas& openblas() {
  static const OpenBlas blas = open_openblas();
  return blas;
}

// Counts forwarded GEMMs: lets Python prove that libmlx.so really bound its calls here.
std::atomic<unsigned long long> forwarded_calls{0};

const OpenBlas& openblas_or_die() {
  const OpenBlas& blas = openblas();
  if (blas.error != nullptr) {
    std::fprintf(stderr, "mlx_fused_lora CBLAS forwarder: cannot load %s: %s\n",
                 MFL_OPENBLAS_SONAME, blas.error);
    std::abort();
  }
  forwarded_calls.fetch_add(1, std::memory_order_relaxed);
  return blas;
}

}  // namespace

// Python asks these before making the CBLAS names global.
MFL_EXPORT const char* mfl_blas_forward_error() { return openblas().error; }
MFL_EXPORT const char* mfl_blas_forward_config() {
  const OpenBlas& blas = openblas();
  return blas.error == nullptr ? blas.get_config() : nullptr;
}
MFL_EXPORT unsigned long long mfl_blas_forward_calls() {
  return forwarded_calls.load(std::memory_order_relaxed);
}

MFL_EXPORT void cblas_sgemm(const CBLAS_ORDER order, const CBLAS_TRANSPOSE trans_a,
                            const CBLAS_TRANSPOSE trans_b, const int m, const int n, const int k,
                            const float alpha, const float* a, const int lda, const float* b,
                            const int ldb, const float beta, float* c, const int ldc) {
  openblas_or_die().sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

MFL_EXPORT void cblas_dgemm(const CBLAS_ORDER order, const CBLAS_TRANSPOSE trans_a,
                            const CBLAS_TRANSPOSE trans_b, const int m, const int n, const int k,
                            const double alpha, const double* a, const int lda, const double* b,
                            const int ldb, const double beta, double* c, const int ldc) {
  openblas_or_die().dgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Complex arguments travel as void* (pointers to interleaved float pairs), as in CBLAS.
MFL_EXPORT void cblas_cgemm(const CBLAS_ORDER order, const CBLAS_TRANSPOSE trans_a,
                            const CBLAS_TRANSPOSE trans_b, const int m, const int n, const int k,
                            const void* alpha, const void* a, const int lda, const void* b,
                            const int ldb, const void* beta, void* c, const int ldc) {
  openblas_or_die().cgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
