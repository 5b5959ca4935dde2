"""``mlx-fused-lora convert-adapter IN OUT --to peft|mlx-lm|csm-cli``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import convert_adapter, detect_adapter_format
from .registry import format_names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-fused-lora convert-adapter",
        description="Convert a LoRA adapter between the mlx-lm, PEFT and CSM-CLI formats "
        "(the input format is detected from its file names).",
    )
    parser.add_argument("input", help="adapter directory (or its weights file)")
    parser.add_argument("output", help="directory to write the converted adapter into")
    parser.add_argument("--to", required=True, choices=format_names(), help="output format")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the converter; returns the exit status (0 ok, 2 bad arguments, 1 failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert-adapter":
        argv = argv[1:]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on errors
        return int(e.code or 0)
    try:
        source = detect_adapter_format(args.input)
        written = convert_adapter(args.input, args.output, args.to)
    except (OSError, ValueError, KeyError) as e:
        print(f"convert-adapter: error: {e}", file=sys.stderr)
        return 1
    print(f"converted {source} adapter {args.input} -> {args.to} {written}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
