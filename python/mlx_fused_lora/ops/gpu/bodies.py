"""The fused op's GPU kernel bodies, each written once for CUDA, Metal and OpenCL C.

The names a body may use are listed in ``dialects.py``; the tiles and grids are
``geometry.py``'s (each body's template parameters are documented there). Every body:

- computes its rank-r products as register tiles: a thread keeps a small block of
  outputs (its rows' r accumulators, or a chunk of them) in registers, reads its own
  operand as one 16-byte shared load per 4 values and the other operand (A, B, h or dS)
  as 16-byte loads that every thread of a quarter-warp shares (broadcasts): at least 4
  FMAs per 16-byte load (``geometry.fmas_per_load``);
- lays out its shared tiles with row strides of an odd number of 16-byte words, so the
  8 threads of a quarter-warp that read 8 rows hit 32 distinct banks;
- reduces deterministically: each output is summed in a fixed order, within a group by
  a fixed pairwise tree over the lanes that split a reduction, and across groups through
  a partial buffer that ``SUM_PARTS`` adds up in order (no float atomics, so the same
  inputs give bitwise the same outputs);
- accumulates in float32 and indexes memory with 64-bit integers;
- reads and writes the M x K and M x N arrays coalesced, 4 elements per access
  (``MFL_QUAD_LOAD``/``MFL_QUAD_STORE``: one vector access where the row length and the
  pointer allow it, else element-wise);
- walks its tiles with a group-stride loop, so the grid stays small for any M*K, N or K;
- applies dropout by recomputing the mask from ``(key, index_base + flat index)`` with
  ``lora_dropout.h`` (``index_base`` is 0 in the op; tests use it to reach indices past
  2^32 without a 2^32-element array).

Notation: x (M, K) and dY (M, N) of element type T; A (K, R), B (R, N), h and dS (M, R)
float32; m the dropout multipliers; c the scale.

Mixed adapters (n adapters stacked, ``lora_a (n, K, r)``, ``lora_b (n, r, N)``, an id per
row): the single-adapter op is the case n = 1 of the same bodies. The op groups the rows
by adapter on the device (``grouping.py``: a row order and a table of segments, each a
run of rows of one adapter), so every row tile (down_proj) and every row split (the
reductions) holds rows of one adapter: each reads its adapter's index once, where it
starts (``a_base``, ``b_base``), reads its rows through the order (``MFL_ROW``), and
the shared A/B tiles and register tiles stay as they are. A split's partial goes to its
own slot and ``SUM_PARTS`` adds each adapter's slots (an adapter no row uses: zeros). A
segment of rows on the base alone (id -1, or an id out of range: the op makes those rows
NaN) writes zeros for its rows and no partial. With ``MIXED = 0`` the order is the
identity and the segments are the fixed tiles and splits of adapter 0 (``dialects.py``).
"""

from .backward_bodies import DOWN_GRAD, LOW_RANK_GRAD
from .dialects import MASK as _MASK
from .dialects import SEGMENTS as _SEGMENTS

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

# h_part[s] = (m * x)[:, split s of K] @ A[split s of K, :], float32 (SUM_PARTS adds the
# splits; the op applies c in the up-projection).
# Grid: x over row tiles of at most TM = RT*TR rows (segments of one adapter), y over S
# splits of K (split-K: enough groups at small M). A thread owns TR rows (rt, rt+RT, ...)
# x RC ranks (its chunk) and a lane of 4 of each TK-wide step of K; per step it reads its
# rows' 4 x values (TR loads) and the 4 A rows of its chunk (RC broadcast loads) for
# 4*TR*RC FMAs. The lanes' sums meet in a pairwise tree in shared memory once per tile.
# Memory: reads x once (M*K), A once per row tile (from cache), writes S*M*R floats.
DOWN_PROJ = (
    _MASK
    + _SEGMENTS
    + """
const int64_t rows = x_shape[0];
const int64_t cols = x_shape[1];
const uint32_t tid = MFL_TID;
const int TM = RT * TR;
const int TK = 4 * KL;
const int XOFF = TM * XS;
MFL_SHARED_FLOATS(smem, SMEM);
const uint32_t rt = tid % RT;
const uint32_t chunk = (tid / RT) % CH;
const uint32_t lane = tid / (RT * CH);
const int64_t split = MFL_GROUP_Y;
const int64_t span = ((cols + MFL_GROUPS_Y * TK - 1) / (MFL_GROUPS_Y * TK)) * TK;
const int64_t k_end = (split + 1) * span < cols ? (split + 1) * span : cols;
const bool wide = cols % 4 == 0 && MFL_VEC_ALIGNED(x);
const int64_t tiles = MIXED ? segments_shape[0] : (rows + TM - 1) / TM;
for (int64_t tile = MFL_GROUP_X; tile < tiles; tile += MFL_GROUPS_X) {
  int64_t p0, p1;
  int adapter;
  MFL_SEGMENT(tile, TM, rows, p0, p1, adapter);
  const int64_t a_base = (int64_t)(adapter > 0 ? adapter : 0) * cols * R;
  // rows on the base alone: h = 0, no step of K
  const int64_t k_stop = adapter >= 0 ? k_end : split * span;
  float acc[TR][RC];
  MFL_UNROLL for (int q = 0; q < TR; ++q) {
    MFL_UNROLL for (int j = 0; j < RC; ++j) {
      acc[q][j] = 0.0f;
    }
  }
  for (int64_t k0 = split * span; k0 < k_stop; k0 += TK) {
    for (uint32_t s = tid; s < TM * KL; s += TG) {
      const int64_t pos = p0 + s / KL;
      const int64_t k = k0 + 4 * (s % KL);
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (pos < p1 && k < cols) {
        const uint64_t index = (uint64_t)(MFL_ROW(pos) * cols + k);
        const int64_t count = cols - k;
        MFL_QUAD_LOAD(x, index, count, wide, v);
        MFL_UNROLL for (int q = 0; q < 4; ++q) {
          if (q < count) {
            v[q] *= MFL_MULT(index + q);
          }
        }
      }
      MFL_SHARED_STORE4(smem, (s / KL) * XS + 4 * (s % KL), v);
    }
    for (uint32_t s = tid; s < TK * CH * RC; s += TG) {
      const int64_t k = k0 + s / (CH * RC);
      const uint32_t j = s % (CH * RC);
      smem[XOFF + (s / (CH * RC)) * AS + j] = k < cols && j < R ? a[a_base + k * R + j] : 0.0f;
    }
    MFL_BARRIER();
    float xv[TR][4];
    MFL_UNROLL for (int q = 0; q < TR; ++q) {
      MFL_SHARED_LOAD4(smem, (rt + RT * q) * XS + 4 * lane, xv[q]);
    }
    MFL_UNROLL for (int u = 0; u < 4; ++u) {
      MFL_UNROLL for (int j4 = 0; j4 < RC; j4 += 4) {
        float av[4];
        MFL_SHARED_LOAD4(smem, XOFF + (4 * lane + u) * AS + chunk * RC + j4, av);
        MFL_UNROLL for (int q = 0; q < TR; ++q) {
          MFL_UNROLL for (int e = 0; e < 4; ++e) {
            acc[q][j4 + e] += xv[q][u] * av[e];
          }
        }
      }
    }
    MFL_BARRIER();
  }
  for (uint32_t pair = KL / 2; pair > 0; pair /= 2) {
    if (lane >= pair && lane < 2 * pair) {
      MFL_UNROLL for (int q = 0; q < TR; ++q) {
        MFL_UNROLL for (int j4 = 0; j4 < RC; j4 += 4) {
          const float mine[4] = {acc[q][j4], acc[q][j4 + 1], acc[q][j4 + 2], acc[q][j4 + 3]};
          MFL_SHARED_STORE4(smem, ((lane - pair) * TM + rt + RT * q) * AS + chunk * RC + j4, mine);
        }
      }
    }
    MFL_BARRIER();
    if (lane < pair) {
      MFL_UNROLL for (int q = 0; q < TR; ++q) {
        MFL_UNROLL for (int j4 = 0; j4 < RC; j4 += 4) {
          float other[4];
          MFL_SHARED_LOAD4(smem, (lane * TM + rt + RT * q) * AS + chunk * RC + j4, other);
          MFL_UNROLL for (int e = 0; e < 4; ++e) {
            acc[q][j4 + e] += other[e];
          }
        }
      }
    }
    MFL_BARRIER();
  }
  if (lane == 0) {
    MFL_UNROLL for (int q = 0; q < TR; ++q) {
      const int64_t pos = p0 + rt + RT * q;
      MFL_UNROLL for (int j = 0; j < RC; ++j) {
        if (pos < p1 && chunk * RC + j < R) {
          h_part[(split * rows + MFL_ROW(pos)) * R + chunk * RC + j] = acc[q][j];
        }
      }
    }
  }
}
"""
)

# out[a, i] = sum over the parts s of adapter a of parts[s, i], in the order s = 0, 1, ...:
# the fixed-order second pass of the reductions above. MIXED: adapter a's parts are
# [bounds[a + 1], bounds[a + 2]) (none: zeros); else one output summing every part.
# Memory: reads the partials once, writes out once.
SUM_PARTS = """
const int64_t count = parts_shape[0];
const uint64_t size = (uint64_t)(parts_shape[1]) * (uint64_t)(parts_shape[2]);
const uint64_t total = MIXED ? (uint64_t)(bounds_shape[0] - 2) * size : size;
const uint64_t stride = (uint64_t)(MFL_GROUPS_X) * TG;
for (uint64_t i = (uint64_t)(MFL_GROUP_X) * TG + MFL_TID; i < total; i += stride) {
  const int64_t adapter = (int64_t)(i / size);
  const uint64_t e = i - (uint64_t)(adapter) * size;
  const int64_t s0 = MIXED ? bounds[adapter + 1] : 0;
  const int64_t s1 = MIXED ? bounds[adapter + 2] : count;
  float sum = 0.0f;
  for (int64_t s = s0; s < s1; ++s) {
    sum += parts[(uint64_t)(s) * size + e];
  }
  out[i] = sum;
}
"""

# segments[s] = (first position, end position, adapter) of segment s of the rows grouped by
# adapter (grouping.py): class c (0: rows on the base alone, c > 0: adapter c - 1) holds
# positions [row_off[c], row_off[c + 1]) of the order, cut into segments of `length` rows
# (its last shorter) numbered from seg_off[c]; entries past the last are empty (0, 0, -1).
# A binary search over seg_off per entry. Memory: reads the two offset arrays (n + 2 each).
ROW_SEGMENTS = """
const int64_t classes = row_off_shape[0] - 1;
const int64_t used = seg_off[classes];
const int64_t len = MFL_SCALAR(length);
const uint64_t entries = MFL_SCALAR(size);
const uint64_t stride = (uint64_t)(MFL_GROUPS_X) * TG;
for (uint64_t i = (uint64_t)(MFL_GROUP_X) * TG + MFL_TID; i < entries; i += stride) {
  const int64_t s = (int64_t)(i);
  int64_t start = 0, end = 0, adapter = -1;
  if (s < used) {
    int64_t lo = 0, hi = classes - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (seg_off[mid] <= s) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    start = row_off[lo] + (s - seg_off[lo]) * len;
    end = start + len < row_off[lo + 1] ? start + len : row_off[lo + 1];
    adapter = lo - 1;
  }
  segments[3 * i] = (int)(start);
  segments[3 * i + 1] = (int)(end);
  segments[3 * i + 2] = (int)(adapter);
}
"""

# name: (body, input names, output names)
KERNELS = {
    "dropout_mask": (DROPOUT_MASK, ["key", "dropout", "index_base", "size"], ["mask"]),
    "down_proj": (DOWN_PROJ, ["x", "a", "key", "dropout", "index_base", "order", "segments"], ["h_part"]),
    "low_rank_grad": (LOW_RANK_GRAD, ["dy", "h", "b", "scales", "order", "segments"], ["ds_part", "db_part"]),
    "down_grad": (
        DOWN_GRAD,
        ["x", "ds", "a", "key", "dropout", "index_base", "order", "segments"],
        ["da_part", "e"],
    ),
    "sum_parts": (SUM_PARTS, ["parts", "bounds"], ["out"]),
    "row_segments": (ROW_SEGMENTS, ["row_off", "seg_off", "length", "size"], ["segments"]),
}
