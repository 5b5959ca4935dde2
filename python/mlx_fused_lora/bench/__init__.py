"""The benchmark suite: the fused op against plain MLX and the GEMM limit (a leaf: nothing in the package imports it)."""

from .cli import main

__all__ = ["main"]
