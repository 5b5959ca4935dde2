"""The results file of a ``mlx-fused-lora bench`` run: one dict (written as JSON) and the summary it prints.

The printed summary is kept in the file (``printed``) verbatim, so a README block that
shows it can be checked against the committed file.
"""

import json
import shlex

from . import grid as grids
from .machine import machine_info, versions
from .report import (
    BELOW_LIMIT,
    FUSED_UNSTEADY,
    GAUGE_MOVED,
    GAUGE_TOLERANCE,
    PEFT_BELOW_LIMIT,
    format_ratio_table,
    ratio_rows,
    target_lines,
    target_misses,
    target_status,
)

# Later fields (blas, untrusted, targets.measured, peft kinds, printed) were added, none changed.
SCHEMA = "mlx-fused-lora-bench/1"

KIND_TEXT = dict(
    fused="FusedLoRALinear (the fused op)",
    plain="mlx-lm's LoRALinear (PlainLoRALinear when mlx-lm is not installed)",
    plain_compiled="the plain layer under mx.compile",
    plain_addmm="AddmmLoRALinear: plain MLX at its best (addmm, adapters in x's dtype)",
    limit="base GEMM alone (forward); x @ W.T and dY @ W (forward_backward)",
)
PEFT_KIND_TEXT = dict(
    peft="PyTorch + PEFT: peft's LoRA Linear over a frozen torch.nn.Linear, same shapes, dtype, r, p, scale; "
    "forward under no_grad, backward the gradients of x, lora_A, lora_B (peak memory not measured)",
    peft_limit="torch's own GEMMs alone: x @ W.T (forward); x @ W.T and dY @ W (forward_backward)",
)
UNTRUSTED_TEXT = {
    BELOW_LIMIT: "fused time under the limit's: fused runs the limit's GEMMs and more, so load slowed the "
    "limit's best round",
    GAUGE_MOVED: f"the limit's two fastest rounds differ by more than {GAUGE_TOLERANCE:.0%}: its best was not reproduced",
    PEFT_BELOW_LIMIT: "PEFT's time under torch's two GEMMs alone: load slowed them",
    FUSED_UNSTEADY: f"the fused op's two fastest rounds differ by more than {GAUGE_TOLERANCE:.0%}",
}


def build(argv, started, wall_s, load, calibration, blas, settings, records, end_to_end):
    """The results dict: provenance, settings, every case, the ratios and their doubts, targets, the summary."""
    calibration_start, calibration_end, dtype = calibration
    gauge_moved = abs(calibration_end / calibration_start - 1) > GAUGE_TOLERANCE
    rows = ratio_rows(records)
    with_peft = settings.get("peft") is not None
    report = dict(
        schema=SCHEMA,
        command=" ".join(["mlx-fused-lora", "bench"] + [shlex.quote(a) for a in argv]),
        started=started.isoformat(timespec="seconds"),
        wall_s=wall_s,
        load_average=dict(start=load[0], end=load[1]),
        calibration=dict(
            what=f"best of 5: the 2048^3 {dtype} base GEMM through the limit path, seconds",
            start=calibration_start,
            end=calibration_end,
            moved=gauge_moved,
            tolerance=GAUGE_TOLERANCE,
        ),
        blas=blas,
        machine=machine_info(),
        versions=versions(),
        settings=settings,
        kinds=dict(KIND_TEXT, **(PEFT_KIND_TEXT if with_peft else {})),
        untrusted=dict(
            tolerance=GAUGE_TOLERANCE,
            reasons=UNTRUSTED_TEXT,
            cells=sum(bool(row["untrusted"]) for row in rows),
        ),
        cases=records,
        ratios=rows,
        targets=dict(
            shape=list(grids.TARGET_SHAPE),
            bounds={f"{p} {w}": b for (p, w), b in grids.TARGETS.items()},
            measured=target_status(rows),
            misses=target_misses(rows),
        ),
        end_to_end=end_to_end,
    )
    report["printed"] = "\n".join(summary_lines(report))
    return report


def summary_lines(report):
    """What the CLI prints after a run: the ratio table, the end-to-end step, doubts, targets, the gauge."""
    rows = report["ratios"]
    lines = [blas_text(report["blas"])]
    lines += format_ratio_table(rows)
    lines.append(
        "times: best round, each comparison measured side by side; x/fused > 1 means fused is faster; "
        "MiB: MLX's peak memory while the case ran, inputs included"
    )
    if report["end_to_end"]:
        lines.append(e2e_text(report["end_to_end"]))
    untrusted = report["untrusted"]["cells"]
    if untrusted:
        lines.append(
            f"untrusted: {untrusted} of {len(rows)} cells (fused below the limit, or the limit's or fused's two "
            f"fastest rounds more than {GAUGE_TOLERANCE:.0%} apart: load moved while they ran); read them as noise"
        )
    lines += target_lines(rows)
    cal, load = report["calibration"], report["load_average"]
    lines.append(
        f"load average {load_text(load['start'])} at the start, {load_text(load['end'])} at the end; "
        f"2048^3 GEMM {cal['start'] * 1e3:.1f} ms at the start, {cal['end'] * 1e3:.1f} ms at the end; "
        f"{report['wall_s']:.0f} s in all"
        + (" (the gauge moved: absolute times are suspect, compare ratios)" if cal["moved"] else "")
    )
    return lines


def blas_text(blas):
    text = f"BLAS: fused {blas['fused']}; plain peers (MLX matmul) {blas['plain_peers']}; limit {blas['limit']}"
    return text + (f"; PEFT {blas['peft']}" if "peft" in blas else "")


def load_text(load):
    return "unknown" if load is None else "/".join(f"{v:.2f}" for v in load)


def e2e_text(e2e):
    c, res = e2e["config"], e2e["results"]
    return (
        f"end-to-end training step (TinyLlama dim {c['dim']}, {c['layers']} layers, {c['tokens']} tokens, "
        f"every projection LoRA r={c['r']} p={c['dropout']}, compiled step, Adam): "
        f"fused {res['fused']['tokens_per_s']:.0f} tok/s {res['fused']['peak_memory'] / 2**20:.0f} MiB, "
        f"plain {res['plain']['tokens_per_s']:.0f} tok/s {res['plain']['peak_memory'] / 2**20:.0f} MiB "
        f"({e2e['plain_layer']}): {e2e['speedup']:.2f}x faster, {e2e['memory_ratio']:.2f}x less memory"
    )


# A runner's "faster" means beyond this machine's run-to-run noise, not a 1 % tie.
FASTER = 1.05


def benchmark_cases(path):
    """(best round in seconds, extra_info) of each case in a pytest-benchmark JSON file."""
    with open(path) as f:
        data = json.load(f)
    return [(bench["stats"]["min"], bench["extra_info"]) for bench in data["benchmarks"]]


def report_benchmark_file(argv, ratio_rows, report):
    """The command line of a pytest-benchmark runner's report (``benchmarks/bench_*.py``):
    ``FILE.json [--write] [--check]`` prints ``report(ratio_rows(FILE))``'s lines; with
    ``--write`` the file keeps the rows, that text and the missed targets (for the README's
    figures); returns 1 on a missed target with ``--check``, else 0."""
    path = argv[0]
    rows = ratio_rows(path)
    lines, misses = report(rows)
    print("\n".join(lines))
    if "--write" in argv:
        with open(path) as f:
            data = json.load(f)
        data.update(ratios=rows, summary="\n".join(lines), targets_missed=misses)
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
    return 1 if misses and "--check" in argv else 0
