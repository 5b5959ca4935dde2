"""Tile sizes and launch grids of the GPU kernels, for any M, K, N and r.

MLX's custom kernels take the grid in threads, each dimension an ``int``; CUDA turns it
into ceil(grid / group) blocks (at most 65535 in y) and shrinks the block to the grid
when the grid is smaller. So every grid here is a whole number of groups, at most
``MAX_GROUPS`` groups in x (the bodies walk the rest with a group-stride loop) and at
most ``MAX_SPLITS`` in y: every dimension stays far below 2^31 whatever M*K is.

The template parameters of each body (``bodies.py``), all ints:

- down_proj: R; rank chunk RC (a multiple of 4) x CH chunks (R padded up to CH*RC);
  RT row threads x TR rows each (TM = RT*TR rows per tile); KL lanes, each 4 columns of
  a TK = 4*KL step of K; XS and AS the x and A tiles' row strides; SMEM floats; TG.
- low_rank_grad: R; dB's rank chunk RCB x CHB chunks and RLB row lanes; NG groups of 4
  columns (TN = 4*NG per block); TM rows per tile, dS's TRS rows per thread; the dY, h
  and B tiles' strides YS, HS, BS; SMEM; TG.
- down_grad: R; dA's rank chunk RC x CH chunks and RL row lanes; KG groups of 4 columns
  (TK = 4*KG per block); e's TRE rows per thread (TM = TG/KG*TRE rows per tile); the x,
  dS and A^T tiles' strides XS, DS, AT; SMEM; TG.

Mixed adapters (``MIXED`` = 1, every template has it): down_proj's grid x covers the
op's table of row tiles of one adapter each (``table_size`` entries), the reductions'
grid y its table of row splits (walked with a group-stride loop, at most twice the splits
the single-adapter op would take); ``split_rows`` is the length of those splits.

Every shared stride is a multiple of 4 floats whose count of 16-byte words is odd (see
``stride``), and every rank-r product reads at least 4 FMAs' worth per 16-byte shared
load (``fmas_per_load``, held by tests/test_gpu_kernels.py for every r the kernels take).
"""

# Threads per group: a multiple of every GPU's SIMD width (down_grad takes fewer at large r).
GROUP = 256
# Groups in x before the bodies' group-stride loops take over.
MAX_GROUPS = 65535
# Splits (grid y) of the reductions, and the groups they aim to fill (2 per SM of an
# H100's 132 and more: 512).
MAX_SPLITS = 32
TARGET_GROUPS = 512
# Shared memory per group, in floats (32 KiB: Metal's limit per threadgroup).
SHARED_FLOATS = 8192
# The largest r the masked kernels (down_proj, down_grad) take: above, their register and
# shared tiles would not fit; the op then runs MLX's GEMMs with the device mask.
MAX_RANK = 128
# The largest r low_rank_grad's tiles take (at 4096 the cost model leaves it for two GEMMs
# from r = 20 or so already: benchmarks/results/gpu_estimates.json).
MAX_LOW_RANK = 32


def _ceil(a, b):
    return -(-a // b)


def _ceil4(a):
    return 4 * _ceil(a, 4)


def _chunks(r, largest):
    """(CH, RC): the fewest chunks, a power of two, of RC ranks each (a multiple of 4, at
    most `largest`) that cover r."""
    ch = 1
    while _ceil4(_ceil(r, ch)) > largest:
        ch *= 2
    return ch, _ceil4(_ceil(r, ch))


def stride(width):
    """A shared row stride for rows of `width` floats (a multiple of 4): an odd number
    of 16-byte words, so 8 threads reading 16 bytes each from 8 rows hit 32 banks."""
    return width if (width // 4) % 2 else width + 4


def _grid(groups_x, groups_y, group=GROUP):
    return (groups_x * group, groups_y, 1), (group, 1, 1)


def _splits(rows, tm, col_groups, max_splits, cap):
    return max(1, min(max_splits, _ceil(TARGET_GROUPS, col_groups), _ceil(rows, tm), cap))


def _split_cap(length, element_size, r):
    """The most splits of a reduction of `length` elements whose partials (r floats per
    output per split, written and read once) stay within half the reduced array's bytes;
    2 are always allowed."""
    return max(2, length * element_size // (16 * r))


def _check_rank(r, limit, name):
    if not 1 <= r <= limit:
        raise ValueError(f"{name} takes 1 <= r <= {limit}, got r = {r}")


def elementwise(size, max_groups=MAX_GROUPS):
    """(template, grid, threadgroup) of dropout_mask / sum_parts / row_segments over
    `size` elements."""
    return {"TG": GROUP}, *_grid(max(1, min(max_groups, _ceil(size, GROUP))), 1)


def table_size(rows, count, length):
    """Entries of a table of segments of at most `length` rows cutting `rows` rows grouped
    into count + 1 classes (n adapters and the rows on the base alone): every class adds
    at most one segment shorter than `length`."""
    return _ceil(rows, length) + min(count + 1, rows)


def down_proj(rows, cols, r, element_size=4, max_groups=MAX_GROUPS, max_splits=MAX_SPLITS, tiles=None):
    """h partials: TM-row tiles (grid x) and splits of K (grid y); see the module doc.
    `tiles`: the length of the mixed op's tile table (None: the single-adapter op).

    Split-K fills the GPU at small M (M = 512: 32 row tiles x 16 splits); the splits are
    capped where their partials (S*M*r floats, written and read once) would pass half
    of x's bytes, but 2 are always allowed."""
    _check_rank(r, MAX_RANK, "down_proj")
    ch, rc = _chunks(r, 16)
    rt, tr = 8, 2
    kl = GROUP // (rt * ch)
    tk, tm = 4 * kl, rt * tr
    xs, as_ = stride(tk), stride(ch * rc)
    smem = max(tm * xs + tk * as_, (kl // 2) * tm * as_)
    template = {"R": r, "RC": rc, "CH": ch, "RT": rt, "TR": tr, "KL": kl, "XS": xs, "AS": as_}
    template |= {"SMEM": smem, "TG": GROUP, "MIXED": int(tiles is not None)}
    groups = max(1, min(max_groups, _ceil(rows, tm) if tiles is None else tiles))
    splits = max(1, min(max_splits, _ceil(cols, tk), _ceil(TARGET_GROUPS, groups), _split_cap(cols, element_size, r)))
    return template, *_grid(groups, splits)


def _low_rank_tiles(r):
    chb, rcb = _chunks(r, 8)
    rp, tm, trs = chb * rcb, 32, 2
    for tn in (128, 64, 32):
        ng = tn // 4
        lanes, outputs = GROUP // ng, (tm // trs) * (rp // 4)
        if lanes < chb or GROUP % outputs:
            continue
        ys, hs, bs = stride(tn), stride(rp), stride(tn)
        tiles = rp * bs + tm * ys + tm * hs
        sl = GROUP // outputs
        if (sl // 2) * tm * hs > tm * (ys + hs):
            continue
        smem = max(tiles, (lanes // chb // 2) * rp * tn)
        if smem <= SHARED_FLOATS:
            return dict(R=r, RCB=rcb, CHB=chb, RLB=lanes // chb, NG=ng, TM=tm, TRS=trs, YS=ys, HS=hs, BS=bs, SMEM=smem, TG=GROUP)  # fmt: skip
    raise ValueError(f"no low_rank_grad tile fits r = {r}")


def _mixed_splits(template, splits, max_splits, segments):
    """The grid's y: the single-adapter op's splits, or for a mixed op's table of
    `segments` splits at most twice those (a group walks every GROUPS_Y-th)."""
    template["MIXED"] = int(segments is not None)
    return splits if segments is None else max(1, min(segments, 2 * splits, 2 * max_splits))


def low_rank_grad(rows, cols, r, element_size=4, max_groups=MAX_GROUPS, max_splits=MAX_SPLITS, segments=None):
    """dS and dB partials: column blocks of TN (grid x), row splits (grid y); `segments`:
    the length of the mixed op's split table (None: the single-adapter op)."""
    _check_rank(r, MAX_LOW_RANK, "low_rank_grad")
    template = _low_rank_tiles(r)
    col_groups = max(1, min(max_groups, _ceil(cols, 4 * template["NG"])))
    splits = _splits(rows, template["TM"], col_groups, max_splits, _split_cap(rows, element_size, r))
    return template, *_grid(col_groups, _mixed_splits(template, splits, max_splits, segments))


def _down_grad_tiles(r):
    ch, rc = _chunks(r, 12)
    rp = ch * rc
    for group, kg, tre in ((256, 16, 2), (128, 8, 2), (64, 4, 2)):
        lanes = group // kg
        if lanes < ch:
            continue
        tm, tk = lanes * tre, 4 * kg
        xs, ds, at = stride(tk), stride(rp), stride(tk)
        smem = max(2 * tm * xs + tm * ds + rp * at, (lanes // ch // 2) * rp * tk)
        if smem <= SHARED_FLOATS:
            return dict(R=r, RC=rc, CH=ch, RL=lanes // ch, KG=kg, TRE=tre, XS=xs, DS=ds, AT=at, SMEM=smem, TG=group)
    raise ValueError(f"no down_grad tile fits r = {r}")


def down_grad(rows, cols, r, element_size=4, max_groups=MAX_GROUPS, max_splits=MAX_SPLITS, segments=None):
    """dA partials and e: column blocks of TK (grid x), row splits (grid y); `segments`:
    the length of the mixed op's split table (None: the single-adapter op)."""
    _check_rank(r, MAX_RANK, "down_grad")
    template = _down_grad_tiles(r)
    group = template["TG"]
    tm = group // template["KG"] * template["TRE"]
    col_groups = max(1, min(max_groups, _ceil(cols, 4 * template["KG"])))
    splits = _splits(rows, tm, col_groups, max_splits, _split_cap(rows, element_size, r))
    return template, *_grid(col_groups, _mixed_splits(template, splits, max_splits, segments), group)


def split_rows(name, rows, cols, r, element_size=4, max_groups=MAX_GROUPS, max_splits=MAX_SPLITS):
    """Rows per split of reduction `name` (low_rank_grad over dY's `cols`, down_grad over
    x's): the single-adapter op's splits, and the length of the mixed op's segments."""
    reduction = {"low_rank_grad": low_rank_grad, "down_grad": down_grad}[name]
    template, grid, _ = reduction(rows, cols, r, element_size, max_groups, max_splits)
    tm = row_tile(name, template)
    return _ceil(rows, grid[1] * tm) * tm


def row_tile(name, template):
    """Rows per tile of kernel `name`."""
    if name == "down_proj":
        return template["RT"] * template["TR"]
    if name == "low_rank_grad":
        return template["TM"]
    return template["TG"] // template["KG"] * template["TRE"]


def column_tile(name, template):
    """Columns per step (down_proj: of K) or per block (the others) of kernel `name`."""
    return 4 * template[{"down_proj": "KL", "low_rank_grad": "NG", "down_grad": "KG"}[name]]


def padded_rank(name, template):
    """r rounded up to the kernel's rank chunks (its columns past r are zeros)."""
    if name == "low_rank_grad":
        return max(template["CHB"] * template["RCB"], _ceil4(template["R"]))
    return template["CH"] * template["RC"]


def fmas_per_load(name, template):
    """FMAs per 16-byte shared load in the kernel's rank-r products (the worst of them)."""
    if name == "down_proj":
        tr, rc = template["TR"], template["RC"]
        return 4 * tr * rc / (tr + rc)
    if name == "low_rank_grad":
        db = 4 * template["RCB"] / (1 + template["RCB"] / 4)
        ds = 16 * template["TRS"] / (template["TRS"] + 4)
        return min(db, ds)
    da = 4 * template["RC"] / (1 + template["RC"] / 4)
    e = 16 * template["TRE"] / (template["TRE"] + 4)
    return min(da, e)


def _mixed_paths(name, template, grid, rows, counts, length):
    """The paths of a mixed launch (MIXED = 1) over rows whose classes hold `counts` rows
    (counts[0] on the base alone, counts[1 + i] on adapter i), in segments of `length`."""
    entries = table_size(rows, len(counts) - 1, length)
    steps = {
        "rows through the adapters' order": True,
        "a segment of rows on the base alone": counts[0] > 0,
        "several segments of one adapter": max(counts[1:]) > length,
        "empty table entries": entries > sum(_ceil(c, length) for c in counts),
    }
    if name != "down_proj":
        steps |= {
            "segment-stride loop": entries > grid[1],
            "an adapter no row uses (its sum: zeros)": min(counts[1:]) == 0,
        }
    return {path for path, hit in steps.items() if hit}


def paths(name, template, grid, rows, cols, aligned, counts=None, length=None):
    """The code paths a launch of kernel `name` takes over a (rows, cols) array (x for
    down_proj and down_grad, dY for low_rank_grad; `aligned`: whether it starts on a
    16-byte word), read off its geometry: what a check must run before real data does.
    A mixed launch (MIXED = 1) also needs its ids' `counts` per class (``_mixed_paths``)
    and its segments' `length` (down_proj: its row tile; else ``split_rows``)."""
    tm, tw = row_tile(name, template), column_tile(name, template)
    groups_x, splits = grid[0] // template["TG"], grid[1]
    taken = {"4-wide accesses" if cols % 4 == 0 and aligned else "element-wise accesses"}
    if cols % 4 == 0 and not aligned:
        taken.add("misaligned view (element-wise, rows a multiple of 4)")
    if padded_rank(name, template) > template["R"]:
        taken.add("rank tail (padded rank columns)")
    if name == "down_proj":
        tiles, span = _ceil(rows, tm), _ceil(cols, splits * tw) * tw
        steps = {"K splits > 1 (partials summed)": splits > 1, "K steps > 1 in a split": span > tw}
        steps |= {"K tail": cols % tw != 0, "lane tree": template["KL"] > 1}
    else:
        tiles, per_split = _ceil(cols, tw), _ceil(rows, splits * tm) * tm
        steps = {"column blocks > 1 (partials summed)": tiles > 1, "column tail": cols % tw != 0}
        steps |= {"row splits > 1 (partials summed)": splits > 1, "row tiles > 1 in a split": per_split > tm}
        lanes = template["RLB"] if name == "low_rank_grad" else template["RL"]
        steps |= {"row-lane tree": lanes > 1}
        if name == "low_rank_grad":
            outputs = (template["TM"] // template["TRS"]) * (padded_rank(name, template) // 4)
            steps |= {"column-lane tree": template["TG"] // outputs > 1}
    steps |= {"row tiles > 1": _ceil(rows, tm) > 1, "row tail": rows % tm != 0, "group-stride loop": tiles > groups_x}
    if template["MIXED"]:
        taken |= _mixed_paths(name, template, grid, rows, counts, length)
    return taken | {path for path, hit in steps.items() if hit}


def possible_paths(name, template):
    """Every path kernel `name` can take with this template, whatever the sizes."""
    fixed = {"4-wide accesses", "element-wise accesses", "row tiles > 1", "row tail", "group-stride loop"}
    fixed.add("misaligned view (element-wise, rows a multiple of 4)")
    if template["MIXED"]:
        fixed |= {"rows through the adapters' order", "a segment of rows on the base alone"}
        fixed |= {"several segments of one adapter", "empty table entries"}
        if name != "down_proj":
            fixed |= {"segment-stride loop", "an adapter no row uses (its sum: zeros)"}
    if padded_rank(name, template) > template["R"]:
        fixed.add("rank tail (padded rank columns)")
    if name == "down_proj":
        fixed |= {"K splits > 1 (partials summed)", "K steps > 1 in a split", "K tail"}
        return fixed | ({"lane tree"} if template["KL"] > 1 else set())
    fixed |= {"column blocks > 1 (partials summed)", "column tail", "row splits > 1 (partials summed)"}
    fixed.add("row tiles > 1 in a split")
    if (template["RLB"] if name == "low_rank_grad" else template["RL"]) > 1:
        fixed.add("row-lane tree")
    if name == "low_rank_grad":
        outputs = (template["TM"] // template["TRS"]) * (padded_rank(name, template) // 4)
        if template["TG"] // outputs > 1:
            fixed.add("column-lane tree")
    return fixed


def check_grid(grid, threadgroup):
    """Raises unless MLX 0.32 can launch `grid` on both backends (see the module doc)."""
    for g, t in zip(grid, threadgroup, strict=True):
        if not 0 < g < 2**31 or g % t:
            raise ValueError(f"grid {grid} is not a whole number of groups {threadgroup} below 2^31")
    if grid[1] // threadgroup[1] > 65535 or grid[2] // threadgroup[2] > 65535:
        raise ValueError(f"grid {grid} has more than 65535 groups in y or z")
