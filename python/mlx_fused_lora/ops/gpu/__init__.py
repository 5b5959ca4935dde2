"""GPU kernels of the fused op: one body per kernel, a prelude per dialect (CUDA, Metal,
OpenCL C), launched through MLX on a GPU or through OpenCL (PoCL) in the tests."""

from .kernels import Kernels, MLXLauncher

__all__ = ["Kernels", "MLXLauncher"]
