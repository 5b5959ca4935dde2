"""Markdown tables (and, with --png, the chart again) from a `mlx-fused-lora bench` JSON file.

    python benchmarks/report.py benchmarks/results/cpu-fp32-full.json

The README's "Benchmark suite" shows the committed files' printed summaries and figures
read from them (checked by tests/test_readme.py): no number is typed by hand. The ratios are computed again from the
file's cases (so files written before a cell could be marked untrusted get the marks
too); a cell the run cannot trust carries a "?" and its reason.
"""

import argparse
import json

from mlx_fused_lora.bench.report import ratio_rows, target_lines


def _x(value, digits=2):
    return f"{value:.{digits}f}×"


def _ratio(row, key, digits=2):
    return _x(row[key], digits) if key in row else "-"


def _flag(row):
    return ", ".join(row.get("untrusted", [])) or "-"


def _mark(row):
    return "?" if row.get("untrusted") else ""


def _mib(row, kind):
    value = row["memory_mib"].get(kind)
    return "-" if value is None else f"{value:.1f}"


def peer_table(rows, dropout=None):
    with_peft = any("peft_over_fused" in row for row in rows)
    peft_head = " PEFT / fused | PEFT / its limit |" if with_peft else ""
    lines = [
        "| M × K × N, r | pass | p | fused / limit | plain / fused | compiled / fused | addmm / fused |"
        + peft_head
        + " peak MiB fused · plain · compiled · addmm | untrusted |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if with_peft else ""),
    ]
    for row in rows:
        if "plain_over_fused" not in row or (dropout is not None and row["dropout"] != dropout):
            continue
        peft = ""
        if with_peft:
            peft = f" {_ratio(row, 'peft_over_fused')} | {_ratio(row, 'peft_over_peft_limit', 3)} |"
        lines.append(
            f"| {row['m']}×{row['k']}×{row['n']}, {row['r']} | {_pass(row)} | {row['dropout']} "
            f"| {_x(row['fused_over_limit'], 3)}{_mark(row)} | {_ratio(row, 'plain_over_fused')} "
            f"| {_ratio(row, 'plain_compiled_over_fused')} | {_ratio(row, 'plain_addmm_over_fused')} |"
            + peft
            + f" {_mib(row, 'fused')} · {_mib(row, 'plain')} · {_mib(row, 'plain_compiled')} · "
            f"{_mib(row, 'plain_addmm')} | {_flag(row)} |"
        )
    return lines


def limit_table(rows):
    """fused / limit for every shape: one row per shape, a column per (pass, p); "?" marks an untrusted cell."""
    columns = sorted({(r["pass_name"], r["dropout"]) for r in rows}, key=lambda c: (c[0] != "forward", c[1]))
    by_shape = {}
    for row in rows:
        by_shape.setdefault((row["m"], row["k"], row["r"], row["dtype"]), {})[(row["pass_name"], row["dropout"])] = row
    head = " | ".join(f"{'fwd' if p == 'forward' else 'fwd+bwd'} p={d}" for p, d in columns)
    lines = [f"| M × K (= N), r | {head} | fused peak MiB (fwd+bwd, p=0.1) |", "|---|" + "---|" * (len(columns) + 1)]
    for (m, k, r, _dtype), cells in sorted(by_shape.items()):
        values = " | ".join(
            _x(cells[c]["fused_over_limit"], 3) + _mark(cells[c]) if c in cells else "-" for c in columns
        )
        fb = cells.get(("forward_backward", 0.1))
        mem = f"{fb['memory_mib']['fused']:.0f} (limit {fb['memory_mib']['limit']:.0f})" if fb else "-"
        lines.append(f"| {m}×{k}, {r} | {values} | {mem} |")
    untrusted = [row for row in rows if row.get("untrusted")]
    if untrusted:
        lines += ["", f"?: untrusted, {len(untrusted)} of {len(rows)} cells (fused below the limit, or gauge moved)."]
    return lines


def _pass(row):
    return "fwd" if row["pass_name"] == "forward" else "fwd+bwd"


def e2e_line(report):
    e2e = report.get("end_to_end")
    if not e2e:
        return []
    c, res = e2e["config"], e2e["results"]
    return [
        "| end-to-end training step | tokens / s | peak MiB |",
        "|---|---|---|",
        f"| fused (FusedLoRALinear) | {res['fused']['tokens_per_s']:.0f} | {res['fused']['peak_memory'] / 2**20:.0f} |",
        f"| plain ({e2e['plain_layer']}) | {res['plain']['tokens_per_s']:.0f} "
        f"| {res['plain']['peak_memory'] / 2**20:.0f} |",
        "",
        f"TinyLlama: dim {c['dim']}, {c['layers']} layers, MLP {c['mlp_dim']}, vocab {c['vocab']}, "
        f"{c['batch']} × {c['seq']} = {c['tokens']} tokens a step, LoRA r = {c['r']}, p = {c['dropout']} on all "
        f"seven projections, compiled step with Adam: fused {e2e['speedup']:.2f}× the tokens per second, "
        f"plain {e2e['memory_ratio']:.2f}× the peak memory.",
    ]


def blas_line(report):
    """Which BLAS each kind ran on (files written before the suite recorded it say so)."""
    blas = report.get("blas")
    if not blas:
        return "BLAS: not recorded (an older file: plain MLX ran on its bundled reference BLAS on Linux)."
    text = f"BLAS: fused {blas['fused']}; plain peers (MLX's matmul) {blas['plain_peers']}; limit {blas['limit']}"
    return text + (f"; PEFT {blas['peft']}" if "peft" in blas else "") + "."


def provenance(report):
    m, v = report["machine"], report["versions"]
    load, cal = report["load_average"], report.get("calibration", {})
    peft = (report.get("settings") or {}).get("peft")
    peft_text = f", torch {peft['torch']}, peft {peft['peft']}" if peft else ""
    return (
        f"`{report['command']}` on {m['cpu']} ({m['cpu_count']} cores, {m['device']}), "
        f"mlx {v['mlx']}, mlx-lm {v['mlx-lm']}{peft_text}, Python {v['python']}, {report['started']}; "
        f"{report['wall_s'] / 60:.1f} min; load average {load['start'][0]:.2f} → {load['end'][0]:.2f}; "
        f"2048³ GEMM {cal.get('start', 0) * 1e3:.0f} → {cal.get('end', 0) * 1e3:.0f} ms."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path")
    parser.add_argument("--png", help="draw the chart again into this file")
    parser.add_argument("--peer-dropout", type=float, help="peer table: only the rows of this p")
    args = parser.parse_args(argv)
    with open(args.json_path) as f:
        report = json.load(f)
    rows = ratio_rows(report["cases"])
    print(provenance(report), "\n")
    print(blas_line(report), "\n")
    for line in peer_table(rows, args.peer_dropout) + [""] + limit_table(rows) + [""] + e2e_line(report):
        print(line)
    print()
    for line in target_lines(rows):
        print(line)
    if args.png:
        from mlx_fused_lora.bench.chart import write_chart

        write_chart(dict(report, ratios=rows), args.png)


if __name__ == "__main__":
    main()
