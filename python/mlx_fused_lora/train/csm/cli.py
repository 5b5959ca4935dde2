"""``mlx-fused-lora finetune``: LoRA fine-tuning of CSM on a voice dataset.

The flags and defaults of the original CSM LoRA fine-tuning tool, plus warmup, schedule,
gradient accumulation, decoder amortization, seed, tokenizer, codec and gradient
checkpointing. A thin shell over `CSMLoRATrainer`. Every flag can also come from a YAML
file (``-c config.yaml``, keys as the flags' names with ``_`` or ``-``); flags given on
the command line override the file.

Exit status: 0 done, 1 a clear error (bad checkpoint, non-finite loss, no data, a file
that cannot be written: one line, no traceback unless ``--debug``), 2 a bad flag or config
file, 130 interrupted by Ctrl-C after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..cli_args import (
    DefaultsOnceFormatter,
    OneLineErrorParser,
    add_start_and_growth_flags,
    apply_config_file,
    check_at_least,
    check_number,
    need,
)
from ..command import finished_line, run_command, run_length, train_in_folder

__all__ = ["build_parser", "main"]

log = logging.getLogger("mlx_fused_lora.finetune")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="mlx-fused-lora finetune",
        description="Fine-tune CSM with LoRA (fused LoRA layers) on audio + transcripts.",
        formatter_class=DefaultsOnceFormatter,
    )
    p.add_argument(
        "-c",
        "--config",
        default=None,
        help="YAML file of flags (keys such as lora_r or learning-rate); command-line flags override it",
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model-path",
        required=True,
        help="CSM checkpoint: a .safetensors file or a directory (torchtune, mlx or Hugging Face layout)",
    )
    g.add_argument(
        "--output-dir",
        required=True,
        help="where checkpoints, metrics.jsonl, loss_curve.png and the fine-tuned model go",
    )
    g.add_argument(
        "--audio-dir",
        required=True,
        help="<stem>.wav files, or pre-encoded Mimi codes <stem>.npy / <stem>.safetensors ([32, frames])",
    )
    g.add_argument(
        "--transcript-dir",
        default=None,
        help="<stem>.txt transcripts (default: a 'transcripts' folder beside --audio-dir, else --audio-dir)",
    )
    g.add_argument(
        "--alignment-dir",
        default=None,
        help="optional <stem>.json word timings used to cut segments (default: an 'alignments' folder beside --audio-dir)",
    )
    g.add_argument(
        "--drop-mismatched-data",
        action="store_true",
        help="train on the model's first codebooks of data that has more, and skip files with codes outside its "
        "vocabulary (refused otherwise)",
    )
    g.add_argument("--speaker-id", type=int, default=0, help="speaker id written as [id] before each transcript")
    g.add_argument(
        "--max-seq-len",
        type=int,
        default=2048,
        help="frames per sample (text rows + audio frames); longer samples lose context turns, then audio",
    )
    g.add_argument(
        "--context-turns",
        type=int,
        default=2,
        help="preceding segments of the same file given as context to each training segment",
    )
    g.add_argument(
        "--tokenizer",
        default=None,
        help="Llama-3 tokenizer: tokenizer.json or tiktoken tokenizer.model (default: one beside --model-path); 'byte' for random demo models",
    )
    g.add_argument(
        "--codec-path",
        default=None,
        help="local Mimi weights (.safetensors) for WAV input and WAV samples; needs the [audio] extra (mlx-audio)",
    )

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (scale = alpha / r)")
    g.add_argument(
        "--lora-dropout",
        type=float,
        default=0.05,
        help="dropout on the LoRA input (fused: a recomputed mask, no stored copy)",
    )
    g.add_argument(
        "--target-modules",
        nargs="+",
        default=["q_proj", "v_proj"],
        help="projections to adapt, in both stacks: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj; heads: codebook0_head projection",
    )
    g.add_argument(
        "--target-layers",
        nargs="+",
        type=int,
        default=None,
        help="layer indices to adapt (default: all layers of both stacks)",
    )
    g.add_argument(
        "--lora-bias", action="store_true", help="also train the adapted layers' biases (CSM's projections have none)"
    )
    g.add_argument(
        "--adapter-name",
        default="default",
        help="name of the trained adapter, e.g. one per speaker, to load several by name on one base "
        "(`mlx-fused-lora generate --adapter NAME=DIR`); PEFT's name when none is given: %(default)s",
    )
    g.add_argument(
        "--adapter-per-speaker",
        action="store_true",
        help="one adapter per speaker of the data (a transcript's [N] tag, else --speaker-id), named speaker_N, "
        "trained in one run on mixed batches (each row on its speaker's adapter); each saved in "
        "OUTPUT_DIR/speaker_N/",
    )
    g.add_argument(
        "--resume-adapter-file",
        default=None,
        help="start the trained adapter from this adapter (folder or weights file, any format; mlx-lm's flag): "
        "same modules and ranks as this run's, which keeps its own scale and dropout",
    )
    g.add_argument(
        "--frozen-adapters",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help="named adapters loaded frozen and run stacked under the trained one, which is added beside them",
    )
    add_start_and_growth_flags(g)
    g.add_argument(
        "--lora-layer",
        choices=["fused", "plain"],
        default="fused",
        help="fused: FusedLoRALinear; plain: mlx-lm's LoRALinear (for comparison)",
    )

    g = p.add_argument_group("optimization")
    g.add_argument("--learning-rate", type=float, default=1e-4, help="peak AdamW learning rate")
    g.add_argument(
        "--semantic-weight", type=float, default=100.0, help="weight of the codebook-0 (semantic) cross-entropy"
    )
    g.add_argument(
        "--acoustic-weight",
        type=float,
        default=1.0,
        help="weight of the mean cross-entropy of codebooks 1..31 (acoustic)",
    )
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay")
    g.add_argument("--batch-size", type=int, default=2, help="samples per micro-batch (per process under mlx.launch)")
    g.add_argument(
        "--epochs", type=int, default=5, help="passes over the training samples, used when --max-steps is not given"
    )
    g.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="the run's length in optimizer steps, the data cycled as needed (default: --epochs decides)",
    )
    g.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm to this (0: no clipping)"
    )
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: 5%% of the run)")
    g.add_argument(
        "--lr-schedule",
        choices=["cosine", "linear", "constant"],
        default="cosine",
        help="decay after warmup (cosine and linear end at 10%% of the peak)",
    )
    g.add_argument("--grad-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument(
        "--decoder-fraction",
        type=float,
        default=1 / 16,
        help="fraction of frames the audio decoder is trained on (compute amortization)",
    )
    g.add_argument(
        "--grad-checkpoint",
        action="store_true",
        help="recompute transformer blocks in the backward pass (less memory, more time)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=42,
        help="seed of the split, the data order, the adapters' init, dropout and frame choice",
    )

    g = p.add_argument_group("validation, checkpoints, outputs")
    g.add_argument("--val-split", type=float, default=0.1, help="fraction of samples held out for validation")
    g.add_argument("--val-every", type=int, default=100, help="validate every N steps (0: only at the end)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and always at the end)")
    g.add_argument(
        "--resume-from",
        default=None,
        help="a checkpoint directory (or an output dir / checkpoints dir: its latest) to continue from exactly",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the checkpoints of an earlier run in --output-dir and start anew (refused otherwise)",
    )
    g.add_argument(
        "--save-mode",
        choices=["lora", "full", "both"],
        default="lora",
        help="lora: fine_tuned_model.safetensors + fine_tuned_model_metadata.json; full: merged model.safetensors + config.json; both",
    )
    g.add_argument(
        "--generate-samples",
        action="store_true",
        help="write sample.wav (or sample.npy codes without --codec-path) after training",
    )
    g.add_argument(
        "--sample-prompt", default="This is a test of the fine-tuned voice.", help="text of the generated sample"
    )
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    g.add_argument("--debug", action="store_true", help="DEBUG logging and full tracebacks")
    g.add_argument("--no-progress", action="store_true", help="no progress line")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Range checks naming the flag (``parser.error``: one line, exit status 2)."""
    check_at_least(parser, args, 1, "--batch-size", "--lora-r", "--grad-accumulation-steps", "--max-seq-len")
    check_at_least(parser, args, 0, "--context-turns", "--val-every", "--save-every", "--speaker-id", "--warmup-steps")
    if args.max_steps is not None:
        check_at_least(parser, args, 1, "--max-steps")
    else:
        need(parser, args.epochs >= 1, "--epochs", ">= 1 when --max-steps is not given", args.epochs)
    check_number(parser, args, "--learning-rate", 0.0, open_low=True)
    check_number(parser, args, "--lora-alpha", 0.0, open_low=True)
    check_number(parser, args, "--lora-dropout", 0.0, high=1.0)
    check_number(parser, args, "--weight-decay", 0.0)
    check_number(parser, args, "--max-grad-norm", 0.0)
    check_number(parser, args, "--val-split", 0.0, high=1.0)
    check_number(parser, args, "--decoder-fraction", 0.0, open_low=True, high=1.0, open_high=False)
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args = check_args(parser, apply_config_file(parser, argv))
    return run_command(args, lambda run: _run(args, run), log)


def _run(args, run: dict) -> int:
    from pathlib import Path

    out = Path(args.output_dir)

    def finished(recorded: dict, world_size: int) -> str | None:
        """With --epochs, the run's length is counted over the checkpoint's recorded samples."""
        from .outputs import expected_outputs
        from .speakers import speaker_name

        total = run_length(
            recorded, args.max_steps, args.batch_size, world_size, args.grad_accumulation_steps, args.epochs
        )
        speakers = [speaker_name(i) for i in recorded.get("speakers", ())]
        wanted = expected_outputs(out, args.save_mode, args.generate_samples, args.codec_path is not None, speakers)
        return finished_line(recorded, total, wanted, out, "--max-steps")

    def train(world, recorded):
        from .task import CSMLoRATrainer

        run["stage"] = "loading the model"
        trainer = CSMLoRATrainer(
            args.model_path,
            args.output_dir,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            tokenizer=args.tokenizer,
            codec_path=args.codec_path,
            world=world,
            progress=not args.no_progress,
            drop_mismatched_data=args.drop_mismatched_data,
            lora_dropout=args.lora_dropout,
            target_modules=args.target_modules,
            target_layers=args.target_layers,
            lora_bias=args.lora_bias,
            lora_layer=args.lora_layer,
            adapter_name=args.adapter_name,
            adapter_per_speaker=args.adapter_per_speaker,
            resume_adapter_file=args.resume_adapter_file,
            frozen_adapters=args.frozen_adapters or (),
            init_lora_weights=args.init_lora_weights,
            rank_pattern=dict(args.rank_pattern or ()),
            alpha_pattern=dict(args.alpha_pattern or ()),
            rank_schedule=args.rank_schedule,
            learning_rate=args.learning_rate,
            semantic_weight=args.semantic_weight,
            acoustic_weight=args.acoustic_weight,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
            warmup_steps=args.warmup_steps,
            lr_schedule=args.lr_schedule,
            grad_accumulation_steps=args.grad_accumulation_steps,
            decoder_fraction=args.decoder_fraction,
            seed=args.seed,
            max_seq_len=args.max_seq_len,
            grad_checkpoint=args.grad_checkpoint,
        )
        run["trainer"] = trainer
        trainer.prepare_data(
            args.audio_dir,
            args.transcript_dir,
            args.alignment_dir,
            speaker_id=args.speaker_id,
            context_turns=args.context_turns,
            val_split=args.val_split,
        )
        plan = trainer.plan_run(args.epochs, args.batch_size, args.max_steps)
        if world.is_main:  # the run's first line: how many steps, and why
            print(plan.describe(recorded["step"] if recorded else 0), flush=True)
        result = trainer.train(
            epochs=args.epochs,
            batch_size=args.batch_size,
            val_every=args.val_every,
            save_every=args.save_every,
            resume_from=args.resume_from,
            save_mode=args.save_mode,
            max_steps=args.max_steps,
            generate_samples=args.generate_samples,
            sample_prompt=args.sample_prompt,
            speaker_id=args.speaker_id,
            overwrite=args.overwrite,
            convert_to_lora=args.convert_to_lora,
        )
        return result

    return train_in_folder(out, args.resume_from, finished, train)


if __name__ == "__main__":
    sys.exit(main())
