"""The fused op's GPU kernel bodies, each written once for CUDA, Metal and OpenCL C.

The names a body may use are listed in ``dialects.py``. Every body:

- reduces deterministically: each output is summed by one thread in a fixed order, and
  what a group cannot finish alone goes to a partial buffer that ``SUM_PARTS`` adds up
  in order (no float atomics, so the same inputs give bitwise the same outputs);
- accumulates in float32 and indexes memory with 64-bit integers;
- reads and writes the M x K and M x N arrays coalesced, 4 elements per thread
  (``MFL_LOAD4``/``MFL_STORE4``) when rows are a multiple of 4 long, else one;
- walks its tiles with a group-stride loop, so the grid (``geometry.py``) stays small
  for any M*K, N or K;
- applies dropout by recomputing the mask from ``(key, index_base + flat index)`` with
  ``lora_dropout.h`` (``index_base`` is 0 in the op; tests use it to reach indices past
  2^32 without a 2^32-element array).

Notation: x (M, K) and dY (M, N) of element type T; A (K, R), B (R, N), h (M, R),
dS (M, R) float32; m the dropout multipliers; c the scale.
"""

# The dropout mask state and the multiplier of flat element `index` (1 at p = 0).
_MASK = """
const float mfl_p = MFL_SCALAR(dropout);
const uint64_t mfl_base = MFL_SCALAR(index_base);
const uint32_t mfl_threshold = mfl_keep_threshold(mfl_p);
const float mfl_keep = mfl_keep_scale(mfl_p);
#define MFL_MULT(index) (mfl_p > 0.0f ? mfl_dropout_multiplier(mfl_dropout_bits(key[0], key[1], \\
    (uint32_t)(mfl_base + (index)), (uint32_t)((mfl_base + (index)) >> 32)), mfl_threshold, mfl_keep) : 1.0f)
"""

# mask[i] = m of flat element i of an array of `size` elements (float32).
# Memory: writes the mask once; reads nothing else.
DROPOUT_MASK = (
    _MASK
    + """
const uint64_t elements = MFL_SCALAR(size);
const uint64_t stride = (uint64_t)(MFL_GROUPS_X) * TG;
for (uint64_t i = (uint64_t)(MFL_GROUP_X) * TG + MFL_TID; i < elements; i += stride) {
  mask[i] = MFL_MULT(i);
}
"""
)

# h = (m * x) @ A, float32 (the op applies c in the up-projection's GEMM).
# A group owns TM rows and walks K in steps of TK: the masked x tile and the A tile sit in
# shared memory (x read coalesced along K, one hash per element), each thread keeps P of
# the tile's TM*R outputs in registers across the walk.
# Memory: reads x once (M*K), A once per row tile (from cache), writes h (M*R floats).
DOWN_PROJ = (
    _MASK
    + """
const int64_t rows = x_shape[0];
const int64_t cols = x_shape[1];
const uint32_t tid = MFL_TID;
MFL_SHARED float xs[TM * (TK + 1)];
MFL_SHARED float as_tile[TK * R];
const int64_t tiles = (rows + TM - 1) / TM;
const bool vec4 = ((cols % 4) | (TK % 4)) == 0 && MFL_VEC_ALIGNED(x);  // 4-wide loads keep to rows
for (int64_t tile = MFL_GROUP_X; tile < tiles; tile += MFL_GROUPS_X) {
  const int64_t row0 = tile * TM;
  float acc[P];
  for (int o = 0; o < P; ++o) {
    acc[o] = 0.0f;
  }
  for (int64_t k0 = 0; k0 < cols; k0 += TK) {
    for (uint32_t s = tid * (vec4 ? 4 : 1); s < TM * TK; s += TG * (vec4 ? 4 : 1)) {
      const int64_t i = row0 + s / TK;
      const int64_t k = k0 + s % TK;
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (i < rows && k < cols) {
        const uint64_t index = (uint64_t)(i * cols + k);
        if (vec4) {
          MFL_LOAD4(x, index, v);
        } else {
          v[0] = MFL_LOAD(x, index);
        }
        for (int q = 0; q < 4; ++q) {  // unrolled: v[] stays in registers
          if (q >= (vec4 ? 4 : 1)) break;
          v[q] *= MFL_MULT(index + q);
        }
      }
      for (int q = 0; q < 4; ++q) {  // unrolled: v[] stays in registers
        if (q >= (vec4 ? 4 : 1)) break;
        xs[(s / TK) * (TK + 1) + s % TK + q] = v[q];
      }
    }
    for (uint32_t s = tid; s < TK * R; s += TG) {
      const int64_t k = k0 + s / R;
      as_tile[s] = k < cols ? a[k * R + s % R] : 0.0f;
    }
    MFL_BARRIER();
    for (int o = 0; o < P; ++o) {
      const uint32_t out = tid + o * TG;
      if (out < TM * R) {
        const uint32_t li = out / R;
        const uint32_t j = out % R;
        float sum = acc[o];
        for (int kk = 0; kk < TK; ++kk) {
          sum += xs[li * (TK + 1) + kk] * as_tile[kk * R + j];
        }
        acc[o] = sum;
      }
    }
    MFL_BARRIER();
  }
  for (int o = 0; o < P; ++o) {
    const uint32_t out = tid + o * TG;
    const int64_t i = row0 + out / R;
    if (out < TM * R && i < rows) {
      h[i * R + out % R] = acc[o];
    }
  }
}
"""
)

# One pass over dY for both rank-r products (partials; SUM_PARTS finishes them):
#   ds_part[cb, i, :] = dY[i, cb's columns] @ B[:, cb's columns]^T    (column block cb)
#   db_part[s, :, n]  = h[s's rows, :]^T @ dY[s's rows, n]             (row split s)
# A group owns a column block of TN columns (grid x) and a split of the rows (grid y); it
# walks its rows in tiles of TM with the dY tile, h tile and B tile in shared memory.
# Memory: reads dY once (M*N), h once per column block (M*R each, from cache), writes
# ceil(N/TN)*M*R + S*R*N partial floats (read once more by SUM_PARTS).
LOW_RANK_GRAD = """
const int64_t rows = dy_shape[0];
const int64_t cols = dy_shape[1];
const uint32_t tid = MFL_TID;
MFL_SHARED float dys[TM * (TN + 1)];
MFL_SHARED float hs[TM * R];
MFL_SHARED float bs[R * (TN + 1)];
const int64_t blocks = (cols + TN - 1) / TN;
const int64_t split = MFL_GROUP_Y;
const int64_t splits = MFL_GROUPS_Y;
const int64_t rows_per_split = ((rows + splits * TM - 1) / (splits * TM)) * TM;
const int64_t r0 = split * rows_per_split;
const int64_t r1 = r0 + rows_per_split < rows ? r0 + rows_per_split : rows;
const bool vec4 = ((cols % 4) | (TN % 4)) == 0 && MFL_VEC_ALIGNED(dy);  // 4-wide loads keep to rows
for (int64_t cb = MFL_GROUP_X; cb < blocks; cb += MFL_GROUPS_X) {
  const int64_t n0 = cb * TN;
  MFL_BARRIER();
  for (uint32_t s = tid; s < R * TN; s += TG) {
    const int64_t n = n0 + s % TN;
    bs[(s / TN) * (TN + 1) + s % TN] = n < cols ? b[(int64_t)(s / TN) * cols + n] : 0.0f;
  }
  float acc[P1];
  for (int o = 0; o < P1; ++o) {
    acc[o] = 0.0f;
  }
  for (int64_t row0 = r0; row0 < r1; row0 += TM) {
    for (uint32_t s = tid * (vec4 ? 4 : 1); s < TM * TN; s += TG * (vec4 ? 4 : 1)) {
      const int64_t i = row0 + s / TN;
      const int64_t n = n0 + s % TN;
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (i < r1 && n < cols) {
        if (vec4) {
          MFL_LOAD4(dy, (uint64_t)(i * cols + n), v);
        } else {
          v[0] = MFL_LOAD(dy, (uint64_t)(i * cols + n));
        }
      }
      for (int q = 0; q < 4; ++q) {  // unrolled: v[] stays in registers
        if (q >= (vec4 ? 4 : 1)) break;
        dys[(s / TN) * (TN + 1) + s % TN + q] = v[q];
      }
    }
    for (uint32_t s = tid; s < TM * R; s += TG) {
      const int64_t i = row0 + s / R;
      hs[s] = i < r1 ? h[i * R + s % R] : 0.0f;
    }
    MFL_BARRIER();
    for (int o = 0; o < P1; ++o) {
      const uint32_t out = tid + o * TG;
      if (out < R * TN) {
        const uint32_t j = out / TN;
        const uint32_t nn = out % TN;
        float sum = acc[o];
        for (int li = 0; li < TM; ++li) {
          sum += hs[li * R + j] * dys[li * (TN + 1) + nn];
        }
        acc[o] = sum;
      }
    }
    for (int o = 0; o < P2; ++o) {
      const uint32_t out = tid + o * TG;
      const int64_t i = row0 + out / R;
      if (out < TM * R && i < r1) {
        const uint32_t li = out / R;
        const uint32_t j = out % R;
        float sum = 0.0f;
        for (int nn = 0; nn < TN; ++nn) {
          sum += dys[li * (TN + 1) + nn] * bs[j * (TN + 1) + nn];
        }
        ds_part[(cb * rows + i) * R + j] = sum;
      }
    }
    MFL_BARRIER();
  }
  for (int o = 0; o < P1; ++o) {
    const uint32_t out = tid + o * TG;
    const int64_t n = n0 + out % TN;
    if (out < R * TN && n < cols) {
      db_part[(split * R + out / TN) * cols + n] = acc[o];
    }
  }
}
"""

# One pass over x for both products that need the mask (one hash per element):
#   da_part[s, k, :] = (m * x)[s's rows, k]^T @ dS[s's rows, :]      (row split s)
#   e[i, k]          = m[i, k] * (dS[i, :] . A[k, :])                (in T, dX's epilogue)
# A group owns a column block of TK columns (grid x) and a split of the rows (grid y); the
# masked x tile, its multipliers, the dS tile and the block's A rows sit in shared memory.
# Memory: reads x once (M*K), writes e once (M*K), reads dS once per column block (from
# cache), writes S*K*R partial floats.
DOWN_GRAD = (
    _MASK
    + """
const int64_t rows = x_shape[0];
const int64_t cols = x_shape[1];
const uint32_t tid = MFL_TID;
MFL_SHARED float xs[TM * (TK + 1)];
MFL_SHARED float ms[TM * (TK + 1)];
MFL_SHARED float dss[TM * R];
MFL_SHARED float as_tile[TK * (R + 1)];
const int64_t blocks = (cols + TK - 1) / TK;
const int64_t split = MFL_GROUP_Y;
const int64_t splits = MFL_GROUPS_Y;
const int64_t rows_per_split = ((rows + splits * TM - 1) / (splits * TM)) * TM;
const int64_t r0 = split * rows_per_split;
const int64_t r1 = r0 + rows_per_split < rows ? r0 + rows_per_split : rows;
const bool vec4 = ((cols % 4) | (TK % 4)) == 0 && MFL_VEC_ALIGNED(x) && MFL_VEC_ALIGNED(e);  // keep to rows
const uint32_t width = vec4 ? 4 : 1;
for (int64_t cb = MFL_GROUP_X; cb < blocks; cb += MFL_GROUPS_X) {
  const int64_t k0 = cb * TK;
  MFL_BARRIER();
  for (uint32_t s = tid; s < TK * R; s += TG) {
    const int64_t k = k0 + s / R;
    as_tile[(s / R) * (R + 1) + s % R] = k < cols ? a[k * R + s % R] : 0.0f;
  }
  float acc[P1];
  for (int o = 0; o < P1; ++o) {
    acc[o] = 0.0f;
  }
  for (int64_t row0 = r0; row0 < r1; row0 += TM) {
    for (uint32_t s = tid * width; s < TM * TK; s += TG * width) {
      const int64_t i = row0 + s / TK;
      const int64_t k = k0 + s % TK;
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      float mult[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (i < r1 && k < cols) {
        const uint64_t index = (uint64_t)(i * cols + k);
        if (vec4) {
          MFL_LOAD4(x, index, v);
        } else {
          v[0] = MFL_LOAD(x, index);
        }
        for (int q = 0; q < 4; ++q) {  // unrolled: v[] stays in registers
          if (q >= (int)width) break;
          mult[q] = MFL_MULT(index + q);
        }
      }
      for (int q = 0; q < 4; ++q) {  // unrolled: v[] stays in registers
        if (q >= (int)width) break;
        xs[(s / TK) * (TK + 1) + s % TK + q] = v[q] * mult[q];
        ms[(s / TK) * (TK + 1) + s % TK + q] = mult[q];
      }
    }
    for (uint32_t s = tid; s < TM * R; s += TG) {
      const int64_t i = row0 + s / R;
      dss[s] = i < r1 ? ds[i * R + s % R] : 0.0f;
    }
    MFL_BARRIER();
    for (int o = 0; o < P1; ++o) {
      const uint32_t out = tid + o * TG;
      if (out < TK * R) {
        const uint32_t kk = out / R;
        const uint32_t j = out % R;
        float sum = acc[o];
        for (int li = 0; li < TM; ++li) {
          sum += xs[li * (TK + 1) + kk] * dss[li * R + j];
        }
        acc[o] = sum;
      }
    }
    for (uint32_t out = tid * width; out < TM * TK; out += TG * width) {
      const uint32_t li = out / TK;
      const uint32_t kk = out % TK;
      const int64_t i = row0 + li;
      const int64_t k = k0 + kk;
      if (i < r1 && k < cols) {
        float v[4];
        for (int q = 0; q < 4; ++q) {  // unrolled: v[] stays in registers
          if (q >= (int)width) break;
          float dot = 0.0f;
          for (int j = 0; j < R; ++j) {
            dot += dss[li * R + j] * as_tile[(kk + q) * (R + 1) + j];
          }
          v[q] = ms[li * (TK + 1) + kk + q] * dot;
        }
        if (vec4) {
          MFL_STORE4(e, (uint64_t)(i * cols + k), v);
        } else {
          MFL_STORE(e, (uint64_t)(i * cols + k), v[0]);
        }
      }
    }
    MFL_BARRIER();
  }
  for (int o = 0; o < P1; ++o) {
    const uint32_t out = tid + o * TG;
    const int64_t k = k0 + out / R;
    if (out < TK * R && k < cols) {
      da_part[(split * cols + k) * R + out % R] = acc[o];
    }
  }
}
"""
)

# out[i] = scale * sum over s of parts[s, i], in the order s = 0, 1, ...: the fixed-order
# second pass of the reductions above. Memory: reads the partials once, writes out once.
SUM_PARTS = """
const int64_t count = parts_shape[0];
const uint64_t size = (uint64_t)(parts_shape[1]) * (uint64_t)(parts_shape[2]);
const float c = MFL_SCALAR(scale);
const uint64_t stride = (uint64_t)(MFL_GROUPS_X) * TG;
for (uint64_t i = (uint64_t)(MFL_GROUP_X) * TG + MFL_TID; i < size; i += stride) {
  float sum = 0.0f;
  for (int64_t s = 0; s < count; ++s) {
    sum += parts[(uint64_t)(s) * size + i];
  }
  out[i] = c * sum;
}
"""

# name: (body, input names, output names)
KERNELS = {
    "dropout_mask": (DROPOUT_MASK, ["key", "dropout", "index_base", "size"], ["mask"]),
    "down_proj": (DOWN_PROJ, ["x", "a", "key", "dropout", "index_base"], ["h"]),
    "low_rank_grad": (LOW_RANK_GRAD, ["dy", "h", "b"], ["ds_part", "db_part"]),
    "down_grad": (DOWN_GRAD, ["x", "ds", "a", "key", "dropout", "index_base"], ["da_part", "e"]),
    "sum_parts": (SUM_PARTS, ["parts", "scale"], ["out"]),
}
