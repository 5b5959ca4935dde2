"""The bench says which cells it cannot trust, which targets it measured, and draws honest axes."""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.axes
import pytest
from mlx_fused_lora.bench import chart, report
from mlx_fused_lora.bench.grid import TARGET_SHAPE, TARGETS

ROOT = Path(__file__).resolve().parents[1]


def _record(kind, times, m=64, k=128, n=96, r=8, dtype="float32", p=0.0, pass_name="forward", peak=2**20):
    return dict(
        m=m,
        k=k,
        n=n,
        r=r,
        dtype=dtype,
        dropout=p,
        pass_name=pass_name,
        kind=kind,
        time_s=min(times),
        times_s=list(times),
        peak_memory=peak,
    )


def _group(fused, limit, plain=(1.0,), **shape):
    return [_record("fused", fused, **shape), _record("limit", limit, **shape), _record("plain", plain, **shape)]


def test_a_steady_cell_above_the_limit_is_trusted():
    (row,) = report.ratio_rows(_group(fused=[0.105, 0.106, 0.107], limit=[0.100, 0.101, 0.102]))
    assert row["untrusted"] == []
    assert row["fused_over_limit"] == pytest.approx(1.05)
    assert row["limit_drift"] == pytest.approx(0.01)


def test_fused_below_the_limit_is_marked():
    (row,) = report.ratio_rows(_group(fused=[0.090, 0.091, 0.092], limit=[0.100, 0.100, 0.101]))
    assert row["untrusted"] == [report.BELOW_LIMIT]


def test_a_limit_whose_rounds_drift_is_marked_gauge_moved():
    # Best 100 ms, next best 130 ms: the best was not reproduced, load moved under the cell.
    (row,) = report.ratio_rows(_group(fused=[0.110, 0.111, 0.112], limit=[0.100, 0.130, 0.150]))
    assert row["untrusted"] == [report.GAUGE_MOVED]
    assert row["limit_drift"] == pytest.approx(0.30)
    # Load in other rounds does not enter the best-round ratio: two agreeing fastest rounds are trusted.
    (row,) = report.ratio_rows(_group(fused=[0.110, 0.111, 0.3], limit=[0.200, 0.100, 0.102, 0.250]))
    assert row["untrusted"] == [] and row["limit_drift"] == pytest.approx(0.02)
    both = report.ratio_rows(_group(fused=[0.095, 0.2, 0.2], limit=[0.100, 0.130, 0.150]))[0]
    assert both["untrusted"] == [report.BELOW_LIMIT, report.GAUGE_MOVED, report.FUSED_UNSTEADY]


def test_a_fused_best_round_not_reproduced_is_marked():
    (row,) = report.ratio_rows(_group(fused=[0.110, 0.150, 0.152], limit=[0.100, 0.101, 0.102]))
    assert row["untrusted"] == [report.FUSED_UNSTEADY]


def test_the_table_shows_why_a_cell_is_untrusted():
    rows = report.ratio_rows(
        _group(fused=[0.09], limit=[0.1, 0.1, 0.1]) + _group(fused=[0.12], limit=[0.1, 0.1, 0.1], p=0.1)
    )
    header, below, clean = report.format_ratio_table(rows)
    assert header.endswith("untrusted")
    assert below.endswith(report.BELOW_LIMIT) and clean.endswith("-")


def _target_rows(forward_ratio, backward_ratio, memory_p01):
    m, k, n, r, dtype = TARGET_SHAPE
    shape = dict(m=m, k=k, n=n, r=r, dtype=dtype)
    records = []
    for p, peak in ((0.0, 100 * 2**20), (0.1, int(100 * 2**20 * memory_p01))):
        for pass_name, ratio in (("forward", forward_ratio), ("forward_backward", backward_ratio)):
            records += [
                _record("fused", [ratio] * 3, p=p, pass_name=pass_name, peak=peak, **shape),
                _record("limit", [1.0] * 3, p=p, pass_name=pass_name, peak=peak, **shape),
            ]
    return report.ratio_rows(records)


def test_targets_name_each_one_measured_and_whether_it_was_met():
    bound_fwd, bound_bwd = TARGETS[("forward", "time")], TARGETS[("forward_backward", "time")]
    rows = _target_rows(bound_fwd - 0.05, bound_bwd + 0.05, memory_p01=1.0)
    status = report.target_status(rows)
    # Both time targets at both p, the memory target at p = 0.1: five checks.
    assert len(status) == 5
    assert {(t["pass_name"], t["what"], t["dropout"]) for t in status if not t["met"]} == {
        ("forward_backward", "time", 0.0),
        ("forward_backward", "time", 0.1),
    }
    lines = report.target_lines(rows)
    assert lines[0].endswith("3 of 5 measured met")
    assert sum("MISSED" in line for line in lines) == 2 and "all met" not in " ".join(lines)
    assert len(report.target_misses(rows)) == 2


def test_targets_say_none_was_measured_when_the_shape_is_not_in_the_run():
    rows = report.ratio_rows(_group(fused=[0.11], limit=[0.1]))
    assert report.target_status(rows) == []
    (line,) = report.target_lines(rows)
    assert "none measured" in line and "met" not in line.replace("measured", "")


def _write_report(tmp_path, records, command="mlx-fused-lora bench --test"):
    data = dict(
        command=command,
        started="2026-01-01T00:00:00+00:00",
        wall_s=1.0,
        load_average=dict(start=[0.1, 0.1, 0.1], end=[0.2, 0.2, 0.2]),
        calibration=dict(start=0.1, end=0.1),
        machine=dict(cpu="test cpu", cpu_count=2, device="Device(cpu, 0)"),
        versions=dict(mlx="0", python="3", **{"mlx-lm": None}),
        cases=records,
        ratios=report.ratio_rows(records),
        end_to_end=None,
    )
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    return path, data


def test_report_script_names_the_targets_it_measured(tmp_path):
    m, k, n, r, dtype = TARGET_SHAPE
    shape = dict(m=m, k=k, n=n, r=r, dtype=dtype)
    records = _group(fused=[1.5] * 3, limit=[1.0] * 3, **shape)
    path, _ = _write_report(tmp_path, records)
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "0 of 1 measured met" in out and "forward p=0.0: fused / limit 1.500x <= 1.1: MISSED" in out
    assert "all met" not in out

    path, _ = _write_report(tmp_path, _group(fused=[0.09] * 3, limit=[0.1] * 3))
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "none measured" in out and "all met" not in out
    assert "0.900×?" in out and report.BELOW_LIMIT in out  # the untrusted cell, marked in both tables


class _Recorder:
    """Wraps matplotlib's Axes methods the chart uses, to see what it drew."""

    def __init__(self, monkeypatch):
        self.bars, self.ylims, self.marks, self.texts = [], [], [], []
        axes = matplotlib.axes.Axes
        for name, store in (("bar", self.bars), ("set_ylim", self.ylims), ("hlines", self.marks)):
            original = getattr(axes, name)

            def wrapper(ax, *args, _original=original, _store=store, **kwargs):
                _store.append((args, kwargs))
                return _original(ax, *args, **kwargs)

            monkeypatch.setattr(axes, name, wrapper)
        original_annotate = axes.annotate

        def annotate(ax, text, xy, *args, **kwargs):
            self.texts.append((text, xy))
            return original_annotate(ax, text, xy, *args, **kwargs)

        monkeypatch.setattr(axes, "annotate", annotate)


def test_chart_hatches_untrusted_cells_starts_axes_at_zero_and_labels_above_the_marks(tmp_path, monkeypatch):
    records = (
        _group(fused=[0.09] * 3, limit=[0.1] * 3, plain=[0.2])  # untrusted: fused below the limit
        + _group(fused=[0.12] * 3, limit=[0.1] * 3, plain=[0.13], p=0.1)  # trusted; its mark is above the bar
    )
    records += [_record("plain_compiled", [0.2]), _record("plain_addmm", [0.2])]
    records += [_record(kind, [0.14], p=0.1) for kind in ("plain_compiled", "plain_addmm")]
    _, data = _write_report(tmp_path, records)
    recorder = _Recorder(monkeypatch)
    chart.write_chart(data, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    hatches = [kwargs.get("hatch") for _, kwargs in recorder.bars]
    assert chart.UNTRUSTED_HATCH in hatches and None in hatches
    # Every ratio axis starts at 0.
    bottoms = [args[0][0] if isinstance(args[0], (list, tuple)) else args[0] for args, _ in recorder.ylims]
    assert bottoms and all(bottom == 0 for bottom in bottoms)
    # Each value label sits at or above its limit mark (peer / limit), never across it.
    mark_heights = [args[0] for args, _ in recorder.marks]
    label_heights = [xy[1] for text, xy in recorder.texts if text != "?"]
    assert len(label_heights) == len(mark_heights) > 0
    assert all(label >= mark for label, mark in zip(label_heights, mark_heights, strict=True))
    assert any(text.endswith("?") for text, _ in recorder.texts)  # the untrusted value says so


def test_the_results_file_keeps_what_the_run_printed(tmp_path, capsys):
    from mlx_fused_lora.bench import cli

    argv = ["--shapes", "32x64x48x4", "--budget", "0.001", "--rounds", "1", "--passes", "forward", "--dropouts", "0"]
    argv += ["--no-peft", "--no-chart", "--no-e2e", "--out", str(tmp_path), "--name", "run"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["printed"] and data["printed"] in out
    assert "untrusted" in data["printed"].splitlines()[1]  # the table's header names the column
    assert "none measured" in data["printed"]
    (row,) = data["ratios"]
    assert isinstance(row["untrusted"], list) and row["limit_drift"] >= 0
    assert data["untrusted"]["cells"] == int(bool(row["untrusted"]))
    assert data["calibration"]["moved"] in (True, False) and data["targets"]["measured"] == []


def test_kinds_of_similar_cost_run_the_same_rounds_and_a_much_slower_one_fewer():
    import time

    from mlx_fused_lora.bench import timing

    fns = {"fast": lambda: time.sleep(0.01), "similar": lambda: time.sleep(0.02), "slow": lambda: time.sleep(0.3)}
    result = timing.measure_interleaved(fns, budget_s=0.2, max_rounds=10, min_rounds={})
    rounds = {name: r["rounds"] for name, r in result.items()}
    # Same rounds: their rounds span the same stretch of time, so a quiet spell reaches both.
    assert rounds["fast"] == rounds["similar"] == 10
    assert 1 <= rounds["slow"] < 10
    assert all(len(r["times_s"]) == r["rounds"] for r in result.values())
