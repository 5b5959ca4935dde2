"""The GPU op's counted-cost model: bytes moved and FLOPs of each pass, per option.

Where the op has a choice (its own kernel or MLX's GEMMs), it takes the option this model
says is cheaper; the README's per-kernel estimates come from it too. A pass's time is
``max(bytes / bandwidth, flops / rate) + launches * launch``, with the rate of the engine
that runs it: MLX's GEMMs (tensor cores on an H100, simdgroup matrices on Apple GPUs) or
our kernels' float32 FMAs (CUDA cores, Apple's ALUs), plus the mask's integer operations
(``HASH_OPS`` per element, at the integer rate, not overlapped with the FMAs). Bytes
count each array a pass reads or writes once (small operands that stay in cache once);
FLOPs count 2 per FMA. The device figures are estimates (datasheet peaks times an assumed
efficiency), never measured here: no GPU was at hand.

The choices:

- ``h = (m*x) @ A`` (p > 0): the down_proj kernel (x read once) or the mask applied on the
  device and a GEMM (x read, a dropped copy written and read: three passes).
- ``dS, dB``: the low_rank_grad kernel (dY read once, plus column-block partials) or two
  GEMMs (dY read twice).
- ``dA, e`` (p > 0): the down_grad kernel (x read, e written) or the mask and two GEMMs
  (six passes).

At p = 0 there is no mask to fuse: h, dA and e are GEMMs.
"""

import math
from typing import NamedTuple

from . import geometry

F32 = 4
# Integer operations of one mask element: two rounds of the avalanche mix (8 each), the
# index's halves, the key, the compare and select.
HASH_OPS = 22


class Device(NamedTuple):
    name: str
    bandwidth: float  # bytes/s of device memory a streaming pass achieves
    gemm: dict  # FLOP/s of MLX's GEMMs, by element size (4: float32, 2: 16-bit)
    simt: float  # FLOP/s of our kernels' float32 FMAs
    integer: float  # integer operations/s (the mask's hash)
    launch: float  # seconds per kernel launch
    cache: float = 0.0  # bytes/s of the last-level cache (re-reads of a small operand)


# Peaks from the datasheets; efficiencies assumed: 85 % of bandwidth, 70 % of GEMM peak,
# 50 % of the float32 peak for our kernels (shared-memory loads, barriers), 70 % of the
# integer peak (H100: 64 INT32 lanes per SM; Apple: its ALUs, at the float rate); the
# last-level cache at 2x (H100's L2) and 1.5x (Apple's system cache) the memory's rate.
H100 = Device(
    "H100 SXM (estimate)",
    bandwidth=0.85 * 3.35e12,
    gemm={2: 0.7 * 989e12, 4: 0.7 * 494e12},  # float32 in TF32, MLX's default on CUDA
    simt=0.5 * 67e12,
    integer=0.7 * 16.7e12,
    launch=2e-6,
    cache=2 * 0.85 * 3.35e12,
)
M3_MAX = Device(
    "M3 Max, 40-core GPU (estimate)",
    bandwidth=0.85 * 400e9,
    gemm={2: 0.7 * 14.2e12, 4: 0.7 * 14.2e12},
    simt=0.5 * 14.2e12,
    integer=0.7 * 7.1e12,
    launch=5e-6,
    cache=1.5 * 0.85 * 400e9,
)


def for_backend(backend):
    """The device model the op plans with on MLX's 'cuda' or 'metal' backend."""
    return H100 if backend == "cuda" else M3_MAX


class Pass(NamedTuple):
    name: str
    bytes: float
    flops: float
    engine: str  # "gemm" or "simt"
    launches: int = 1
    int_ops: float = 0.0
    cache_bytes: float = 0.0  # re-reads served by the last-level cache

    def seconds(self, device, element_size):
        rate = device.gemm[element_size] if self.engine == "gemm" else device.simt
        compute = self.flops / rate + self.int_ops / device.integer
        cached = self.cache_bytes / device.cache if self.cache_bytes else 0.0
        return max(self.bytes / device.bandwidth, cached, compute) + self.launches * device.launch


def gemm(name, m, k, n, s, extra_bytes=0.0):
    """An (m, k) @ (k, n) GEMM of s-byte elements, writing (m, n)."""
    return Pass(name, (m * k + k * n + m * n) * s + extra_bytes, 2.0 * m * n * k, "gemm")


def parts(count, size):
    """A partial buffer of `count` x `size` floats, written once and summed once (its
    sum written too), or nothing for a single part."""
    return 0.0 if count == 1 else (2 * count + 1) * size * F32


def down_proj_options(m, k, r, s):
    """h: {"kernel": [passes], "gemm": [passes]}."""
    options = {"gemm": [masked_copy("dropped_x", m, k, s), gemm("h_gemm", m, k, r, s)]}
    if r <= geometry.MAX_RANK:
        _, grid, _ = geometry.down_proj(m, k, r, s)
        splits = grid[1]
        bytes_ = m * k * s + k * r * F32 + parts(splits, m * r) + m * r * F32
        flops = 2.0 * m * k * r
        options["kernel"] = [Pass("down_proj", bytes_, flops, "simt", 1 + (splits > 1), HASH_OPS * m * k)]
    return options


def low_rank_grad_options(m, n, r, s):
    """dS and dB: {"kernel": [passes], "gemm": [passes]}."""
    casts = (m * r + r * n) * (F32 + s) + 2 * (m * r + r * n) * (s + F32)
    options = {
        "gemm": [
            gemm("ds_gemm", m, n, r, s),
            gemm("db_gemm", r, m, n, s),
            Pass("casts", casts, 0.0, "simt", 6),
        ]
    }
    if r <= geometry.MAX_LOW_RANK:
        template, grid, _ = geometry.low_rank_grad(m, n, r, s)
        blocks = math.ceil(n / geometry.column_tile("low_rank_grad", template))
        bytes_ = m * n * s + (m * r + r * n) * F32 + parts(blocks, m * r) + parts(grid[1], r * n)
        options["kernel"] = [Pass("low_rank_grad", bytes_, 4.0 * m * n * r, "simt", 3)]
    return options


def down_grad_options(m, k, r, s):
    """dA and e: {"kernel": [passes], "gemm": [passes]}."""
    options = {
        "gemm": [
            masked_copy("dropped_x", m, k, s),
            gemm("da_gemm", k, m, r, s),
            gemm("e_gemm", m, r, k, s),
            masked_copy("masked_e", m, k, s),
        ]
    }
    if r <= geometry.MAX_RANK:
        _, grid, _ = geometry.down_grad(m, k, r, s)
        bytes_ = 2 * m * k * s + (m * r + k * r) * F32 + parts(grid[1], k * r)
        flops = 4.0 * m * k * r
        options["kernel"] = [Pass("down_grad", bytes_, flops, "simt", 1 + (grid[1] > 1), HASH_OPS * m * k)]
    return options


def masked_copy(name, m, k, s):
    """An (m, k) array read and written once with the mask applied on the way."""
    return Pass(name, 2 * m * k * s, m * k, "simt", 1, HASH_OPS * m * k)


def seconds(passes, device, s):
    return sum(p.seconds(device, s) for p in passes)


# The GEMM option must beat the kernel by this factor: the model's error is larger than
# a few per cent, and the kernel moves fewer bytes and makes no M x K temporary.
MARGIN = 0.9


def cheaper(options, device, s):
    """ "gemm" where it is estimated cheaper than the kernel by MARGIN (or the kernel
    cannot take r), else "kernel"."""
    if "kernel" not in options:
        return "gemm"
    kernel, gemms = seconds(options["kernel"], device, s), seconds(options["gemm"], device, s)
    return "gemm" if gemms < MARGIN * kernel else "kernel"


def plan(device, m, k, n, r, s, dropout):
    """How the op computes h, the up-projection, (dS, dB) and (dA, e) for these sizes:
    "kernel" or "gemm" (the up-projection is always MLX's GEMM, the bias in its
    epilogue)."""
    choice = {"ds_db": cheaper(low_rank_grad_options(m, n, r, s), device, s), "up": "gemm"}
    if dropout:
        choice["h"] = cheaper(down_proj_options(m, k, r, s), device, s)
        choice["da_e"] = cheaper(down_grad_options(m, k, r, s), device, s)
    else:
        choice["h"] = choice["da_e"] = "gemm"
    return choice


def op_passes(device, m, k, n, r, s, dropout):
    """The op's passes beyond the frozen base's two GEMMs, as the op plans them:
    {"forward": [passes], "backward": [passes]}."""
    choice = plan(device, m, k, n, r, s, dropout)
    h = down_proj_options(m, k, r, s)[choice["h"]] if dropout else [gemm("h_gemm", m, k, r, s)]
    up = gemm("up_projection", m, r, n, s, extra_bytes=(m * r + r * n) * (F32 + s))
    c_read = Pass("base_gemm_reads_the_rank_r_term", m * n * s, 0.0, "gemm", 0)
    if dropout:
        da_e = down_grad_options(m, k, r, s)[choice["da_e"]]
    else:
        da_e = [gemm("da_gemm", k, m, r, s), gemm("e_gemm", m, r, k, s)]
    e_read = Pass("dx_gemm_reads_e", m * k * s, 0.0, "gemm", 0)
    return {
        "forward": [*h, up, c_read],
        "backward": [*low_rank_grad_options(m, n, r, s)[choice["ds_db"]], *da_e, e_read],
    }


def estimate(device, m, k, n, r, s, dropout):
    """Seconds of the base GEMMs and of each extra pass, and the op's ratios to them."""
    base_forward = gemm("base_forward", m, k, n, s).seconds(device, s)
    base_backward = gemm("base_backward", m, n, k, s).seconds(device, s)
    passes = op_passes(device, m, k, n, r, s, dropout)
    forward = {p.name: p.seconds(device, s) for p in passes["forward"]}
    backward = {p.name: p.seconds(device, s) for p in passes["backward"]}
    x_bytes = m * k * s
    return {
        "device": device.name,
        "shape": {"m": m, "k": k, "n": n, "r": r, "element_size": s, "dropout": dropout},
        "plan": plan(device, m, k, n, r, s, dropout),
        "base_forward_s": base_forward,
        "base_backward_s": base_backward,
        "forward_s": forward,
        "backward_s": backward,
        # bytes each pass moves, in passes over x (M*K elements)
        "passes": {p.name: p.bytes / x_bytes for p in passes["forward"] + passes["backward"]},
        "forward_ratio": 1 + sum(forward.values()) / base_forward,
        "training_ratio": 1 + (sum(forward.values()) + sum(backward.values())) / (base_forward + base_backward),
    }


# The configurations the README quotes: bf16, r = 16, p = 0.1, square 4096 and M = 512.
README_CASES = [(4096, 4096, 4096, 16), (512, 4096, 4096, 16)]


def first_gemm_ranks(device, m, k, n, s):
    """For each choice, the smallest r at which the plan takes MLX's GEMMs (p > 0)."""
    first = {}
    for r in range(1, geometry.MAX_RANK + 2):
        for key, choice in plan(device, m, k, n, r, s, True).items():
            if choice == "gemm" and key != "up":
                first.setdefault(key, r)
    return first


def estimates():
    """The README's estimates, committed as benchmarks/results/gpu_estimates.json
    (tests/test_gpu_costs.py holds the file to this function); "mixed": the mixed op's
    (mixed_costs.py)."""
    from . import mixed_costs

    return {
        "note": "estimates from ops/gpu/costs.py (datasheet peaks x assumed efficiencies), not measurements",
        "cases": [estimate(device, m, k, n, r, 2, True) for device in (H100, M3_MAX) for m, k, n, r in README_CASES],
        "first_gemm_rank": {"H100": first_gemm_ranks(H100, 4096, 4096, 4096, 2)}
        | {"M3 Max": first_gemm_ranks(M3_MAX, 4096, 4096, 4096, 2)},
        "mixed": mixed_costs.estimates(),
    }
