"""``python -m mlx_fused_lora.lm_lora --train-mode dpo|orpo``: preference training with mlx-lm's and mlx-lm-lora's flags.

The flags are ``mlx_lm.lora``'s where it has them (``--model``, ``--train``, ``--data``,
``--adapter-path``, ``--fine-tune-type``, ``--num-layers``, ``--batch-size``, ``--iters``,
``--learning-rate``, ``--steps-per-report``, ``--steps-per-eval``, ``--val-batches``,
``--save-every``, ``--resume-adapter-file``, ``--max-seq-length``, ``--grad-checkpoint``,
``--seed``, ``-c`` with ``lora_parameters`` in the YAML file), mlx-lm-lora's for the
preference ones (``--train-mode``, ``--beta``, ``--dpo-cpo-loss-type``,
``--reference-model-path``, ``--epochs``, and its spellings ``--train-type`` and
``--gradient-accumulation-steps``), TRL's ``--label-smoothing``, and ``finetune``'s for what
neither has (``--resume-from``, ``--overwrite``, ``--precompute-reference``,
``--max-grad-norm``, ``--lr-schedule``, ``--warmup-steps``, ``--no-progress``, ``--debug``).
The data is mlx-lm-lora's: ``train.jsonl`` / ``valid.jsonl`` rows of ``prompt``, ``chosen``,
``rejected`` (``system`` optional). ``--adapter-path`` is the run's folder: checkpoints,
``metrics.jsonl``, ``loss_curve.png`` and the adapter as mlx-lm writes it.

Exit status as ``finetune``'s (`train.command`): 0 done, 1 a clear error in one line, 2 a
bad flag or config file, 130 Ctrl-C (after saving a checkpoint when training).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..cli_args import DefaultsOnceFormatter, OneLineErrorParser, apply_config_file, check_at_least, check_number
from ..command import finished_line, run_command, run_length, train_in_folder
from .losses import DPO_LOSS_TYPES
from .settings import LR_SCHEDULES, OPTIMIZERS, TRAIN_MODES

__all__ = ["build_parser", "main", "lora_parameters"]

log = logging.getLogger("mlx_fused_lora.lm_lora")

LORA_DEFAULTS = {"rank": 8, "scale": 20.0, "dropout": 0.0}  # mlx_lm.lora's
ITERS_DEFAULT = 1000  # mlx_lm.lora's, when neither --iters nor --epochs is given


def lora_parameters(value) -> dict:
    """mlx-lm's ``lora_parameters``: a YAML mapping (or JSON on the command line) of ``rank``,
    ``scale``, ``dropout`` and ``keys``, over mlx-lm's defaults (argparse shows the reason of
    an ArgumentTypeError, not of a ValueError)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a JSON object such as {json.dumps(LORA_DEFAULTS)}, got {value!r}"
            ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping of rank, scale, dropout and keys, got {value!r}")
    unknown = sorted(set(value) - {"rank", "scale", "dropout", "keys"})
    if unknown:
        hint = " (mlx-lm takes scale, the full multiplier, not alpha)" if "alpha" in unknown else ""
        raise argparse.ArgumentTypeError(
            f"unknown lora_parameters {unknown}: rank, scale, dropout and keys are read{hint}"
        )
    params = {**LORA_DEFAULTS, **value}
    keys = params.get("keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys) and keys):
        raise argparse.ArgumentTypeError(f"lora_parameters.keys must be a list of module paths, got {keys!r}")
    return params


lora_parameters.accepts_mapping = True


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="python -m mlx_fused_lora.lm_lora --train-mode dpo",
        description="Preference training (DPO, IPO, hinge, ORPO) of an mlx-lm model on fused LoRA layers; the "
        "DPO reference is the same model with its adapters off unless --reference-model-path names another.",
        formatter_class=DefaultsOnceFormatter,
    )
    p.add_argument("-c", "--config", default=None, help="YAML file of flags (mlx-lm's keys); the command line wins")
    g = p.add_argument_group("model and data (mlx-lm's flags)")
    g.add_argument("--model", required=True, help="a local model folder or a Hugging Face name, as mlx_lm.load takes")
    g.add_argument("--train", action="store_true", help="train (required, as for mlx_lm.lora)")
    g.add_argument("--train-mode", choices=TRAIN_MODES, default="dpo", help="dpo or orpo (sft: mlx-lm's trainer)")
    g.add_argument(
        "--data", default="data", help="folder of train.jsonl and valid.jsonl: prompt, chosen, rejected rows"
    )
    g.add_argument("--adapter-path", default="adapters", help="the run's folder: checkpoints, metrics, the adapter")
    g.add_argument("--max-seq-length", type=int, default=2048, help="tokens per sequence (longer responses are cut)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--fine-tune-type", "--train-type", choices=["lora", "dora"], default="lora", help="lora or dora")
    g.add_argument("--num-layers", type=int, default=16, help="blocks adapted, counted from the last; -1: all")
    g.add_argument(
        "--lora-parameters",
        type=lora_parameters,
        default=dict(LORA_DEFAULTS),
        help="rank, scale, dropout, keys: a YAML mapping in -c (mlx-lm's key), or JSON, e.g. '{\"rank\": 16}'",
    )
    g.add_argument("--resume-adapter-file", default=None, help="start the adapter from this one's weights")
    g.add_argument("--grad-checkpoint", action="store_true", help="recompute the blocks in the backward pass")
    g = p.add_argument_group("preference (mlx-lm-lora's flags)")
    g.add_argument("--beta", type=float, default=0.1, help="DPO's beta (ORPO: its lambda)")
    g.add_argument("--dpo-cpo-loss-type", choices=DPO_LOSS_TYPES, default="sigmoid", help="DPO's loss")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="cDPO's label smoothing (sigmoid only; TRL's)")
    g.add_argument(
        "--reference-model-path",
        default=None,
        help="DPO's reference: an adapter folder (run alone on the same base) or a model (a second copy); "
        "default: the model with its adapters off, which costs no second copy",
    )
    g.add_argument(
        "--precompute-reference",
        action="store_true",
        help="compute the reference's log-probs of every pair once before training and keep them in "
        "--adapter-path (resumable): the step then runs the policy alone",
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch (per process under mlx.launch)")
    g.add_argument("--iters", type=int, default=None, help=f"optimizer steps (default: {ITERS_DEFAULT}, or --epochs)")
    g.add_argument("--epochs", type=int, default=None, help="passes over the pairs, when --iters is not given")
    g.add_argument(
        "--grad-accumulation-steps", "--gradient-accumulation-steps", type=int, default=1, help="micro-batches a step"
    )
    g.add_argument("--learning-rate", type=float, default=1e-5, help="peak learning rate")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="MLX's Adam or AdamW, their defaults")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant", help="decay to 10%% of the rate")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    g.add_argument("--max-grad-norm", type=float, default=0.0, help="clip the gradient norm to this (0: no clipping)")
    g.add_argument("--seed", type=int, default=0, help="seed of the adapters' init, the data order and dropout")
    g = p.add_argument_group("reports, validation, checkpoints")
    g.add_argument("--steps-per-report", type=int, default=10, help="a log line of the metrics every N steps")
    g.add_argument("--steps-per-eval", type=int, default=200, help="validate every N steps (and at the end)")
    g.add_argument("--val-batches", type=int, default=25, help="validation batches; -1: all of valid.jsonl")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    g.add_argument(
        "--resume-from", default=None, help="a checkpoint (or --adapter-path: its latest) to continue exactly"
    )
    g.add_argument("--overwrite", action="store_true", help="delete an earlier run in --adapter-path and start anew")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    g.add_argument("--debug", action="store_true", help="DEBUG logging and full tracebacks")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Range checks naming the flag (one line, exit status 2)."""
    if not args.train:
        parser.error("--train is required with --train-mode dpo or orpo (as mlx_lm.lora requires --train or --test)")
    check_at_least(parser, args, 1, "--batch-size", "--grad-accumulation-steps", "--max-seq-length")
    check_at_least(parser, args, 1, "--iters", "--epochs")
    check_at_least(parser, args, 0, "--steps-per-report", "--steps-per-eval", "--save-every", "--warmup-steps")
    check_at_least(parser, args, -1, "--val-batches")
    check_number(parser, args, "--beta", 0.0, open_low=True)
    check_number(parser, args, "--label-smoothing", 0.0, high=0.5)
    check_number(parser, args, "--learning-rate", 0.0, open_low=True)
    check_number(parser, args, "--max-grad-norm", 0.0)
    if args.iters is None and args.epochs is None:
        args.iters = ITERS_DEFAULT
    return args


def settings_of(args):
    from .settings import PreferenceSettings

    lora = args.lora_parameters
    return PreferenceSettings(
        train_mode=args.train_mode,
        loss_type=args.dpo_cpo_loss_type,
        beta=args.beta,
        label_smoothing=args.label_smoothing,
        fine_tune_type=args.fine_tune_type,
        num_layers=args.num_layers,
        lora_rank=int(lora["rank"]),
        lora_scale=float(lora["scale"]),
        lora_dropout=float(lora["dropout"]),
        lora_keys=lora.get("keys"),
        learning_rate=args.learning_rate,
        optimizer=args.optimizer,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        grad_accumulation_steps=args.grad_accumulation_steps,
        seed=args.seed,
        max_seq_len=args.max_seq_length,
        reference_model_path=args.reference_model_path,
        precompute_reference=args.precompute_reference,
        grad_checkpoint=args.grad_checkpoint,
        resume_adapter_file=args.resume_adapter_file,
    )


def main(argv=None) -> int:
    parser = build_parser()
    args = check_args(parser, apply_config_file(parser, argv))
    return run_command(args, lambda run: _run(args, run), log)


def _run(args, run: dict) -> int:
    settings = settings_of(args)  # a bad combination is said before the model loads
    out = Path(args.adapter_path)

    def finished(recorded: dict, world_size: int) -> str | None:
        from .task import expected_outputs

        steps, accumulation = args.iters, args.grad_accumulation_steps
        total = run_length(recorded, steps, args.batch_size, world_size, accumulation, args.epochs)
        return finished_line(recorded, total, expected_outputs(out), out, "--iters")

    def train(world, recorded):
        from .task import PreferenceTrainer

        run["stage"] = "loading the model"
        trainer = PreferenceTrainer(args.model, out, settings, world=world, progress=not args.no_progress)
        run["trainer"] = trainer
        trainer.prepare_data(args.data, ("train", "valid") if args.val_batches != 0 else ("train",))
        plan = trainer.plan_run(args.batch_size, args.iters, args.epochs)
        if world.is_main:  # the run's first line: how many steps, and why
            print(plan.describe(recorded["step"] if recorded else 0), flush=True)
        return trainer.train(
            batch_size=args.batch_size,
            iters=args.iters,
            epochs=args.epochs,
            val_every=args.steps_per_eval,
            val_batches=args.val_batches,
            save_every=args.save_every,
            report_every=args.steps_per_report,
            resume_from=args.resume_from,
            overwrite=args.overwrite,
        )

    return train_in_folder(out, args.resume_from, finished, train)


if __name__ == "__main__":
    sys.exit(main())
