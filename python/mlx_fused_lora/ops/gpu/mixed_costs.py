"""The mixed-adapter op's counted-cost model: its options per product, on ``costs.py``'s
devices and passes (bytes, FLOPs, launches; estimates, never measured: no GPU here).

n adapters stacked, M rows each on its adapter (or none); u = min(n, M) adapters can be
used. Per product the options are:

- ``h`` (M, r): "kernel": down_proj over the rows grouped by adapter (x read once, the
  mask fused; every adapter adds at most one part-filled row tile); "gemm": the device mask
  (p > 0) and one GEMM over the concatenated rank n*r (x @ A_cat, n times the FLOPs,
  A copied to (K, n*r)), each row keeping its block; "gather": the device mask (p > 0) and
  MLX's gather_mm, which for rows of one element each is its gather_mv on both backends
  (BGMV: each row reads its adapter's A, K*r per row, from cache after the first).
- ``up`` (M, N), the start value of the base GEMM: "gemm": one GEMM over the concatenated
  rank with the bias in its epilogue (h spread over n*r: n times the FLOPs, all n B
  read); "gather": gather_mm (each row reads its adapter's B, r*N per row) and, with a
  bias, one more pass over M x N (not counted: the plan does not see the bias).
- ``ds_db``: "kernel": low_rank_grad over row splits of one adapter (dY read once, a
  partial per split, summed per adapter); "gemm": two GEMMs over the concatenated rank
  (dY read twice, n times the FLOPs).
- ``da_e``: "kernel": down_grad over row splits of one adapter (x read once, e written
  once); "gemm": the device mask and two GEMMs over the concatenated rank.

MLX's gather_mm is no option for the backward: its gradient for the stacked matrices is,
for unsorted rows, a per-row outer product (M x r x N floats) scattered with float atomics
(nondeterministic), and for sorted rows a segmented matmul over copies of h and dY put in
sorted order (an M x N copy); its sorted forward (CUTLASS's grouped GEMM on CUDA, MLX's
gather_mm_rhs on Metal) likewise needs x in sorted order, an M x K copy: the kernels walk
the rows through an order instead. Every "kernel" pays for the grouping (``GROUPING``),
once in the forward and once in the backward where one runs.
"""

from . import costs, geometry
from .costs import F32, HASH_OPS, Pass, gemm, masked_copy, parts

# The grouping's launches (grouping.py: the classes, keys and argsort, the counts'
# scatter, the offsets, the tables): an estimate, fused by mx.compile on a GPU.
GROUPING_LAUNCHES = 12
# The routing's (adapter_rows.py: clamped ids, one-hot rows, each row's multiplier), made
# in the forward and again in the backward whatever the plan.
ROUTING_LAUNCHES = 8


def grouping(m, count):
    """The rows grouped by adapter: a few passes over M int32s and n-sized arrays."""
    return Pass("group_rows", m * 4 * 8 + (count + 1) * 4 * 8, 0.0, "simt", GROUPING_LAUNCHES)


def routing(m, count):
    """Each row's adapter as the products take it: over M ids and M x n one-hot rows."""
    return Pass("routing", m * 4 * 6 + m * count, 0.0, "simt", ROUTING_LAUNCHES)


def _walked(m, count, tm):
    """Rows a grouped kernel walks: M, and one part-filled tile of `tm` rows per class."""
    return m + min(count + 1, m) * tm


def _widened(name, count, rows, cols, s):
    """n adapters' (rows, cols) float32 matrices cast to s-byte elements (or copied)."""
    return Pass(name, count * rows * cols * (F32 + s), 0.0, "simt")


def h_options(m, k, r, s, dropout, count):
    used = min(count, m)
    masked = [masked_copy("dropped_x", m, k, s)] if dropout else []
    gathered = Pass(
        "gather_h", m * k * s + used * k * r * s + m * r * s, 2.0 * m * k * r, "simt", 1, 0.0, m * k * r * s
    )
    own = gemm("h_gemm", m, k, count * r, s, m * count * r * s)._replace(launches=2)
    options = {
        "gemm": [*masked, _widened("a_concat", count, k, r, s), own],
        "gather": [*masked, _widened("a_cast", count, k, r, s), gathered],
    }
    if r <= geometry.MAX_RANK:
        tiles = geometry.table_size(m, count, 16)
        _, grid, _ = geometry.down_proj(m, k, r, s, tiles=tiles)
        bytes_ = m * k * s + used * k * r * F32 + parts(grid[1], m * r) + m * r * F32
        flops = 2.0 * _walked(m, count, 16) * k * r
        options["kernel"] = [Pass("down_proj", bytes_, flops, "simt", 1 + (grid[1] > 1), HASH_OPS * m * k * dropout)]
    return options


def up_options(m, r, n, s, count):
    used = min(count, m)
    spread = m * count * r * s + m * r * F32
    gathered = Pass(
        "gather_up", m * r * s + used * r * n * s + m * n * s, 2.0 * m * r * n, "simt", 3, 0.0, m * r * n * s
    )
    spread_gemm = gemm("up_projection", m, count * r, n, s, spread)._replace(launches=3)
    return {
        "gemm": [_widened("b_cast", count, r, n, s), spread_gemm],
        "gather": [_widened("b_cast", count, r, n, s), gathered],
    }


def ds_db_options(m, n, r, s, count):
    spread = 2 * m * count * r * s + 2 * m * r * F32
    options = {
        "gemm": [
            _widened("b_cast", count, r, n, s),
            gemm("ds_gemm", m, n, count * r, s, spread)._replace(launches=3),
            gemm("db_gemm", count * r, m, n, s, count * r * n * (F32 + s))._replace(launches=2),
        ]
    }
    if r <= geometry.MAX_LOW_RANK:
        length = geometry.split_rows("low_rank_grad", m, n, r, s)
        segments = geometry.table_size(m, count, length)
        template, grid, _ = geometry.low_rank_grad(m, n, r, s, segments=segments)
        blocks = -(-n // geometry.column_tile("low_rank_grad", template))
        bytes_ = m * n * s + (m * r + min(count, m) * r * n) * F32 + parts(blocks, m * r)
        bytes_ += (2 * segments + count) * r * n * F32
        flops = 4.0 * _walked(m, count, template["TM"]) * n * r
        options["kernel"] = [Pass("low_rank_grad", bytes_, flops, "simt", 3)]
    return options


def da_e_options(m, k, r, s, dropout, count):
    masked = [masked_copy("dropped_x", m, k, s), masked_copy("masked_e", m, k, s)] if dropout else []
    options = {
        "gemm": [
            *masked,
            _widened("a_concat", count, k, r, s),
            gemm("da_gemm", k, m, count * r, s, m * count * r * s)._replace(launches=2),
            gemm("e_gemm", m, count * r, k, s),
            _widened("da_split", count, k, r, s),
        ]
    }
    if r <= geometry.MAX_RANK:
        length = geometry.split_rows("down_grad", m, k, r, s)
        segments = geometry.table_size(m, count, length)
        template, grid, _ = geometry.down_grad(m, k, r, s, segments=segments)
        bytes_ = 2 * m * k * s + (m * r + min(count, m) * k * r) * F32 + (2 * segments + count) * k * r * F32
        tm = geometry.row_tile("down_grad", template)
        flops = 4.0 * _walked(m, count, tm) * k * r
        options["kernel"] = [Pass("down_grad", bytes_, flops, "simt", 2, HASH_OPS * m * k * dropout)]
    return options


def _best(options, device, s):
    """The cheapest option; another than "kernel" must beat the kernel by costs.MARGIN."""
    others = {name: costs.seconds(p, device, s) for name, p in options.items() if name != "kernel"}
    best = min(others, key=others.get)
    if "kernel" in options and others[best] >= costs.MARGIN * costs.seconds(options["kernel"], device, s):
        return "kernel"
    return best


def options(m, k, n, r, s, dropout, count):
    return {
        "h": h_options(m, k, r, s, dropout, count),
        "up": up_options(m, r, n, s, count),
        "ds_db": ds_db_options(m, n, r, s, count),
        "da_e": da_e_options(m, k, r, s, dropout, count),
    }


def _without_kernels(choice, keys, table, device, s, m, count):
    """The choice for `keys` without kernels where the grouping makes them dearer."""
    if not any(choice[key] == "kernel" for key in keys):
        return choice
    with_kernels = sum(costs.seconds(table[key][choice[key]], device, s) for key in keys)
    with_kernels += grouping(m, count).seconds(device, s)
    alternative = {key: _best({n: p for n, p in table[key].items() if n != "kernel"}, device, s) for key in keys}
    without = sum(costs.seconds(table[key][alternative[key]], device, s) for key in keys)
    return choice | alternative if without < costs.MARGIN * with_kernels else choice


def plan(device, m, k, n, r, s, dropout, count):
    """How the mixed op computes h, the up-projection, (dS, dB) and (dA, e): "kernel",
    "gemm" or "gather" (see the module doc), the grouping counted where a kernel runs."""
    table = options(m, k, n, r, s, dropout, count)
    choice = {key: _best(table[key], device, s) for key in table}
    choice = _without_kernels(choice, ["h"], table, device, s, m, count)
    return _without_kernels(choice, ["ds_db", "da_e"], table, device, s, m, count)


def op_passes(device, m, k, n, r, s, dropout, count):
    """The mixed op's passes beyond the frozen base's two GEMMs, as it plans them."""
    choice = plan(device, m, k, n, r, s, dropout, count)
    table = options(m, k, n, r, s, dropout, count)
    forward = [*table["h"][choice["h"]], *table["up"][choice["up"]]]
    forward += [Pass("base_gemm_reads_the_rank_r_term", m * n * s, 0.0, "gemm", 0), routing(m, count)]
    backward = [*table["ds_db"][choice["ds_db"]], *table["da_e"][choice["da_e"]]]
    backward += [Pass("dx_gemm_reads_e", m * k * s, 0.0, "gemm", 0), routing(m, count)]
    if choice["h"] == "kernel":
        forward.append(grouping(m, count))
    if "kernel" in (choice["ds_db"], choice["da_e"]):
        backward.append(grouping(m, count))
    return {"forward": forward, "backward": backward}


def estimate(device, m, k, n, r, s, dropout, count):
    """The mixed op's plan and ratios: to the base GEMMs, and to the single-adapter op on
    the same rows (forward; and forward + backward where `dropout` is a training case)."""
    base_forward = gemm("base_forward", m, k, n, s).seconds(device, s)
    base_backward = gemm("base_backward", m, n, k, s).seconds(device, s)
    mixed, single = op_passes(device, m, k, n, r, s, dropout, count), costs.op_passes(device, m, k, n, r, s, dropout)

    def total(passes, keys):
        return sum(costs.seconds(passes[key], device, s) for key in keys)

    forward = {p.name: p.seconds(device, s) for p in mixed["forward"]}
    backward = {p.name: p.seconds(device, s) for p in mixed["backward"]}
    both = ("forward", "backward")
    return {
        "device": device.name,
        "shape": {"m": m, "k": k, "n": n, "r": r, "element_size": s, "dropout": dropout, "adapters": count},
        "plan": plan(device, m, k, n, r, s, dropout, count),
        "forward_s": forward,
        "backward_s": backward,
        "passes": {p.name: p.bytes / (m * k * s) for p in mixed["forward"] + mixed["backward"]},
        "forward_ratio": 1 + total(mixed, ["forward"]) / base_forward,
        "training_ratio": 1 + total(mixed, both) / (base_forward + base_backward),
        "forward_over_single": (base_forward + total(mixed, ["forward"])) / (base_forward + total(single, ["forward"])),
        "training_over_single": (base_forward + base_backward + total(mixed, both))
        / (base_forward + base_backward + total(single, both)),
    }


# The README's mixed cases (bf16, r = 16, 8 adapters, one 2048-wide layer as in the CPU
# benchmark): decode (8 rows, no dropout), prefill (8 x 256 rows, no dropout), training
# (8 x 256 rows, p = 0.1), and the 4096-square training case.
README_CASES = [
    ("decode", 8, 2048, 2048, False),
    ("prefill", 2048, 2048, 2048, False),
    ("training", 2048, 2048, 2048, True),
    ("training 4096", 4096, 4096, 4096, True),
]


def estimates():
    """The README's mixed-op estimates (costs.estimates()["mixed"])."""
    return {
        device_name: {name: estimate(device, m, k, n, 16, 2, dropout, 8) for name, m, k, n, dropout in README_CASES}
        for device_name, device in (("H100", costs.H100), ("M3 Max", costs.M3_MAX))
    }
