"""The trainer demo (small settings) and Ctrl-C handling of the finetune CLI."""

import json
import signal
import subprocess
import sys
import time

from mlx_fused_lora.cli import COMMANDS
from mlx_fused_lora.csm import CSMConfig
from mlx_fused_lora.train.checkpoint import load_checkpoint
from mlx_fused_lora.train.demo import run_demo
from mlx_fused_lora.train.synthetic import write_random_csm, write_synthetic_dataset


def test_demo_is_the_trainer_demo_and_the_loss_falls_for_both_layers(tmp_path):
    assert COMMANDS["demo"][0] == "mlx_fused_lora.train.demo" and "finetune" in COMMANDS
    r = run_demo(
        tmp_path,
        steps=12,
        batch_size=4,
        dropout=0.1,
        width=64,
        layers=2,
        targets=["q_proj", "v_proj", "codebook0_head"],
    )
    for kind in ("fused", "plain"):
        res = r[kind]
        losses = [l for _, l in res.losses]
        assert res.steps == 12 and sum(losses[-3:]) < sum(losses[:3]), (kind, losses)
        assert res.steps_per_s > 0 and res.peak_memory_mb > 0
    # same start, same data, same seed: the first step's loss is the same for both layers
    assert abs(r["fused"].losses[0][1] - r["plain"].losses[0][1]) < 1e-3 * abs(r["plain"].losses[0][1])
    assert (tmp_path / "data" / "audio").is_dir() and (tmp_path / "out-fused" / "fine_tuned_model.safetensors").exists()


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    model = write_random_csm(tmp_path / "model", CSMConfig.tiny(text_vocab_size=260))
    audio = write_synthetic_dataset(tmp_path / "data", num_files=4, num_codebooks=8, audio_vocab_size=24)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_fused_lora",
            "finetune",
            "--model-path",
            str(model),
            "--audio-dir",
            str(audio),
            "--output-dir",
            str(out),
            "--tokenizer",
            "byte",
            "--epochs",
            "0",
            "--max-steps",
            "100000",
            "--save-every",
            "0",
            "--no-progress",
        ]
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    _, _, state = load_checkpoint(out)
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert state["step"] == steps[-1] >= 2
