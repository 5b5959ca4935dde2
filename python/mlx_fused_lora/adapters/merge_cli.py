"""``mlx-fused-lora merge-adapters A B ... --weights ... --method ... --out DIR``: weighted merge of adapter files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .merge import MERGE_METHODS, SIGN_METHODS, MergeArgumentError, merge_adapters
from .registry import format_names, read_adapters, write_adapters

_FLAGS = {
    "adapters": "ADAPTER",
    "weights": "--weights",
    "combination_type": "--method",
    "density": "--density",
    "svd_rank": "--svd-rank",
    "majority_sign_method": "--majority-sign-method",
    "seed": "--seed",
}


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage + message
        raise _ArgumentError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mlx-fused-lora merge-adapters",
        description="Merge LoRA adapters (any format we read) into one, as PEFT's add_weighted_adapter does, "
        "each module with its own scale (rsLoRA, rank/alpha patterns). The result has scale 1.",
    )
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter directories (or weights files)")
    parser.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per adapter")
    parser.add_argument("--method", required=True, choices=MERGE_METHODS, help="how to combine them")
    parser.add_argument("--density", type=float, help="fraction kept, in (0, 1]: ties, dare_*, magnitude_prune")
    parser.add_argument("--svd-rank", type=int, help="svd's rank (default: the largest input rank)")
    parser.add_argument("--majority-sign-method", choices=SIGN_METHODS, default="total", help="ties, dare_ties")
    parser.add_argument("--seed", type=int, help="dare_*'s masks (default: random)")
    parser.add_argument("--out", required=True, help="directory to write the merged adapter into")
    parser.add_argument("--format", choices=format_names(), help="output format (default: the first input's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the merge; returns the exit status (0 ok, 2 bad arguments, 1 failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge-adapters":
        argv = argv[1:]
    try:
        args = build_parser().parse_args(argv)
    except _ArgumentError as e:
        print(f"merge-adapters: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    try:
        inputs = [read_adapters(path) for path in args.adapters]
        merged = merge_adapters(
            [adapters for adapters, _ in inputs],
            args.weights,
            args.method,
            density=args.density,
            svd_rank=args.svd_rank,
            majority_sign_method=args.majority_sign_method,
            seed=args.seed,
        )
        fmt = args.format or inputs[0][1]
        written = write_adapters(merged, args.out, fmt)
    except MergeArgumentError as e:
        print(f"merge-adapters: error: argument {_FLAGS.get(e.argument, e.argument)}: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # not KeyError's quoted repr
        print(f"merge-adapters: error: {message}", file=sys.stderr)
        return 1
    ranks = sorted({m.r for m in merged.modules.values()})
    rank = ranks[0] if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    print(
        f"merged {len(inputs)} adapters ({args.method}, {len(merged.modules)} modules, rank {rank}) -> {fmt} {written}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
