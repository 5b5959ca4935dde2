"""Ctrl-C at any moment of a run (issue 18, item 10): exit status 130, one line, a checkpoint where there was training to save."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx_fused_lora.train.checkpoint import load_checkpoint, save_checkpoint
from mlx_fused_lora.train.loop import LoopSettings, train
from train_helpers import Scale, finetune_args, write_tiny_run

# A finetune run in which one stage waits (as a long model load, Mimi encoding or sample
# generation would) after saying so in a file; the test presses Ctrl-C there.
STALLED = """
import sys, time
from pathlib import Path
from mlx_fused_lora.train.csm import task as csm_task
from mlx_fused_lora.train.csm.cli import main

ready, stage = Path(sys.argv[1]), sys.argv[2]

def stall(real):
    def wait(*args, **kwargs):
        ready.write_text("")
        time.sleep(120)
        return real(*args, **kwargs)
    return wait

if stage == "model":
    csm_task.load_model_for_lora = stall(csm_task.load_model_for_lora)
elif stage == "data":
    csm_task.build_dataset = stall(csm_task.build_dataset)
else:
    csm_task.CSMLoRATrainer.generate_sample = stall(csm_task.CSMLoRATrainer.generate_sample)
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("interrupts"), num_files=4)


def _ctrl_c_while(stage, model, audio, out, tmp_path):
    ready = tmp_path / f"ready-{stage}"
    args = finetune_args(model, audio, out, "--max-steps", "2", "--val-every", "0", "--generate-samples")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(STALLED), str(ready), stage, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr.strip().splitlines()


@pytest.mark.parametrize("stage, said", [("model", "while loading the model"), ("data", "while reading the data")])
def test_ctrl_c_while_starting_is_one_line_and_130(setup, tmp_path, stage, said):
    _, model, audio = setup
    out = tmp_path / "out"
    rc, _, err = _ctrl_c_while(stage, model, audio, out, tmp_path)
    assert rc == 130 and len(err) == 1, err
    assert f"interrupted (Ctrl-C) {said}; nothing of this run was saved" in err[0]
    assert not out.exists()  # nothing was written, and the lock's folder went with it


def test_ctrl_c_while_writing_the_outputs_keeps_the_trained_checkpoint(setup, tmp_path):
    _, model, audio = setup
    out = tmp_path / "out"
    rc, stdout, err = _ctrl_c_while("sample", model, audio, out, tmp_path)
    assert rc == 130 and len(err) == 1, err
    newest = out / "checkpoints" / "step_00000002"
    assert f"interrupted (Ctrl-C) while generating the sample; the newest checkpoint is {newest}" in err[0]
    assert load_checkpoint(out)[2]["step"] == 2 and stdout.startswith("training 2 steps")


def test_a_second_ctrl_c_during_the_save_waits_for_it(tmp_path, caplog):
    """The first Ctrl-C at step 2 stops the loop; the second, pressed while the closing
    checkpoint is being written, neither cuts it short nor raises."""
    model, x = Scale(), mx.array([[1.0, 2.0]])

    def batches(i):
        if i == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 2
        return (x,), 2.0

    def save(step):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again, while saving
        return save_checkpoint(tmp_path, step, {"w": model.w}, {"s": mx.array(step)}, {"step": step})

    def loss(model, x):
        return ((model(x) - 1.0) ** 2).mean(), ()

    with caplog.at_level(logging.INFO):
        result = train(
            model, optim.SGD(learning_rate=0.1), loss, batches, LoopSettings(steps=50), save=save, progress=False
        )
    assert result.interrupted and result.steps == 2 and load_checkpoint(tmp_path)[2]["step"] == 2
    assert "Ctrl-C again: the checkpoint is being written" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's Ctrl-C is back


def test_ctrl_c_in_the_demo_is_one_line_and_130(tmp_path):
    work = tmp_path / "work"
    command = [sys.executable, "-m", "mlx_fused_lora", "demo", "--steps", "100000", "--width", "32", "--layers", "1"]
    proc = subprocess.Popen(
        [*command, "--no-progress", "--workdir", str(work)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = work / "out-fused" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # while the fused run trains
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines() == ["mlx-fused-lora demo: interrupted (Ctrl-C)"], err


def test_ctrl_c_and_a_held_folder_are_one_line_for_every_command(monkeypatch, capsys):
    from mlx_fused_lora import cli
    from mlx_fused_lora.bench import cli as bench_cli
    from mlx_fused_lora.run_lock import FolderInUseError

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_cli, "main", interrupted)
    assert cli.main(["bench", "--quick"]) == 130
    assert capsys.readouterr().err.splitlines() == ["mlx-fused-lora bench: interrupted (Ctrl-C)"]

    def held(argv):
        raise FolderInUseError("--out x is in use by another run (pid 1)")

    monkeypatch.setattr(bench_cli, "main", held)
    assert cli.main(["bench", "--quick"]) == 1
    assert capsys.readouterr().err.splitlines() == ["mlx-fused-lora bench: --out x is in use by another run (pid 1)"]
