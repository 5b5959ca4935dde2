"""``mlx-fused-lora layer-demo``: the fused LoRA layer against the plain one, side by side.

Needs no downloads: random weights, one LoRA linear layer of a typical LLM width,
forward and forward+backward (gradients of x and the adapters), timed and with
peak memory, on whatever device MLX runs on.
"""

import argparse

import mlx.core as mx
import numpy as np

from ..layers import FusedLoRALinear, plain_layer_class
from .cases import cases, layer_from_inputs, make_inputs
from .timing import best_time, peak_memory


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mlx-fused-lora layer-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="M: rows of x (batch x sequence)")
    parser.add_argument("--dims", type=int, default=1024, help="K = N: the layer's width")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per case (the best is shown)")
    args = parser.parse_args(argv)

    inputs = make_inputs(args.tokens, args.dims, args.dims, args.rank)
    print(
        f"device {mx.default_device()}, x ({args.tokens}, {args.dims}) float32, "
        f"W ({args.dims}, {args.dims}), r = {args.rank}, dropout = {args.dropout}"
    )

    # Same parameters, no dropout: the two layers must agree before timing means anything.
    fused_layer, plain_layer = (
        layer_from_inputs(cls, inputs, dropout=0.0).eval() for cls in (FusedLoRALinear, plain_layer_class())
    )
    diff = np.abs(np.array(fused_layer(inputs["x"])) - np.array(plain_layer(inputs["x"]))).max()
    print(f"max |fused - plain| at dropout 0: {diff:.2e}")

    timed = cases(inputs, dropout=args.dropout)
    print(
        f"\n{'':<18}{'fused':>10}{'plain':>10}{'limit':>10}{'plain/fused':>13}{'fused/limit':>13}"
        f"{'fused MiB':>11}{'plain MiB':>11}"
    )
    for pass_name in ("forward", "forward_backward"):
        t = {k: best_time(timed[k][pass_name], args.rounds) for k in ("fused", "plain", "limit")}
        mem = {k: peak_memory(timed[k][pass_name]) / 2**20 for k in ("fused", "plain")}
        print(
            f"{pass_name:<18}"
            + "".join(f"{t[k] * 1e3:>8.1f}ms" for k in ("fused", "plain", "limit"))
            + f"{t['plain'] / t['fused']:>12.2f}x{t['fused'] / t['limit']:>12.3f}x"
            + f"{mem['fused']:>11.1f}{mem['plain']:>11.1f}"
        )
    print(
        f"\nplain: {plain_layer_class().__module__}.{plain_layer_class().__name__}. limit: the base GEMM "
        "(forward) or the two GEMMs x @ W.T, dY @ W (forward_backward) alone, through the same BLAS.\n"
        "On Linux, plain MLX runs its CPU matmuls on the reference BLAS its wheel ships: most of the "
        "speed-up over plain is the BLAS; fused/limit is what the fusion costs.\n"
        "Memory: MLX's peak while the case ran, inputs included."
    )
    return 0
