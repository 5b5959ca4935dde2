"""The backward's GPU kernel bodies: low_rank_grad (dS, dB) and down_grad (dA, e).

Written to the rules of ``bodies.py`` (its module doc), in the names of ``dialects.py``.
Both walk row splits that are segments of rows of one adapter (``MFL_SEGMENT``): a
group takes every GROUPS_Y-th split, and for each its column blocks.
"""

from .dialects import MASK as _MASK
from .dialects import SEGMENTS as _SEGMENTS


def _row_lane_tree(acc, rc, lanes, groups, group):
    """The pairwise tree that sums, in shared memory, the register tiles `acc`[4][`rc`]
    of the `lanes` row lanes (rl) that share a thread's 4 columns (its `group` of `groups`)
    and rank chunk; row lane 0 ends with the sums. Once per split: its barriers are few."""
    return f"""
    for (uint32_t pair = {lanes} / 2; pair > 0; pair /= 2) {{
      if (rl >= pair && rl < 2 * pair) {{
        MFL_UNROLL for (int u = 0; u < 4; ++u) {{
          MFL_UNROLL for (int j = 0; j < {rc}; ++j) {{
            smem[(((rl - pair) * 4 + u) * RP + chunk * {rc} + j) * {groups} + {group}] = {acc}[u][j];
          }}
        }}
      }}
      MFL_BARRIER();
      if (rl < pair) {{
        MFL_UNROLL for (int u = 0; u < 4; ++u) {{
          MFL_UNROLL for (int j = 0; j < {rc}; ++j) {{
            {acc}[u][j] += smem[((rl * 4 + u) * RP + chunk * {rc} + j) * {groups} + {group}];
          }}
        }}
      }}
      MFL_BARRIER();
    }}
"""


# One pass over dY for both rank-r products (partials; SUM_PARTS finishes them):
#   ds_part[cb, i, :] = c * dY[i, cb's columns] @ B[:, cb's columns]^T    (column block cb)
#   db_part[s, :, n]  = c * h[s's rows, :]^T @ dY[s's rows, n]             (row split s)
# with B and c = scales[a] those of the split's adapter a (rows on the base alone: dS = 0,
# no partial).
# Grid: x over column blocks of TN = 4*NG columns, y over row splits; a group walks a
# split in row tiles of TM rows with the dY and h tiles and its block's B rows in shared
# memory.
# dB: a thread owns 4 columns (ng) x RCB ranks (its chunk) and reduces over the rows of
#   its row lane (rl, rl+RLB, ...): per row 1 dY load + RCB/4 broadcast h loads for 4*RCB
#   FMAs; the row lanes meet in a tree once per split.
# dS: a thread owns TRS rows x 4 ranks and reduces over its lane's quads of the block's
#   columns: per quad TRS dY loads + 4 broadcast B loads for 16*TRS FMAs; the SL lanes
#   meet in a tree once per row tile.
# Memory: reads dY once (M*N), h once per column block, writes ceil(N/TN)*M*R + S*R*N
# partial floats (read once more by SUM_PARTS). Used where the cost model (costs.py)
# finds it cheaper than two GEMMs (two passes over dY).
LOW_RANK_GRAD = (
    _SEGMENTS
    + """
const int64_t rows = dy_shape[0];
const int64_t cols = dy_shape[1];
const uint32_t tid = MFL_TID;
const int TN = 4 * NG;
const int RP = CHB * RCB;
const int YOFF = RP * BS;
const int HOFF = YOFF + TM * YS;
const int OT = (TM / TRS) * (RP / 4);
const int SL = TG / OT;
MFL_SHARED_FLOATS(smem, SMEM);
const uint32_t ng = tid % NG;
const uint32_t lane = tid / NG;
const uint32_t chunk = lane % CHB;
const uint32_t rl = lane / CHB;
const uint32_t rs = (tid % OT) % (TM / TRS);
const uint32_t rq = (tid % OT) / (TM / TRS);
const uint32_t sl = tid / OT;
const int64_t blocks = (cols + TN - 1) / TN;
const int64_t span = ((rows + MFL_GROUPS_Y * TM - 1) / (MFL_GROUPS_Y * TM)) * TM;
const int64_t splits = MIXED ? segments_shape[0] : MFL_GROUPS_Y;
const bool wide = cols % 4 == 0 && MFL_VEC_ALIGNED(dy);
for (int64_t split = MFL_GROUP_Y; split < splits; split += MFL_GROUPS_Y) {
  int64_t r0, r1;
  int adapter;
  MFL_SEGMENT(split, span, rows, r0, r1, adapter);
  const int64_t b_base = (int64_t)(adapter > 0 ? adapter : 0) * R * cols;
  const float c = scales[adapter > 0 ? adapter : 0];
  // rows on the base alone: dS = 0 (written below), no rows walked, no partial; no
  // branch skips a barrier (its barriers stay in uniform control flow everywhere)
  const int64_t r_stop = adapter >= 0 ? r1 : r0;
  for (int64_t cb = MFL_GROUP_X; cb < blocks; cb += MFL_GROUPS_X) {
    const int64_t n0 = cb * TN;
    MFL_BARRIER();
    if (adapter < 0) {
      for (int64_t s = tid; s < (r1 - r0) * R; s += TG) {
        ds_part[(cb * rows + MFL_ROW(r0 + s / R)) * R + s % R] = 0.0f;
      }
    }
    for (uint32_t s = tid; s < RP * TN; s += TG) {
      const int64_t n = n0 + s % TN;
      const uint32_t j = s / TN;
      smem[j * BS + s % TN] = n < cols && j < R ? b[b_base + (int64_t)(j) * cols + n] : 0.0f;
    }
    float db[4][RCB];
    MFL_UNROLL for (int u = 0; u < 4; ++u) {
      MFL_UNROLL for (int j = 0; j < RCB; ++j) {
        db[u][j] = 0.0f;
      }
    }
    for (int64_t row0 = r0; row0 < r_stop; row0 += TM) {
      for (uint32_t s = tid; s < TM * NG; s += TG) {
        const int64_t pos = row0 + s / NG;
        const int64_t n = n0 + 4 * (s % NG);
        float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (pos < r1 && n < cols) {
          MFL_QUAD_LOAD(dy, (uint64_t)(MFL_ROW(pos) * cols + n), cols - n, wide, v);
        }
        MFL_SHARED_STORE4(smem, YOFF + (s / NG) * YS + 4 * (s % NG), v);
      }
      for (uint32_t s = tid; s < TM * RP; s += TG) {
        const int64_t pos = row0 + s / RP;
        const uint32_t j = s % RP;
        smem[HOFF + (s / RP) * HS + j] = pos < r1 && j < R ? h[MFL_ROW(pos) * R + j] : 0.0f;
      }
      MFL_BARRIER();
      for (int li = rl; li < TM; li += RLB) {
        float dv[4];
        MFL_SHARED_LOAD4(smem, YOFF + li * YS + 4 * ng, dv);
        MFL_UNROLL for (int j4 = 0; j4 < RCB; j4 += 4) {
          float hv[4];
          MFL_SHARED_LOAD4(smem, HOFF + li * HS + chunk * RCB + j4, hv);
          MFL_UNROLL for (int u = 0; u < 4; ++u) {
            MFL_UNROLL for (int e = 0; e < 4; ++e) {
              db[u][j4 + e] += dv[u] * hv[e];
            }
          }
        }
      }
      float ds[TRS][4];
      MFL_UNROLL for (int q = 0; q < TRS; ++q) {
        MFL_UNROLL for (int u = 0; u < 4; ++u) {
          ds[q][u] = 0.0f;
        }
      }
      for (int n4 = sl; n4 < NG; n4 += SL) {
        float dv[TRS][4];
        MFL_UNROLL for (int q = 0; q < TRS; ++q) {
          MFL_SHARED_LOAD4(smem, YOFF + (rs + (TM / TRS) * q) * YS + 4 * n4, dv[q]);
        }
        MFL_UNROLL for (int u = 0; u < 4; ++u) {
          float bv[4];
          MFL_SHARED_LOAD4(smem, (4 * rq + u) * BS + 4 * n4, bv);
          MFL_UNROLL for (int q = 0; q < TRS; ++q) {
            MFL_UNROLL for (int e = 0; e < 4; ++e) {
              ds[q][u] += dv[q][e] * bv[e];
            }
          }
        }
      }
      MFL_BARRIER();
      for (uint32_t pair = SL / 2; pair > 0; pair /= 2) {
        if (sl >= pair && sl < 2 * pair) {
          MFL_UNROLL for (int q = 0; q < TRS; ++q) {
            MFL_SHARED_STORE4(smem, YOFF + ((sl - pair) * TM + rs + (TM / TRS) * q) * HS + 4 * rq, ds[q]);
          }
        }
        MFL_BARRIER();
        if (sl < pair) {
          MFL_UNROLL for (int q = 0; q < TRS; ++q) {
            float other[4];
            MFL_SHARED_LOAD4(smem, YOFF + (sl * TM + rs + (TM / TRS) * q) * HS + 4 * rq, other);
            MFL_UNROLL for (int u = 0; u < 4; ++u) {
              ds[q][u] += other[u];
            }
          }
        }
        MFL_BARRIER();
      }
      if (sl == 0) {
        MFL_UNROLL for (int q = 0; q < TRS; ++q) {
          const int64_t pos = row0 + rs + (TM / TRS) * q;
          MFL_UNROLL for (int u = 0; u < 4; ++u) {
            if (pos < r1 && 4 * rq + u < R) {
              ds_part[(cb * rows + MFL_ROW(pos)) * R + 4 * rq + u] = c * ds[q][u];
            }
          }
        }
      }
    }
    MFL_BARRIER();
"""
    + _row_lane_tree("db", "RCB", "RLB", "NG", "ng")
    + """    if (rl == 0 && adapter >= 0) {
      MFL_UNROLL for (int u = 0; u < 4; ++u) {
        const int64_t n = n0 + 4 * ng + u;
        MFL_UNROLL for (int j = 0; j < RCB; ++j) {
          if (n < cols && chunk * RCB + j < R) {
            db_part[(split * R + chunk * RCB + j) * cols + n] = c * db[u][j];
          }
        }
      }
    }
  }
}
"""
)

# One pass over x for both products that need the mask (one hash per element):
#   da_part[s, k, :] = (m * x)[s's rows, k]^T @ dS[s's rows, :]      (row split s)
#   e[i, k]          = m[i, k] * (dS[i, :] . A[k, :])                (in T, dX's epilogue)
# with A that of the split's adapter (rows on the base alone: e = 0, no partial).
# Grid: x over column blocks of TK = 4*KG columns, y over row splits; a group walks a
# split in row tiles of TM = (TG/KG)*TRE rows with the masked x tile, its multipliers and
# the dS tile in shared memory, and its block's A^T once per block.
# dA: a thread owns 4 columns (kg) x RC ranks (its chunk) and reduces over the rows of its
#   row lane (rl, rl+RL, ...): per row 1 x load + RC/4 broadcast dS loads for 4*RC FMAs;
#   the row lanes meet in a tree once per split.
# e: a thread owns TRE rows (lane, lane+TG/KG, ...) x 4 columns: per 4 ranks TRE
#   broadcast dS loads + 4 A^T loads for 16*TRE FMAs; every thread of the group works.
# Memory: reads x once (M*K), writes e once (M*K), reads dS once per column block (from
# cache), writes S*K*R partial floats.
DOWN_GRAD = (
    _MASK
    + _SEGMENTS
    + """
const int64_t rows = x_shape[0];
const int64_t cols = x_shape[1];
const uint32_t tid = MFL_TID;
const int L = TG / KG;
const int TM = L * TRE;
const int TK = 4 * KG;
const int RP = CH * RC;
const int MOFF = TM * XS;
const int DOFF = 2 * TM * XS;
const int AOFF = DOFF + TM * DS;
MFL_SHARED_FLOATS(smem, SMEM);
const uint32_t kg = tid % KG;
const uint32_t lane = tid / KG;
const uint32_t chunk = lane % CH;
const uint32_t rl = lane / CH;
const int64_t blocks = (cols + TK - 1) / TK;
const int64_t span = ((rows + MFL_GROUPS_Y * TM - 1) / (MFL_GROUPS_Y * TM)) * TM;
const int64_t splits = MIXED ? segments_shape[0] : MFL_GROUPS_Y;
const bool wide = cols % 4 == 0 && MFL_VEC_ALIGNED(x) && MFL_VEC_ALIGNED(e);
for (int64_t split = MFL_GROUP_Y; split < splits; split += MFL_GROUPS_Y) {
  int64_t r0, r1;
  int adapter;
  MFL_SEGMENT(split, span, rows, r0, r1, adapter);
  const int64_t a_base = (int64_t)(adapter > 0 ? adapter : 0) * cols * R;
  // rows on the base alone: e = 0 (written below), no rows walked, no partial
  const int64_t r_stop = adapter >= 0 ? r1 : r0;
  for (int64_t cb = MFL_GROUP_X; cb < blocks; cb += MFL_GROUPS_X) {
    const int64_t k0 = cb * TK;
    MFL_BARRIER();
    if (adapter < 0) {
      const float zeros[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int64_t s = tid; s < (r1 - r0) * KG; s += TG) {
        const int64_t k = k0 + 4 * (s % KG);
        if (k < cols) {
          MFL_QUAD_STORE(e, (uint64_t)(MFL_ROW(r0 + s / KG) * cols + k), cols - k, wide, zeros);
        }
      }
    }
    for (uint32_t s = tid; s < TK * RP; s += TG) {
      const int64_t k = k0 + s / RP;
      const uint32_t j = s % RP;
      smem[AOFF + j * AT + s / RP] = k < cols && j < R ? a[a_base + k * R + j] : 0.0f;
    }
    float da[4][RC];
    MFL_UNROLL for (int u = 0; u < 4; ++u) {
      MFL_UNROLL for (int j = 0; j < RC; ++j) {
        da[u][j] = 0.0f;
      }
    }
    for (int64_t row0 = r0; row0 < r_stop; row0 += TM) {
      for (uint32_t s = tid; s < TM * KG; s += TG) {
        const int64_t pos = row0 + s / KG;
        const int64_t k = k0 + 4 * (s % KG);
        float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        float mult[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (pos < r1 && k < cols) {
          const uint64_t index = (uint64_t)(MFL_ROW(pos) * cols + k);
          const int64_t count = cols - k;
          MFL_QUAD_LOAD(x, index, count, wide, v);
          MFL_UNROLL for (int q = 0; q < 4; ++q) {
            mult[q] = q < count ? MFL_MULT(index + q) : 0.0f;
            v[q] *= mult[q];
          }
        }
        MFL_SHARED_STORE4(smem, (s / KG) * XS + 4 * (s % KG), v);
        MFL_SHARED_STORE4(smem, MOFF + (s / KG) * XS + 4 * (s % KG), mult);
      }
      for (uint32_t s = tid; s < TM * RP; s += TG) {
        const int64_t pos = row0 + s / RP;
        const uint32_t j = s % RP;
        smem[DOFF + (s / RP) * DS + j] = pos < r1 && j < R ? ds[MFL_ROW(pos) * R + j] : 0.0f;
      }
      MFL_BARRIER();
      for (int li = rl; li < TM; li += RL) {
        float xv[4];
        MFL_SHARED_LOAD4(smem, li * XS + 4 * kg, xv);
        MFL_UNROLL for (int j4 = 0; j4 < RC; j4 += 4) {
          float dv[4];
          MFL_SHARED_LOAD4(smem, DOFF + li * DS + chunk * RC + j4, dv);
          MFL_UNROLL for (int u = 0; u < 4; ++u) {
            MFL_UNROLL for (int f = 0; f < 4; ++f) {
              da[u][j4 + f] += xv[u] * dv[f];
            }
          }
        }
      }
      float ev[TRE][4];
      MFL_UNROLL for (int q = 0; q < TRE; ++q) {
        MFL_UNROLL for (int u = 0; u < 4; ++u) {
          ev[q][u] = 0.0f;
        }
      }
      for (int j4 = 0; j4 < RP; j4 += 4) {
        float dv[TRE][4];
        MFL_UNROLL for (int q = 0; q < TRE; ++q) {
          MFL_SHARED_LOAD4(smem, DOFF + (lane + L * q) * DS + j4, dv[q]);
        }
        MFL_UNROLL for (int f = 0; f < 4; ++f) {
          float av[4];
          MFL_SHARED_LOAD4(smem, AOFF + (j4 + f) * AT + 4 * kg, av);
          MFL_UNROLL for (int q = 0; q < TRE; ++q) {
            MFL_UNROLL for (int u = 0; u < 4; ++u) {
              ev[q][u] += dv[q][f] * av[u];
            }
          }
        }
      }
      MFL_UNROLL for (int q = 0; q < TRE; ++q) {
        const int64_t pos = row0 + lane + L * q;
        const int64_t k = k0 + 4 * kg;
        if (pos < r1 && k < cols) {
          float mv[4];
          MFL_SHARED_LOAD4(smem, MOFF + (lane + L * q) * XS + 4 * kg, mv);
          MFL_UNROLL for (int u = 0; u < 4; ++u) {
            mv[u] *= ev[q][u];
          }
          MFL_QUAD_STORE(e, (uint64_t)(MFL_ROW(pos) * cols + k), cols - k, wide, mv);
        }
      }
      MFL_BARRIER();
    }
"""
    + _row_lane_tree("da", "RC", "RL", "KG", "kg")
    + """    if (rl == 0 && adapter >= 0) {
      MFL_UNROLL for (int u = 0; u < 4; ++u) {
        const int64_t k = k0 + 4 * kg + u;
        MFL_UNROLL for (int j = 0; j < RC; ++j) {
          if (k < cols && chunk * RC + j < R) {
            da_part[(split * cols + k) * R + chunk * RC + j] = da[u][j];
          }
        }
      }
    }
  }
}
"""
)
