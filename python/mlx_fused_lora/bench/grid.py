"""The benchmark grid: shapes, dtypes, dropout rates, passes and the kinds measured side by side."""

from dataclasses import dataclass

import mlx.core as mx

# The kinds measured on every group's inputs. "peft" and "peft_limit" (PyTorch + PEFT)
# join them when torch and peft are installed: see peft_peer.py.
KINDS = ("fused", "plain", "plain_compiled", "plain_addmm", "limit")
PEERS = ("plain", "plain_compiled", "plain_addmm")
PASSES = ("forward", "forward_backward")
DROPOUTS = (0.0, 0.1)
SCALE = 2.0

# The grid. Shapes are M x K x N with K = N, and the LoRA rank r.
FULL_M = (512, 2048, 8192)
FULL_KN = (1024, 2048, 4096)
FULL_R = (8, 16, 64)

# Targets from the core-op issue, checked where the grid has their shape:
# fused / limit per pass, and fused peak memory at p = 0.1 over p = 0.
TARGET_SHAPE = (2048, 2048, 2048, 16, "float32")
TARGETS = {
    ("forward", "time"): 1.10,
    ("forward_backward", "time"): 1.15,
    ("forward_backward", "memory"): 1.01,
}

# Where MLX's own matmuls run on the reference BLAS its Linux wheel bundles (~2
# GFLOP/s here: the fast BLAS turned off), the full peer grid would take about ten
# hours on 2 cores; there the peers run by default only where the base GEMM is at
# most this many GFLOP (2 * 512 * 2048 * 2048 or 2 * 2048 * 1024 * 1024, ~1-2 s a
# call). With a real BLAS under MLX (the default) there is no cap.
CPU_PEER_MAX_GFLOP = 4.3


@dataclass(frozen=True)
class Shape:
    m: int
    k: int
    n: int
    r: int

    @property
    def gflop(self):
        """GFLOP of the base forward GEMM, 2 M K N."""
        return 2 * self.m * self.k * self.n / 1e9

    @property
    def label(self):
        return f"{self.m}x{self.k}x{self.n} r{self.r}"


@dataclass(frozen=True)
class Group:
    """One side-by-side comparison: every kind in `kinds` on the same inputs."""

    shape: Shape
    dtype: str
    dropout: float
    pass_name: str
    kinds: tuple


def full_shapes():
    return [Shape(m, kn, kn, r) for m in FULL_M for kn in FULL_KN for r in FULL_R]


def quick_shapes():
    # One LLM-width layer: the four peers and the limit in about a minute on 2 cores.
    return [Shape(512, 1024, 1024, 16)]


def parse_shape(text):
    """'MxKxNxR' (or 'MxKxN' with r = 16) -> Shape."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 3:
        parts.append(16)
    if len(parts) != 4 or min(parts) < 1:
        raise ValueError(f"shape {text!r}: expected MxKxNxR with positive integers, e.g. 512x1024x1024x16")
    return Shape(*parts)


def device_dtypes(device=None):
    """fp32 on the CPU; bf16 and fp16 on a GPU."""
    device = mx.default_device() if device is None else device
    return ("float32",) if device == mx.cpu else ("bfloat16", "float16")


def default_peer_max_gflop(device=None):
    """0 (no cap), or CPU_PEER_MAX_GFLOP where MLX's CPU matmuls run on its reference BLAS."""
    from .. import fast_blas

    device = mx.default_device() if device is None else device
    if device == mx.cpu and fast_blas.active_blas() == fast_blas.REFERENCE_BLAS:
        return CPU_PEER_MAX_GFLOP
    return 0.0


def grid(shapes, dtypes, dropouts=DROPOUTS, passes=PASSES, peer_max_gflop=0.0, extra_kinds=()):
    """The groups to measure, shape-major so each shape's inputs are made once.

    peer_max_gflop: run the peers only where the base GEMM is at most this many GFLOP
    (0: everywhere, the default; fused and the limit run on every shape). extra_kinds
    (the PyTorch + PEFT pair) follow the peers.
    """
    groups = []
    for shape in shapes:
        with_peers = not peer_max_gflop or shape.gflop <= peer_max_gflop
        kinds = (KINDS + tuple(extra_kinds)) if with_peers else ("fused", "limit")
        for dtype in dtypes:
            for p in dropouts:
                for pass_name in passes:
                    groups.append(Group(shape, dtype, float(p), pass_name, kinds))
    return groups
