// Bodies of the fused op's backward passes (lora_passes.h): dS and dB, dA, dX, with
// rows grouped by adapter (adapter_rows.h) and the dropout mask recomputed per row.
//
// Memory passes (M x K: x, dX, M x N: dY), the same for n adapters as for one:
//   dS, dB   dY read twice (two rank-r products: BLAS GEMMs on a run of rows of one
//            adapter, the row kernels for rows whose adapter changes often)
//   dA       x read once
//   dX       written once by the rank-r pass, then updated by the dY @ W GEMM
// An adapter no row uses gets zeros (written, never computed).
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/adapter_rows.h"
#include "cpu/lora_passes.h"
#include "cpu/parallel.h"
#include "cpu/row_blocks.h"

namespace mfl::cpu {

namespace {

// A run of at least this many rows of one adapter (or a whole tile) goes to the BLAS:
// shorter ones (decoding, one row per adapter) are cheaper on the row kernels than a
// BLAS call per run.
constexpr int64_t kBlasRun = kRowGrain;

// dS rows (unscaled) and dB_i += h_i^T @ dY_i for the rows of `groups`, of a float32
// tile of dY holding rows [row0, ...), on the row kernels. dS: blocks of rows of one
// adapter; dB: each worker a slab of N's columns (no reduction), over every block.
void low_rank_rows(const RowGroups& groups, const float* tile, int64_t row0, int64_t n, int64_t r,
                   const float* hp, const AdapterFloats& b32, float* dsp,
                   const std::vector<float*>& db) {
  const int64_t size = groups.size();
  parallel_for(size, kRowGrain, [&](int64_t p0, int64_t p1, int) {
    Scratch ds_block(kBlock * r);
    for_each_block(groups, p0, p1, [&](int64_t pos, int64_t count, int adapter) {
      const float* rows[kBlock];
      for (int64_t q = 0; q < kBlock; ++q) {
        rows[q] = tile + (groups.row(pos + std::min(q, count - 1)) - row0) * n;
      }
      project_rows(rows, count, b32[adapter], n, r, ds_block.data());
      for (int64_t q = 0; q < count; ++q) {
        std::memcpy(dsp + groups.row(pos + q) * r, ds_block.data() + q * r, r * sizeof(float));
      }
    });
  });
  Scratch zeros(n, 0.0f);
  parallel_for(n, kColumnGrain, [&](int64_t c0, int64_t c1, int) {
    for_each_block(groups, 0, size, [&](int64_t pos, int64_t count, int adapter) {
      const float* rows[kBlock];
      const float* coefs[kBlock];
      for (int64_t q = 0; q < kBlock; ++q) {
        const int64_t row = groups.row(pos + std::min(q, count - 1));
        rows[q] = q < count ? tile + (row - row0) * n + c0 : zeros.data();
        coefs[q] = hp + row * r;
      }
      accumulate_outer(db[adapter] + c0, n, coefs, count, rows, r, c1 - c0);
    });
  });
}

// dS = c_id * dY @ B_id^T, dB_i = c_i * h_i^T @ dY_i: two rank-r products over dY, no
// mask. Each run of rows of one adapter that is the whole tile or long (kBlasRun) is
// two BLAS GEMMs on its row range (without ids: the whole tile, always); the other
// rows go to the row kernels. c multiplies the (small) results, not the BLAS's alpha:
// with alpha = 0 a BLAS skips the product, and c = 0 must give 0 * inf = NaN as
// plain MLX does.
template <typename T>
void low_rank_grad_impl(const mx::array& dy, const mx::array& h, const mx::array& b, float scale,
                        Routing route, mx::array& ds, mx::array& db) {
  const int64_t m = dy.shape(0), n = dy.shape(1), r = h.shape(1);
  const AdapterRows adapters(route.ids, adapter_count(b), m);
  const AdapterScales c(scale, route.scales);
  const AdapterFloats b32(b, adapters);  // (r, N) each
  // dB_i accumulates in float32: in dB itself when it is float32, else in scratch.
  const bool in_place = db.dtype() == mx::float32;
  Scratch db32(in_place ? 0 : adapters.used_count() * r * n);
  std::vector<float*> dbs(adapters.count(), nullptr);
  for (int64_t i = 0; i < adapters.count(); ++i) {
    if (adapters.used(i)) {
      dbs[i] = in_place ? db.data<float>() + i * r * n : db32.data() + adapters.slot(i) * r * n;
      std::fill(dbs[i], dbs[i] + r * n, 0.0f);
    } else if (in_place) {
      std::fill(db.data<float>() + i * r * n, db.data<float>() + (i + 1) * r * n, 0.0f);
    }
  }
  float* dsp = ds.data<float>();
  const float* hp = h.data<float>();
  for_each_float_tile(dy.data<T>(), m, n, [&](int64_t row0, int64_t rows, const float* tile) {
    std::vector<int32_t> scattered;
    for (int64_t s = 0, e = 0; s < rows; s = e) {
      const int id = adapters.adapter(row0 + s);
      for (e = s + 1; e < rows && adapters.adapter(row0 + e) == id; ++e) {
      }
      if (id < 0) {
        std::fill(dsp + (row0 + s) * r, dsp + (row0 + e) * r, 0.0f);
      } else if (e - s == rows || e - s >= kBlasRun) {
        sgemm(false, true, e - s, r, n, 1.0f, tile + s * n, n, b32[id], n, 0.0f,
              dsp + (row0 + s) * r, r);
        sgemm(true, false, r, n, e - s, 1.0f, hp + (row0 + s) * r, r, tile + s * n, n, 1.0f,
              dbs[id], n);
      } else {
        for (int64_t i = s; i < e; ++i) {
          scattered.push_back(static_cast<int32_t>(row0 + i));
        }
      }
    }
    if (!scattered.empty()) {
      low_rank_rows(RowGroups(adapters, scattered), tile, row0, n, r, hp, b32, dsp, dbs);
    }
  });
  for (int64_t row = 0; row < m; ++row) {
    const int id = adapters.adapter(row);
    for (int64_t j = 0; id >= 0 && j < r; ++j) {
      dsp[row * r + j] *= c(id);
    }
  }
  for (int64_t i = 0; i < adapters.count(); ++i) {
    for (int64_t e = 0; adapters.used(i) && e < r * n; ++e) {
      dbs[i][e] *= c(i);
    }
  }
  if (!in_place) {
    store_adapters(db, adapters, db32.data(), r * n);
  }
}

// dA_i = (mask ⊙ x_i)^T @ dS_i in one pass over x: each worker owns a slab of x's
// columns, accumulates dA_i^T for it (one accumulator per used adapter) over blocks
// of rows of one adapter, and needs no reduction.
template <typename T>
void down_grad_impl(const mx::array& x, const mx::array& ds, const mx::array* key, float p,
                    const mx::array* ids, mx::array& da) {
  const int64_t m = x.shape(0), k = x.shape(1), r = ds.shape(1);
  const Dropout d = dropout_from(p, key);
  const AdapterRows adapters(ids, adapter_count(da), m);
  const RowGroups groups(adapters, 0, m);
  const int64_t used = adapters.used_count();
  Scratch zeros(k, 0.0f);
  const T* xp = x.data<T>();
  const float* dsp = ds.data<float>();
  dispatch_float(da.dtype(), [&](auto tag) {
    using U = decltype(tag);
    U* dap = da.data<U>();
    parallel_for(k, kColumnGrain, [&](int64_t k0, int64_t k1, int) {
      const int64_t len = k1 - k0;
      Scratch acc_t(used * r * len, 0.0f);  // (r, len) per used adapter: this slab of dA_i^T
      Scratch buf(kBlock * len);
      float* acc = acc_t.data();
      for_each_block(groups, 0, m, [&](int64_t pos, int64_t count, int adapter) {
        if (adapter < 0) {
          return;
        }
        const float* xr[kBlock];
        const float* coefs[kBlock];
        for (int64_t q = 0; q < kBlock; ++q) {
          const int64_t row = groups.row(pos + std::min(q, count - 1));
          xr[q] = q < count ? x_row(xp, k, row, k0, len, d, buf.data() + q * len) : zeros.data();
          coefs[q] = dsp + row * r;
        }
        accumulate_outer(acc + adapters.slot(adapter) * r * len, len, coefs, count, xr, r, len);
      });
      // This slab of each dA_i, straight into the output: rows [k0, k1), zeros if unused.
      for (int64_t i = 0; i < adapters.count(); ++i) {
        U* dst = dap + (i * k + k0) * r;
        if (!adapters.used(i)) {
          std::fill(dst, dst + len * r, U(0.0f));
          continue;
        }
        const float* src = acc + adapters.slot(i) * r * len;
        for (int64_t kk = 0; kk < len; ++kk) {
          for (int64_t j = 0; j < r; ++j) {
            dst[kk * r + j] = static_cast<U>(src[j * len + kk]);
          }
        }
      }
    });
  });
}

// Row i of the masked rank-r term of dX, mask ⊙ (dS @ A_id^T), into row (length K):
// zeros for a row on no adapter.
void masked_rank_r_row(float* row, const float* ds_row, const AdapterFloats& a_t, int id, int64_t k,
                       int64_t r, int64_t i, const Dropout& d, const float* zeros) {
  if (id < 0) {
    std::fill(row, row + k, 0.0f);
    return;
  }
  combine_rows(row, ds_row, 1, a_t[id], k, r, k, nullptr, zeros);
  if (d.active) {
    dropout_row(row, row, k, uint64_t(i) * uint64_t(k), d);
  }
}

// dX = dY @ W + mask ⊙ (dS @ A_id^T): the masked rank-r term is written row by row
// (one write pass, mask applied while the row is in cache), then the GEMM
// accumulates onto it.
template <typename T>
void input_grad_impl(const mx::array& dy, const mx::array& w, const mx::array& ds,
                     const mx::array& a, const mx::array* key, float p, const mx::array* ids,
                     mx::array& dx) {
  const int64_t m = dy.shape(0), n = dy.shape(1), k = w.shape(1), r = adapter_dim(a, 1);
  const Dropout d = dropout_from(p, key);
  const AdapterRows adapters(ids, adapter_count(a), m);
  AdapterFloats a_t(a, adapters, /*transpose=*/true);  // (r, K) each
  Scratch zeros(k, 0.0f);
  const float* dsp = ds.data<float>();
  auto init = [&](int64_t row0, int64_t rows, float* acc) {
    parallel_for(rows, kRowGrain, [&](int64_t i0, int64_t i1, int) {
      for (int64_t i = row0 + i0; i < row0 + i1; ++i) {
        masked_rank_r_row(acc + (i - row0) * k, dsp + i * r, a_t, adapters.adapter(i), k, r, i, d,
                          zeros.data());
      }
    });
  };
  gemm_onto(dy.data<T>(), w.data<T>(), /*transpose_w=*/false, m, n, k, dx.data<T>(), init);
}

// dX = base + mask ⊙ (dS @ A_id^T), dX's rows written once (dX may share base's buffer).
template <typename T>
void input_grad_onto_impl(const mx::array& base, const mx::array& ds, const mx::array& a,
                          const mx::array* key, float p, const mx::array* ids, mx::array& dx) {
  const int64_t m = ds.shape(0), k = adapter_dim(a, 0), r = adapter_dim(a, 1);
  const Dropout d = dropout_from(p, key);
  const AdapterRows adapters(ids, adapter_count(a), m);
  AdapterFloats a_t(a, adapters, /*transpose=*/true);  // (r, K) each
  Scratch zeros(k, 0.0f);
  const float* dsp = ds.data<float>();
  const T* bp = base.data<T>();
  T* out = dx.data<T>();
  parallel_for(m, kRowGrain, [&](int64_t i0, int64_t i1, int) {
    Scratch scratch(k);
    float* row = scratch.data();
    for (int64_t i = i0; i < i1; ++i) {
      masked_rank_r_row(row, dsp + i * r, a_t, adapters.adapter(i), k, r, i, d, zeros.data());
      for (int64_t kk = 0; kk < k; ++kk) {
        out[i * k + kk] = static_cast<T>(static_cast<float>(bp[i * k + kk]) + row[kk]);
      }
    }
  });
}

}  // namespace

#define MFL_DISPATCH(array, call)                 \
  dispatch_float((array).dtype(), [&](auto tag) { \
    using T = decltype(tag);                      \
    call;                                         \
  })

void low_rank_grad(const mx::array& dy, const mx::array& h, const mx::array& b, float scale,
                   Routing route, mx::array& ds, mx::array& db) {
  MFL_DISPATCH(dy, low_rank_grad_impl<T>(dy, h, b, scale, route, ds, db));
}

void down_grad(const mx::array& x, const mx::array& ds, const mx::array* key, float p,
               const mx::array* ids, mx::array& da) {
  MFL_DISPATCH(x, down_grad_impl<T>(x, ds, key, p, ids, da));
}

void input_grad(const mx::array& dy, const mx::array& w, const mx::array& ds, const mx::array& a,
                const mx::array* key, float p, const mx::array* ids, mx::array& dx) {
  MFL_DISPATCH(dy, input_grad_impl<T>(dy, w, ds, a, key, p, ids, dx));
}

void input_grad_onto(const mx::array& base, const mx::array& ds, const mx::array& a,
                     const mx::array* key, float p, const mx::array* ids, mx::array& dx) {
  MFL_DISPATCH(base, input_grad_onto_impl<T>(base, ds, a, key, p, ids, dx));
}

#undef MFL_DISPATCH

}  // namespace mfl::cpu
