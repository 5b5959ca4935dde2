"""The trainer demo (small settings: progress, table, JSON record), the synthetic helpers' defaults, and Ctrl-C handling of the finetune CLI."""

import json
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlx_fused_lora.cli import COMMANDS
from mlx_fused_lora.train.checkpoint import load_checkpoint
from mlx_fused_lora.train.csm.demo import format_table, record
from mlx_fused_lora.train.csm.demo import main as demo_main
from mlx_fused_lora.train.csm.synthetic import small_csm_config, write_random_csm, write_synthetic_dataset
from train_helpers import finetune_command, run_paths, write_tiny_run

README_DEMO = "tested-by: tests/test_train_demo.py (the README demo command)"


def readme_demo_command() -> list[str]:
    """The README's demo command line (the one of its Quick start block that is run)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(rf"<!-- {re.escape(README_DEMO)} -->\n```bash\n(.*?)```", readme, re.S)
    assert block, f"README has no block marked <!-- {README_DEMO} -->"
    lines = [line for line in block.group(1).splitlines() if "not run by tests:" not in line]
    (command,) = [shlex.split(line, comments=True) for line in lines if shlex.split(line, comments=True)]
    # The install before `&&` is CI's job (it installs the package before the tests run).
    return command[len(command) - command[::-1].index("&&") :] if "&&" in command else command


def test_readme_demo_is_the_trainer_demo_and_the_loss_falls_for_both_layers(tmp_path, capsys):
    """The README's ``mlx-fused-lora demo``, with small settings appended (argparse keeps the
    last value): a header and a bar per run, the table, the JSON record, the loss falls."""
    assert COMMANDS["demo"][0] == "mlx_fused_lora.train.csm.demo" and "finetune" in COMMANDS
    command = readme_demo_command()
    assert command[:2] == ["mlx-fused-lora", "demo"]
    out = tmp_path / "demo.json"
    argv = command[2:] + ["--steps", "12", "--width", "64", "--layers", "2"]
    argv += ["--target-modules", "q_proj", "v_proj", "codebook0_head", "--workdir", str(tmp_path), "--out", str(out)]
    assert demo_main(argv) == 0  # 0: the loss fell in both runs
    printed = capsys.readouterr()
    # a tqdm bar per run, step by step, on stderr; the table on stdout
    assert "run 1/2: fused" in printed.err and "run 2/2: plain" in printed.err
    assert printed.err.count("12/12") >= 2, printed.err[-2000:]  # each run's bar reached its last step
    assert "vary from run to run" in printed.out
    rec = json.loads(out.read_text())
    assert rec["command"] == "mlx-fused-lora demo " + " ".join(argv) and len(rec["runs"]) == 1
    run = rec["runs"][0]
    assert run["table"] in printed.out and run["table"] == format_table(run)
    assert run["loss_falls"] and run["plain_over_fused"]["step_time"] == pytest.approx(
        run["fused"]["steps_per_s"] / run["plain"]["steps_per_s"]
    )
    for kind in ("fused", "plain"):
        assert run[kind]["steps_per_s"] > 0 and run[kind]["peak_memory_mib"] > 0
        assert run[kind]["final_loss"] < run[kind]["first_loss"]
    # same start, same data, same seed: the first step's loss is the same for both layers
    assert run["fused"]["first_loss"] == pytest.approx(run["plain"]["first_loss"], rel=1e-3)
    assert (tmp_path / "data" / "audio").is_dir() and (tmp_path / "out-fused" / "fine_tuned_model.safetensors").exists()
    # a second record of the same command appends; another command starts the file afresh
    record(out, rec["command"], run)
    assert len(json.loads(out.read_text())["runs"]) == 2
    record(out, "mlx-fused-lora demo --steps 1", run)
    assert json.loads(out.read_text())["command"] == "mlx-fused-lora demo --steps 1"


def test_default_random_model_fits_the_default_dataset(tmp_path):
    """The synthetic helpers' defaults fit each other (issue 14: they did not)."""
    from mlx_fused_lora.train.csm import CSMLoRATrainer

    model = write_random_csm(tmp_path / "model", small_csm_config(width=32, layers=1))
    audio = write_synthetic_dataset(tmp_path / "data", num_files=3)
    trainer = CSMLoRATrainer(model, tmp_path / "out", tokenizer="byte", progress=False)
    report = trainer.prepare_data(audio, val_split=0.0)
    assert report.samples == 6 and not report.skipped, str(report)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    _, model, audio = write_tiny_run(tmp_path, num_files=4)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        finetune_command(
            *run_paths(model, audio, out),
            "--tokenizer",
            "byte",
            "--epochs",
            "0",
            "--max-steps",
            "100000",
            "--save-every",
            "0",
            "--no-progress",
        )
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
