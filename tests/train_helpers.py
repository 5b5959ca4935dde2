"""What the training tests share: a tiny random CSM with synthetic data that fits it, the command lines that run it, a kill at the first checkpoint, mlx.launch."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def kill_at_first_checkpoint(command, folder) -> None:
    """Start ``command`` (a training run into ``folder``) and SIGKILL it as soon as its first
    checkpoint is there, as a power loss would."""
    proc = subprocess.Popen(command)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (folder / "checkpoints" / "latest").exists():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"


def launcher():
    """``mlx.launch`` beside this Python, or on PATH; None without it."""
    exe = Path(sys.executable).parent / "mlx.launch"
    return str(exe) if exe.exists() else shutil.which("mlx.launch")
