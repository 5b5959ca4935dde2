"""``mlx-fused-lora generate``: speech from a CSM with one or several named adapters on one loaded base.

Each ``--adapter NAME=DIR`` loads an adapter (any format, or a ``finetune`` output folder)
under its name beside the others; ``--use NAME[=WEIGHT] ...`` picks the adapters to speak
with (several: stacked, weighted), by default the first loaded. One sample per
``--use`` group is written when ``--output`` names several files, so two voices come from
one model load. Exit status: 0 done, 1 a clear error (one line), 2 a bad flag.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..cli_args import DefaultsOnceFormatter, OneLineErrorParser

__all__ = ["build_parser", "main", "parse_use"]

log = logging.getLogger("mlx_fused_lora.generate")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="mlx-fused-lora generate",
        description="Generate speech with a CSM and named LoRA adapters (one per voice) on one loaded base.",
        formatter_class=DefaultsOnceFormatter,
    )
    p.add_argument("--model-path", required=True, help="CSM checkpoint (a .safetensors file or a directory)")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="load the adapter in DIR as NAME (repeatable; DIR alone: named 'default')",
    )
    p.add_argument(
        "--use",
        nargs="+",
        action="append",
        default=None,
        metavar="NAME[=WEIGHT]",
        help="adapters to speak with, stacked with their weights; repeat --use for one sample per group "
        "(default: the first --adapter; 'none': the base model)",
    )
    p.add_argument("--text", required=True, help="what to say")
    p.add_argument(
        "--output",
        nargs="+",
        required=True,
        help="sample file(s), one per --use group: WAV with --codec-path, else the Mimi codes as .npy",
    )
    p.add_argument("--speaker-id", type=int, default=0, help="speaker id written as [id] before the text")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json / tokenizer.model (default: beside the model)")
    p.add_argument("--codec-path", default=None, help="Mimi weights (.safetensors) to decode the codes to a WAV")
    p.add_argument("--max-frames", type=int, default=125, help="most audio frames to generate (12.5 per second)")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely codes")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    return p


def parse_use(items: list[str]) -> dict[str, float] | list:
    """``["a=0.5", "b"]`` -> ``{"a": 0.5, "b": 1.0}``; ``["none"]`` -> ``[]`` (the base)."""
    if items == ["none"]:
        return []
    out = {}
    for item in items:
        name, sep, weight = item.partition("=")
        try:
            out[name] = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"--use {item}: the weight must be a number") from None
    return out


def _load_adapters(model, specs: list[str]) -> list[str]:
    from ...adapters import load_adapters

    names = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else ("default", spec)
        load_adapters(model, path, name=name)
        names.append(name)
    return names


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    groups = args.use
    if groups is not None and len(groups) != len(args.output):
        parser.error(f"--output names {len(args.output)} files for {len(groups)} --use groups")
    if groups is None and len(args.output) != 1:
        parser.error("several --output files need one --use group each")
    if args.max_frames < 1:
        parser.error(f"argument --max-frames: must be >= 1, got {args.max_frames}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        from ...csm import load_csm
        from .audio import MimiCodec
        from .data import DataSpec
        from .sampling import write_sample
        from .tokenizer import load_text_tokenizer

        model = load_csm(args.model_path)
        loaded = _load_adapters(model, args.adapter)
        uses = [parse_use(g) for g in groups] if groups else [loaded[:1] or []]
        tokenizer = load_text_tokenizer(args.tokenizer, args.model_path)
        cfg = model.config
        spec = DataSpec(cfg.audio_num_codebooks, cfg.audio_vocab_size, cfg.text_vocab_size, speaker_id=args.speaker_id)
        codec = MimiCodec(args.codec_path, cfg.audio_num_codebooks) if args.codec_path else None
        for use, output in zip(uses, args.output, strict=True):
            path = write_sample(
                model,
                tokenizer,
                spec,
                args.text,
                output,
                codec=codec,
                max_frames=args.max_frames,
                temperature=args.temperature,
                top_k=args.top_k,
                seed=args.seed,
                adapters=use,
            )
            said = ", ".join(f"{n}={w:g}" for n, w in use.items()) if isinstance(use, dict) else ", ".join(use)
            print(f"wrote {path} ({said or 'the base model'})")
    except (ValueError, KeyError, OSError, RuntimeError, ImportError) as e:
        if args.debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        log.error("%s", " ".join(str(message).split()))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
