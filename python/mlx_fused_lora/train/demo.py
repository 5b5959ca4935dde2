"""``mlx-fused-lora demo``: the main job, end to end, on a tiny random CSM; no downloads.

A random CSM (CSM-1B's structure at a small width: 32 Mimi codebooks, a 2051-entry audio
vocabulary) is saved to a temporary directory; a synthetic voice dataset is written there
as files (codes, transcripts, word timings) and read back through the trainer's data path;
the model is then fine-tuned twice from the same start, same data order, same seed: with
`FusedLoRALinear` and with mlx-lm-style plain LoRA layers (mlx-lm's ``LoRALinear`` when
mlx-lm is installed). Printed side by side: steps/s (compile steps excluded), peak memory
and first/final loss. Text is tokenized bytewise (the model is random; real runs use the
Llama-3 tokenizer).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

__all__ = ["demo_config", "run_demo", "main"]


def demo_config(width: int = 512, layers: int = 4):
    from ..csm import CSMConfig, LlamaFlavor

    backbone = LlamaFlavor(
        num_layers=layers, num_heads=8, num_kv_heads=4, embed_dim=width, intermediate_dim=2 * width, max_seq_len=512
    )
    decoder = LlamaFlavor(
        num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=width // 2, intermediate_dim=width, max_seq_len=64
    )
    return CSMConfig(backbone, decoder, text_vocab_size=260, audio_vocab_size=2051, audio_num_codebooks=32)


def run_demo(
    workdir: Path,
    steps: int,
    batch_size: int,
    dropout: float,
    width: int,
    layers: int,
    targets,
    seed: int = 0,
    layer_kinds=("fused", "plain"),
    quiet: bool = True,
) -> dict:
    """Train each layer kind from the same files; returns ``{kind: TrainResult}``."""
    from ..layers import plain_layer_class
    from .synthetic import write_random_csm, write_synthetic_dataset
    from .trainer import CSMLoRATrainer

    model_dir = write_random_csm(workdir / "model", demo_config(width, layers), seed=seed)
    audio_dir = write_synthetic_dataset(
        workdir / "data", num_files=24, frames=(24, 32), words_per_file=(3, 4), seed=seed
    )
    results = {}
    for kind in layer_kinds:
        trainer = CSMLoRATrainer(
            model_dir,
            workdir / f"out-{kind}",
            lora_r=8,
            lora_alpha=16.0,
            tokenizer="byte",
            lora_dropout=dropout,
            target_modules=targets,
            learning_rate=2e-3,
            warmup_steps=2,
            seed=seed,
            lora_layer=kind,
            progress=not quiet,
            max_seq_len=512,
        )
        trainer.prepare_data(audio_dir, context_turns=1, val_split=0.1)
        results[kind] = trainer.train(
            epochs=0, max_steps=steps, batch_size=batch_size, val_every=0, save_every=0, save_mode="lora"
        )
        del trainer
    results["plain_class"] = f"{plain_layer_class().__module__}.{plain_layer_class().__name__}"
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="mlx-fused-lora demo",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--width", type=int, default=256, help="backbone width (the decoder is half)")
    p.add_argument("--layers", type=int, default=4, help="backbone layers")
    p.add_argument(
        "--target-modules",
        nargs="+",
        default=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "codebook0_head",
            "projection",
        ],
        help="LoRA targets (default: every linear, heads included)",
    )
    p.add_argument(
        "--workdir", default=None, help="keep the model, data and outputs here (default: a temporary directory)"
    )
    p.add_argument("--verbose", action="store_true", help="trainer logging and progress")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    import mlx.core as mx

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mlx-fused-lora-demo-") as tmp:
        workdir = Path(args.workdir or tmp)
        print(
            f"device {mx.default_device()}: random CSM (32 codebooks, backbone {args.layers} x {args.width}), "
            f"synthetic dataset written to {workdir} and read back; LoRA r=8 on {' '.join(args.target_modules)}, "
            f"dropout {args.lora_dropout}, batch {args.batch_size}, {args.steps} steps each"
        )
        r = run_demo(
            workdir,
            args.steps,
            args.batch_size,
            args.lora_dropout,
            args.width,
            args.layers,
            args.target_modules,
            quiet=not args.verbose,
        )
    fused, plain = r["fused"], r["plain"]
    print(f"\n{'':<22}{'fused':>12}{'plain':>12}{'plain/fused':>13}")
    print(
        f"{'steps/s':<22}{fused.steps_per_s:>12.2f}{plain.steps_per_s:>12.2f}{fused.steps_per_s / plain.steps_per_s:>12.2f}x"
    )
    print(f"{'step time (ms)':<22}{fused.step_time_s * 1e3:>12.1f}{plain.step_time_s * 1e3:>12.1f}")
    print(
        f"{'peak memory (MiB)':<22}{fused.peak_memory_mb:>12.1f}{plain.peak_memory_mb:>12.1f}{plain.peak_memory_mb / fused.peak_memory_mb:>12.2f}x"
    )
    print(f"{'first loss':<22}{fused.losses[0][1]:>12.3f}{plain.losses[0][1]:>12.3f}")
    print(f"{'final loss':<22}{fused.final_loss:>12.3f}{plain.final_loss:>12.3f}")
    falls = all(x.final_loss < x.losses[0][1] for x in (fused, plain))
    print(
        f"\nplain: {r['plain_class']}. The loss {'falls' if falls else 'DID NOT FALL'} in both runs. "
        f"Total {time.perf_counter() - t0:.0f} s."
    )
    return 0 if falls else 1


if __name__ == "__main__":
    raise SystemExit(main())
