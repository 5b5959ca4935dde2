"""Markdown tables (and, with --png, the chart again) from a `mlx-fused-lora bench` JSON file.

    python benchmarks/report.py benchmarks/results/cpu-fp32-full.json

What the README's "Benchmark suite" section shows is this script's output for the
committed results: no number is typed by hand.
"""

import argparse
import json

from mlx_fused_lora.bench.report import target_misses


def _x(value, digits=2):
    return f"{value:.{digits}f}×"


def peer_table(rows, dropout=None):
    lines = [
        "| M × K × N, r | pass | p | fused / limit | plain / fused | compiled / fused | addmm / fused "
        "| peak MiB fused · plain · compiled · addmm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "plain_over_fused" not in row or (dropout is not None and row["dropout"] != dropout):
            continue
        mem = row["memory_mib"]
        lines.append(
            f"| {row['m']}×{row['k']}×{row['n']}, {row['r']} | {_pass(row)} | {row['dropout']} "
            f"| {_x(row['fused_over_limit'], 3)} | {_x(row['plain_over_fused'], 1)} "
            f"| {_x(row['plain_compiled_over_fused'], 1)} | {_x(row['plain_addmm_over_fused'], 1)} "
            f"| {mem['fused']:.1f} · {mem['plain']:.1f} · {mem['plain_compiled']:.1f} · {mem['plain_addmm']:.1f} |"
        )
    return lines


def limit_table(rows):
    """fused / limit for every shape: one row per shape, a column per (pass, p)."""
    columns = sorted({(r["pass_name"], r["dropout"]) for r in rows}, key=lambda c: (c[0] != "forward", c[1]))
    by_shape = {}
    for row in rows:
        by_shape.setdefault((row["m"], row["k"], row["r"], row["dtype"]), {})[(row["pass_name"], row["dropout"])] = row
    head = " | ".join(f"{'fwd' if p == 'forward' else 'fwd+bwd'} p={d}" for p, d in columns)
    lines = [f"| M × K (= N), r | {head} | fused peak MiB (fwd+bwd, p=0.1) |", "|---|" + "---|" * (len(columns) + 1)]
    for (m, k, r, _dtype), cells in sorted(by_shape.items()):
        values = " | ".join(_x(cells[c]["fused_over_limit"], 3) if c in cells else "-" for c in columns)
        fb = cells.get(("forward_backward", 0.1))
        mem = f"{fb['memory_mib']['fused']:.0f} (limit {fb['memory_mib']['limit']:.0f})" if fb else "-"
        lines.append(f"| {m}×{k}, {r} | {values} | {mem} |")
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


def provenance(report):
    m, v = report["machine"], report["versions"]
    load, cal = report["load_average"], report.get("calibration", {})
    return (
        f"`{report['command']}` on {m['cpu']} ({m['cpu_count']} cores, {m['device']}), "
        f"mlx {v['mlx']}, mlx-lm {v['mlx-lm']}, Python {v['python']}, {report['started']}; "
        f"{report['wall_s'] / 60:.1f} min; load average {load['start'][0]:.2f} → {load['end'][0]:.2f}; "
        f"2048³ GEMM {cal.get('start', 0) * 1e3:.0f} → {cal.get('end', 0) * 1e3:.0f} ms."
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path")
    parser.add_argument("--png", help="draw the chart again into this file")
    parser.add_argument("--peer-dropout", type=float, help="peer table: only the rows of this p")
    args = parser.parse_args()
    with open(args.json_path) as f:
        report = json.load(f)
    print(provenance(report), "\n")
    for line in (
        peer_table(report["ratios"], args.peer_dropout) + [""] + limit_table(report["ratios"]) + [""] + e2e_line(report)
    ):
        print(line)
    misses = target_misses(report["ratios"])
    print("\ntargets at 2048³ r16 fp32:", "; ".join(misses) if misses else "all met (or shape not in this run)")
    if args.png:
        from mlx_fused_lora.bench.chart import write_chart

        write_chart(report, args.png)


if __name__ == "__main__":
    main()
