"""Tile sizes and launch grids of the GPU kernels, for any M, K, N and r.

MLX's custom kernels take the grid in threads, each dimension an ``int``; CUDA turns it
into ceil(grid / group) blocks (at most 65535 in y) and shrinks the block to the grid
when the grid is smaller. So every grid here is a whole number of groups, at most
``MAX_GROUPS`` groups in x (the bodies walk the rest with a group-stride loop) and at
most ``MAX_SPLITS`` in y: every dimension stays far below 2^31 whatever M*K is.
"""

import math

# Threads per group: a multiple of every GPU's SIMD width.
GROUP = 256
# Groups in x before the bodies' group-stride loops take over.
MAX_GROUPS = 65535
# Row splits (grid y) of the backward reductions, and the groups they aim to fill.
MAX_SPLITS = 32
TARGET_GROUPS = 512
# Shared memory per group, in floats (32 KiB: Metal's limit per threadgroup).
SHARED_FLOATS = 8192


def _ceil(a, b):
    return -(-a // b)


def _pick(candidates, shared):
    """The first (tm, tk) of `candidates` whose shared arrays fit."""
    for tm, tk in candidates:
        if shared(tm, tk) <= SHARED_FLOATS:
            return tm, tk
    raise ValueError(f"no tile fits {SHARED_FLOATS} floats of shared memory")


def _tiles(widths):
    """(rows, columns) tiles to try, widest first, keeping at least 8 rows a step (fewer
    rows mean more barriers per row) until no width fits."""
    return [(tm, w) for tm in (16, 8) for w in widths] + [(tm, w) for tm in (4, 2, 1) for w in widths]


def _grid(groups_x, groups_y=1):
    return (groups_x * GROUP, groups_y, 1), (GROUP, 1, 1)


def _splits(rows, tm, col_groups, max_splits):
    return max(1, min(max_splits, _ceil(TARGET_GROUPS, col_groups), _ceil(rows, tm)))


def elementwise(size, max_groups=MAX_GROUPS):
    """(template, grid, threadgroup) of dropout_mask / sum_parts over `size` elements."""
    return {"TG": GROUP}, *_grid(max(1, min(max_groups, _ceil(size, GROUP))))


def down_proj(rows, r, max_groups=MAX_GROUPS):
    """h = (m*x) @ A: TM rows per group (about 8 outputs per thread), K in steps of TK."""
    tm = max(1, min(64, 8 * GROUP // r))
    tm, tk = _pick(
        [(tm, tk) for tk in (64, 32, 16, 8, 4, 2, 1)] + [(1, 1)],
        lambda tm, tk: tm * (tk + 1) + tk * r,
    )
    template = {"R": r, "TG": GROUP, "TM": tm, "TK": tk, "P": _ceil(tm * r, GROUP)}
    return template, *_grid(max(1, min(max_groups, _ceil(rows, tm))))


def low_rank_grad(rows, cols, r, max_groups=MAX_GROUPS, max_splits=MAX_SPLITS):
    """dS and dB partials: TN columns per group (grid x), row splits (grid y), TM rows a step."""
    tm, tn = _pick(
        _tiles((128, 64, 32, 16, 8, 4, 2, 1)),
        lambda tm, tn: tm * (tn + 1) + tm * r + r * (tn + 1),
    )
    col_groups = max(1, min(max_groups, _ceil(cols, tn)))
    splits = _splits(rows, tm, col_groups, max_splits)
    template = {"R": r, "TG": GROUP, "TM": tm, "TN": tn, "P1": _ceil(r * tn, GROUP), "P2": _ceil(tm * r, GROUP)}
    return template, *_grid(col_groups, splits)


def down_grad(rows, cols, r, max_groups=MAX_GROUPS, max_splits=MAX_SPLITS):
    """dA partials and e: TK columns per group (grid x), row splits (grid y), TM rows a step."""
    tm, tk = _pick(
        _tiles((32, 16, 8, 4, 2, 1)),
        lambda tm, tk: 2 * tm * (tk + 1) + tm * r + tk * (r + 1),
    )
    col_groups = max(1, min(max_groups, _ceil(cols, tk)))
    splits = _splits(rows, tm, col_groups, max_splits)
    template = {"R": r, "TG": GROUP, "TM": tm, "TK": tk, "P1": _ceil(tk * r, GROUP)}
    return template, *_grid(col_groups, splits)


def column_blocks(cols, template):
    """How many column blocks (partials) low_rank_grad writes for `cols` columns."""
    return math.ceil(cols / template["TN"])


def check_grid(grid, threadgroup):
    """Raises unless MLX 0.32 can launch `grid` on both backends (see the module doc)."""
    for g, t in zip(grid, threadgroup, strict=True):
        if not 0 < g < 2**31 or g % t:
            raise ValueError(f"grid {grid} is not a whole number of groups {threadgroup} below 2^31")
    if grid[1] // threadgroup[1] > 65535 or grid[2] // threadgroup[2] > 65535:
        raise ValueError(f"grid {grid} has more than 65535 groups in y or z")
