"""`mlx-fused-lora bench`: its options, its table, and the JSON and PNG it writes.

Runs on a tiny custom grid (`--shapes`, one round per case) so the whole file
takes seconds, not the quick grid's minute; the grids themselves are checked by
their definitions.
"""

import contextlib
import io
import json
import struct
import subprocess
import sys

import pytest
from mlx_fused_lora import bench, cli
from mlx_fused_lora.bench import cases as bm_cases
from mlx_fused_lora.bench import e2e as bm_e2e
from mlx_fused_lora.bench import grid as bm_grid

# --no-peft: the PyTorch + PEFT peer has its own tests (test_bench_peft.py).
TINY = ["--shapes", "32x64x48x4", "--budget", "0.001", "--rounds", "1", "--no-peft"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One run with every kind, both passes, both p, the end-to-end step and the chart."""
    out = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = bench.main(TINY + ["--out", str(out), "--name", "tiny"])
    return code, printed.getvalue(), out


def test_run_exits_zero_and_prints_the_ratio_table(full_run):
    code, printed, _ = full_run
    assert code == 0
    assert "fused/limit" in printed and "plain/fused" in printed and "addmm/f" in printed
    assert "32x64x48 4" in printed
    assert "end-to-end training step" in printed and "tok/s" in printed
    assert "tiny.json" in printed and "tiny.png" in printed


def test_json_has_machine_versions_command_and_every_case(full_run):
    _, _, out = full_run
    report = json.loads((out / "tiny.json").read_text())
    assert report["schema"] == "mlx-fused-lora-bench/1"
    assert report["command"].startswith("mlx-fused-lora bench --shapes 32x64x48x4")
    assert {"device", "cpu", "cpu_count", "platform"} <= report["machine"].keys()
    assert report["versions"]["mlx"] and report["versions"]["mlx-fused-lora"]
    assert set(report["load_average"]) == {"start", "end"}
    assert report["calibration"]["start"] > 0 and report["calibration"]["end"] > 0
    cases = report["cases"]
    assert len(cases) == len(bm_grid.KINDS) * 2 * 2  # kinds x p x passes
    assert {c["kind"] for c in cases} == set(bm_grid.KINDS)
    for case in cases:
        assert (case["m"], case["k"], case["n"], case["r"]) == (32, 64, 48, 4)
        assert case["time_s"] > 0 and case["peak_memory"] > 0 and case["rounds"] == 1
        assert case["time_s"] == min(case["times_s"])
    row = report["ratios"][0]
    assert {
        "fused_over_limit",
        "plain_over_fused",
        "plain_compiled_over_fused",
        "plain_addmm_over_fused",
        "memory_mib",
    } <= row.keys()
    e2e = report["end_to_end"]
    assert e2e["config"] == dict(bm_e2e.E2E_QUICK.__dict__, tokens=bm_e2e.E2E_QUICK.tokens)
    assert e2e["results"]["fused"]["tokens_per_s"] > 0 and e2e["results"]["plain"]["peak_memory"] > 0
    assert e2e["speedup"] > 0


def test_png_is_a_valid_png(full_run):
    _, _, out = full_run
    data = (out / "tiny.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, chunk, width, height = struct.unpack(">I4sII", data[8:24])
    assert chunk == b"IHDR" and width > 500 and height > 500
    assert data[-12:-4] == b"\x00\x00\x00\x00IEND"  # complete: ends with its IEND chunk


def test_options_narrow_the_grid_and_no_chart_writes_no_png(tmp_path, capsys):
    argv = TINY + [
        "--dropouts",
        "0.1",
        "--passes",
        "forward",
        "--peer-max-gflop",
        "1e-9",
        "--no-e2e",
        "--no-chart",
        "--out",
        str(tmp_path),
        "--name",
        "narrow",
    ]
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "narrow.json").read_text())
    assert not (tmp_path / "narrow.png").exists()
    # Above the peer cap only the fused op and the limit run.
    assert sorted((c["kind"], c["pass_name"], c["dropout"]) for c in report["cases"]) == [
        ("fused", "forward", 0.1),
        ("limit", "forward", 0.1),
    ]
    assert report["end_to_end"] is None
    assert report["settings"]["peer_max_gflop"] == 1e-9
    assert "plain/fused" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shapes", "12x"], "MxKxNxR"),
        (["--shapes", "0x4x4x4"], "positive"),
        (["--dropouts", "1.5"], "[0, 1)"),
        (["--passes", "sideways"], "forward, forward_backward"),
        (["--dtypes", "int8"], "unknown dtype"),
        (["--rounds", "0"], ">= 1"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_options_exit_2_naming_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        bench.main(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_matplotlib_fails_before_running(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    assert bench.main(TINY + ["--out", str(tmp_path)]) == 2
    assert "mlx-fused-lora[bench]" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_help_through_both_entry_points(capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["bench", "--help"])
    assert raised.value.code == 0
    text = capsys.readouterr().out
    for option in ("--quick", "--shapes", "--peer-max-gflop", "--out", "--no-chart"):
        assert option in text
    assert cli.main(["--help"]) == 0
    assert "bench" in capsys.readouterr().out
    result = subprocess.run(
        [sys.executable, "-m", "mlx_fused_lora", "bench", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "--quick" in result.stdout


def test_grids_are_the_issues():
    full = bm_grid.full_shapes()
    assert {s.m for s in full} == {512, 2048, 8192}
    assert {s.k for s in full} == {s.n for s in full} == {1024, 2048, 4096}
    assert {s.r for s in full} == {8, 16, 64} and len(full) == 27
    quick = bm_grid.grid(bm_grid.quick_shapes(), ["float32"])
    assert len(quick) <= 4 and all(g.kinds == bm_grid.KINDS for g in quick)
    assert bm_grid.parse_shape("512x1024x1024") == bm_grid.Shape(512, 1024, 1024, 16)


def test_addmm_peer_computes_what_the_plain_layer_does():
    # A benchmark peer is only a peer if it computes the same function (and gradients).
    import mlx.core as mx
    from mlx_fused_lora.layers import PlainLoRALinear

    inputs = bm_cases.make_inputs(16, 32, 24, 4)
    layers = [bm_cases.layer_from_inputs(cls, inputs, 0.0) for cls in (PlainLoRALinear, bm_cases.AddmmLoRALinear)]

    def outputs(layer):
        def apply(x, a, b):
            layer.lora_a, layer.lora_b = a, b
            return layer(x)

        primals = [inputs["x"], inputs["lora_a"], inputs["lora_b"]]
        y, grads = mx.vjp(apply, primals, [inputs["cotangent"]])
        return [y[0]] + list(grads)

    for plain, addmm in zip(*map(outputs, layers), strict=False):
        assert mx.allclose(plain, addmm, atol=1e-5).item()
    # With dropout the kept elements are scaled by 1/(1-p): the mean of h stays put.
    layer = bm_cases.layer_from_inputs(bm_cases.AddmmLoRALinear, bm_cases.make_inputs(256, 64, 8, 4), 0.5, 1.0)
    layer.linear.weight = mx.zeros_like(layer.linear.weight)
    layer.lora_b = mx.ones_like(layer.lora_b)
    x = mx.ones((256, 64))
    expected = (x @ layer.lora_a).sum(axis=1).mean().item()
    assert abs(layer(x).mean().item() - expected) < 0.1 * abs(expected) + 0.05


README_MARKER = "tested-by: tests/test_bench_cli.py (README benchmark commands)"


def test_readme_benchmark_commands_run_on_a_tiny_grid(tmp_path):
    """The README's `mlx-fused-lora bench` lines, each run with a tiny grid appended (argparse keeps the last value)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(rf"<!-- {re.escape(README_MARKER)} -->\n```bash\n(.*?)```", readme, re.S)
    assert block, "README has no block marked " + README_MARKER
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    bench_lines = [c for c in commands if c.startswith("mlx-fused-lora bench")]
    assert len(bench_lines) >= 2
    for i, command in enumerate(bench_lines):
        argv = command.split()[1:] + TINY + ["--no-e2e", "--no-chart", "--out", str(tmp_path), "--name", f"r{i}"]
        result = subprocess.run([sys.executable, "-m", "mlx_fused_lora", *argv], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert json.loads((tmp_path / f"r{i}.json").read_text())["ratios"]
    # The other lines install packages or run the test suite: not run here.
    assert all(c.startswith(("python3 -m pip install", "mlx-fused-lora bench")) for c in commands if c)
