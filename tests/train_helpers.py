"""What the finetune CLI tests share: a tiny random CSM with synthetic data that fits it, and the command lines that run it."""

import sys

import mlx.core as mx
import mlx.nn as nn
from mlx_fused_lora.csm import CSMConfig
from mlx_fused_lora.train.csm.synthetic import write_random_csm, write_synthetic_dataset

K, V = 8, 24  # the tiny CSM's codebooks and audio vocabulary, which the synthetic codes fit


def write_tiny_run(root, num_files):
    """A tiny random CSM and ``num_files`` synthetic recordings (two turns each) under ``root``."""
    model = write_random_csm(root / "model", CSMConfig.tiny(text_vocab_size=260))
    audio = write_synthetic_dataset(root / "data", num_files=num_files, num_codebooks=K, audio_vocab_size=V)
    return root, model, audio


def run_paths(model, audio, out):
    """The three folders every finetune run names."""
    return ["--model-path", str(model), "--audio-dir", str(audio), "--output-dir", str(out)]


def finetune_args(model, audio, out, *extra):
    """A short, quiet run: byte tokenizer, batches of 2, learning rate 5e-3, no bar, warnings
    only; ``extra`` comes last, so it overrides (argparse keeps the last value)."""
    return [
        *run_paths(model, audio, out),
        "--tokenizer",
        "byte",
        "--batch-size",
        "2",
        "--learning-rate",
        "5e-3",
        "--no-progress",
        "--log-level",
        "WARNING",
        *extra,
    ]


def finetune_command(*args):
    """``args`` as a ``python -m mlx_fused_lora finetune`` command line, for a fresh process."""
    return [sys.executable, "-m", "mlx_fused_lora", "finetune", *args]


class Scale(nn.Module):
    """The smallest model the generic training loop can train: ``x * w``, two weights."""

    def __init__(self):
        super().__init__()
        self.w = mx.array([0.5, -0.25])

    def __call__(self, x):
        return x * self.w
