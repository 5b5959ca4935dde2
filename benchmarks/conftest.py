"""Prints the side-by-side ratios of a benchmark run and checks them against targets."""

from collections import defaultdict

# (pass, ratio) -> the most it may be: fused / limit, and fused peak memory at
# p = 0.1 over p = 0. From the core-op issue; on the CPU, fp32, 2048^3, r = 16.
TARGETS = {
    ("forward", "time"): 1.10,
    ("forward_backward", "time"): 1.15,
    ("forward_backward", "memory"): 1.01,
}


def collect_ratios(benchmarks):
    """Rows of ratios from pytest-benchmark results carrying our extra_info."""
    best = defaultdict(dict)
    for bench in benchmarks:
        info = bench["extra_info"] if isinstance(bench, dict) else bench.extra_info
        if "kind" not in info:
            continue
        stats = bench["stats"] if isinstance(bench, dict) else bench.stats
        minimum = stats["min"] if isinstance(stats, dict) else stats.min
        shape = (info["m"], info["k"], info["n"], info["r"], info["dtype"])
        best[(shape, info["pass_name"], info["dropout"])][info["kind"]] = (minimum, info["peak_memory"])
    rows = []
    for (shape, pass_name, p), kinds in sorted(best.items(), key=str):
        if not {"fused", "limit"} <= kinds.keys():
            continue
        row = dict(shape=shape, pass_name=pass_name, dropout=p,
                   fused_over_limit=kinds["fused"][0] / kinds["limit"][0],
                   fused_memory=kinds["fused"][1])
        if "plain" in kinds:
            row["plain_over_fused"] = kinds["plain"][0] / kinds["fused"][0]
            row["plain_memory"] = kinds["plain"][1]
        base = best.get((shape, pass_name, 0.0), {}).get("fused")
        if p > 0 and base:
            row["memory_over_p0"] = kinds["fused"][1] / base[1]
        rows.append(row)
    return rows


def format_ratios(rows):
    lines = [f"{'shape M,K,N,r,dtype':<28}{'pass':<18}{'p':>5}{'fused/limit':>13}{'plain/fused':>13}"
             f"{'fused MiB':>11}{'plain MiB':>11}{'mem vs p=0':>12}"]
    misses = []
    for row in rows:
        shape = ",".join(str(s) for s in row["shape"])
        plain = f"{row['plain_over_fused']:.2f}x" if "plain_over_fused" in row else "-"
        plain_mem = f"{row['plain_memory'] / 2**20:.1f}" if "plain_memory" in row else "-"
        mem = f"{row['memory_over_p0']:.4f}" if "memory_over_p0" in row else "-"
        lines.append(f"{shape:<28}{row['pass_name']:<18}{row['dropout']:>5}{row['fused_over_limit']:>12.3f}x"
                     f"{plain:>13}{row['fused_memory'] / 2**20:>11.1f}{plain_mem:>11}{mem:>12}")
        for (pass_name, what), bound in TARGETS.items():
            if pass_name != row["pass_name"]:
                continue
            value = row["fused_over_limit"] if what == "time" else row.get("memory_over_p0")
            if value is not None and value > bound:
                misses.append(f"{shape} {pass_name} p={row['dropout']}: {what} ratio {value:.3f} > {bound}")
    return lines, misses


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    lines, misses = format_ratios(collect_ratios(session.benchmarks))
    if len(lines) == 1:
        return
    terminalreporter.section("fused LoRA: ratios measured side by side in this run")
    for line in lines:
        terminalreporter.write_line(line)
    for miss in misses:
        terminalreporter.write_line(f"TARGET MISSED: {miss}")
    if not misses:
        terminalreporter.write_line("all targets met: " + ", ".join(
            f"{p} {w} <= {b}" for (p, w), b in TARGETS.items()))
