"""The bench says which BLAS each kind ran on, and by default gives the plain peers the real one."""

import json
import subprocess
import sys

import pytest
from mlx_fused_lora import fast_blas
from mlx_fused_lora.bench import grid
from mlx_fused_lora.bench.machine import blas_report

TINY = ["--shapes", "32x64x48x4", "--budget", "0.001", "--rounds", "1", "--no-e2e", "--no-chart", "--no-peft"]
TINY += ["--passes", "forward", "--dropouts", "0"]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fast BLAS is Linux's")


def test_the_report_names_mlx_s_blas_as_measured_in_this_process():
    blas = blas_report("extension", with_peft=False)
    assert blas["plain_peers"] == fast_blas.active_blas()
    assert blas["limit"] == blas["fused"]
    assert blas_report("mlx", with_peft=False)["limit"] == blas["plain_peers"]
    # The peer cap follows the BLAS: none on a real BLAS, the old cap on the reference one.
    on_reference = blas["plain_peers"] == fast_blas.REFERENCE_BLAS
    assert grid.default_peer_max_gflop() == (grid.CPU_PEER_MAX_GFLOP if on_reference else 0.0)


def _command(tmp_path, *extra):
    argv = [sys.executable, "-m", "mlx_fused_lora", *extra, "bench", *TINY, "--out", str(tmp_path), "--name", "b"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads((tmp_path / "b.json").read_text()), result.stdout


@linux_only
def test_the_command_runs_the_plain_peers_on_openblas_with_no_cap(tmp_path):
    report, printed = _command(tmp_path)
    blas = report["blas"]
    assert blas["plain_peers"].startswith("openblas") and blas["fused"].startswith("openblas")
    assert blas["same_blas"] is True
    assert report["settings"]["peer_max_gflop"] == 0.0
    assert "BLAS: fused openblas" in printed and "reference BLAS" not in printed


@linux_only
def test_with_no_fast_blas_the_command_says_the_peers_ran_on_the_reference_blas(tmp_path):
    report, printed = _command(tmp_path, fast_blas.CLI_FLAG)
    assert report["blas"]["plain_peers"] == fast_blas.REFERENCE_BLAS
    assert report["blas"]["same_blas"] is False
    assert report["settings"]["peer_max_gflop"] == grid.CPU_PEER_MAX_GFLOP
    assert "note: the plain peers run on MLX's reference BLAS" in printed
