"""``mlx-fused-lora layer-demo``: the fused LoRA layer against the plain one, side by side.

Needs no downloads: random weights, one LoRA linear layer of a typical LLM width,
forward and forward+backward (gradients of x and the adapters), timed and with
peak memory, on whatever device MLX runs on. The kinds' rounds are interleaved, as in
``mlx-fused-lora bench``, and a result the run cannot trust (fused below the limit,
the limit's own rounds drifting) is marked as such.
"""

import argparse

import mlx.core as mx
import numpy as np

from ..layers import FusedLoRALinear, plain_layer_class
from .cases import cases, layer_from_inputs, limit_path, make_inputs
from .machine import blas_report
from .report import untrusted_reasons
from .timing import measure_interleaved

KINDS = ("fused", "plain", "limit")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="mlx-fused-lora layer-demo",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tokens", type=int, default=512, help="M: rows of x (batch x sequence)")
    parser.add_argument("--dims", type=int, default=1024, help="K = N: the layer's width")
    parser.add_argument("--rank", type=int, default=16, help="the LoRA rank r")
    parser.add_argument("--dropout", type=float, default=0.1, help="the LoRA dropout p")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per case, interleaved (the best is shown)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    inputs = make_inputs(args.tokens, args.dims, args.dims, args.rank)
    blas = blas_report(limit_path(mx.default_device()), with_peft=False)
    print(
        f"device {mx.default_device()}, x ({args.tokens}, {args.dims}) float32, "
        f"W ({args.dims}, {args.dims}), r = {args.rank}, dropout = {args.dropout}\n"
        f"BLAS: fused and limit {blas['fused']}; plain (MLX's matmul) {blas['plain_peers']}"
    )

    # Same parameters, no dropout: the two layers must agree before timing means anything.
    fused_layer, plain_layer = (
        layer_from_inputs(cls, inputs, dropout=0.0).eval() for cls in (FusedLoRALinear, plain_layer_class())
    )
    diff = np.abs(np.array(fused_layer(inputs["x"])) - np.array(plain_layer(inputs["x"]))).max()
    print(f"max |fused - plain| at dropout 0: {diff:.2e}")

    timed = cases(inputs, dropout=args.dropout, kinds=KINDS)
    print(
        f"\n{'':<18}{'fused':>10}{'plain':>10}{'limit':>10}{'plain/fused':>13}{'fused/limit':>13}"
        f"{'fused MiB':>11}{'plain MiB':>11}",
        flush=True,
    )
    notes = []
    for pass_name in ("forward", "forward_backward"):
        fns = {kind: timed[kind][pass_name] for kind in KINDS}
        result = measure_interleaved(fns, budget_s=1e9, max_rounds=args.rounds, min_rounds={})
        t = {kind: result[kind]["time_s"] for kind in KINDS}
        mem = {kind: result[kind]["peak_memory"] / 2**20 for kind in KINDS}
        doubts = untrusted_reasons(result)
        if doubts:
            notes.append(f"{pass_name}: untrusted ({', '.join(doubts)}): the machine's load moved; run it again")
        print(
            f"{pass_name:<18}"
            + "".join(f"{t[k] * 1e3:>8.1f}ms" for k in KINDS)
            + f"{t['plain'] / t['fused']:>12.2f}x{t['fused'] / t['limit']:>12.3f}x"
            + ("?" if doubts else "")
            + f"{mem['fused']:>10.1f}{mem['plain']:>11.1f}"
        )
    for note in notes:
        print(note)
    cls = plain_layer_class()
    print(
        f"\nplain: {cls.__module__}.{cls.__name__}. limit: the base GEMM (forward) or the two GEMMs "
        "x @ W.T, dY @ W (forward_backward) alone: no LoRA layer beats it; fused/limit is what the "
        "LoRA path costs.\n"
        + (
            "plain runs on MLX's reference BLAS here, so plain/fused is mostly the BLAS's difference "
            "(the mlx-fused-lora command puts MLX on OpenBLAS unless --no-fast-blas).\n"
            if not blas["same_blas"]
            else ""
        )
        + "Memory: MLX's peak while the case ran, inputs included."
    )
    return 0
