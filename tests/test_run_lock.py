"""One writer per output folder (issue 18, item 1): the run lock, and two finetune runs started at once."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from mlx_fused_lora.run_lock import LOCK_NAME, FolderInUseError, file_lock, run_lock
from train_helpers import finetune_args, write_tiny_run

HOLD = """
import sys
from mlx_fused_lora.run_lock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def _holder(folder):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_naming_the_holder_and_other_folders_are_free(tmp_path):
    holder = _holder(tmp_path / "out")
    try:
        with pytest.raises(FolderInUseError) as refused:
            with run_lock(tmp_path / "out"):
                pass
        message = str(refused.value)
        assert f"--output-dir {tmp_path / 'out'} is in use by another run (pid {holder.pid}," in message
        assert "\n" not in message
        with run_lock(tmp_path / "other") as path:  # another folder is independent
            assert path.is_file() and json.loads(path.read_text())["pid"] == os.getpid()
            with run_lock(tmp_path / "other"):  # and this process may ask again (the CLI, then the trainer)
                pass
            assert path.is_file()
        assert not (tmp_path / "other").exists()  # created by the lock, nothing else written: removed
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with run_lock(tmp_path / "out"):  # released when the holder ended
        pass
    assert not (tmp_path / "out").exists()


def test_a_killed_runs_lock_is_reported_and_taken_over(tmp_path, caplog):
    holder = _holder(tmp_path / "out")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind
    with run_lock(tmp_path / "out"):
        pass
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"left by a run that ended without removing it (pid {holder.pid}" in warnings[0]
    assert "which is no longer running" in warnings[0]
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_a_results_files_lock_names_the_file(tmp_path):
    target = tmp_path / "results" / "demo.json"
    with file_lock(target, "--out") as path:
        assert path == tmp_path / "results" / ".demo.json.lock"
        code = "import sys\nfrom mlx_fused_lora.run_lock import file_lock\nwith file_lock(sys.argv[1]): pass"
        done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and f"--out {target} is in use by another run (pid {os.getpid()}," in done.stderr


RACER = """
import os, sys, time
from mlx_fused_lora.cli import main
import mlx_fused_lora.train.csm.task  # everything imported before the start line
go = sys.argv[1]
open(f"{go}.ready-{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
sys.exit(main(["finetune", *sys.argv[2:]]))
"""


def race(model, audio, out, tmp_path, steps=3):
    """Two finetune runs into ``out``, seeds 1 and 2, released at the same instant; returns
    ``[(seed, pid, returncode, stderr lines)]``."""
    go = tmp_path / f"go-{time.monotonic_ns()}"
    procs = {}
    for seed in (1, 2):
        args = finetune_args(model, audio, out, "--max-steps", str(steps), "--save-every", "1", "--val-every", "0")
        args += ["--seed", str(seed)]
        procs[seed] = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(RACER), str(go), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob(f"{go.name}.ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # both have imported MLX and the trainer and wait for `go`
    go.write_text("")
    results = []
    for seed, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        results.append((seed, proc.pid, proc.returncode, err.strip().splitlines()))
    return results


def test_two_runs_started_at_once_into_one_folder_one_trains_the_other_is_refused(tmp_path):
    _, model, audio = write_tiny_run(tmp_path, num_files=4)
    out = tmp_path / "out"
    results = race(model, audio, out, tmp_path)
    assert sorted(rc for *_, rc, _ in results) == [0, 1], results
    (seed, pid, _, _), (_, _, _, refused) = sorted(results, key=lambda r: r[2])
    assert len(refused) == 1 and f"is in use by another run (pid {pid}," in refused[0], refused
    # the folder holds one run: the winner's, each step once
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "loss" in e] == [1, 2, 3]
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert json.loads((latest / "trainer_state.json").read_text())["settings"]["seed"] == seed
    assert not (out / LOCK_NAME).exists()
