"""Ratios of a run: fused / limit, peer / fused, peak memory per kind; the targets; the text table."""

from .grid import PEERS, TARGET_SHAPE, TARGETS


def _group_key(record):
    return (
        record["m"],
        record["k"],
        record["n"],
        record["r"],
        record["dtype"],
        record["pass_name"],
        float(record["dropout"]),
    )


def ratio_rows(records):
    """One row per group: fused / limit, peer / fused, peak MiB of each kind."""
    groups = {}
    for record in records:
        groups.setdefault(_group_key(record), {})[record["kind"]] = record
    rows = []
    for key, kinds in sorted(groups.items()):
        if not {"fused", "limit"} <= kinds.keys():
            continue
        m, k, n, r, dtype, pass_name, p = key
        fused = kinds["fused"]
        row = dict(
            m=m,
            k=k,
            n=n,
            r=r,
            dtype=dtype,
            pass_name=pass_name,
            dropout=p,
            fused_over_limit=fused["time_s"] / kinds["limit"]["time_s"],
            memory_mib={kind: rec["peak_memory"] / 2**20 for kind, rec in kinds.items()},
        )
        for peer in PEERS:
            if peer in kinds:
                row[f"{peer}_over_fused"] = kinds[peer]["time_s"] / fused["time_s"]
                row[f"{peer}_over_limit"] = kinds[peer]["time_s"] / kinds["limit"]["time_s"]
        at_p0 = groups.get((m, k, n, r, dtype, pass_name, 0.0), {}).get("fused")
        if p > 0 and at_p0:
            row["fused_memory_over_p0"] = fused["peak_memory"] / at_p0["peak_memory"]
        rows.append(row)
    return rows


def target_misses(rows):
    """Lines naming each target the rows of the target shape miss."""
    misses = []
    for row in rows:
        if (row["m"], row["k"], row["n"], row["r"], row["dtype"]) != TARGET_SHAPE:
            continue
        for (pass_name, what), bound in TARGETS.items():
            if pass_name != row["pass_name"]:
                continue
            value = row["fused_over_limit"] if what == "time" else row.get("fused_memory_over_p0")
            if value is not None and value > bound:
                misses.append(f"{pass_name} p={row['dropout']}: {what} ratio {value:.3f} > {bound}")
    return misses


def format_ratio_table(rows):
    """The ratio table as lines of text (times: best rounds; memory: MLX's peak, MiB)."""

    def ratio(row, name):
        return f"{row[name]:.2f}x" if name in row else "-"

    def mib(row, kind):
        return f"{row['memory_mib'][kind]:.1f}" if kind in row["memory_mib"] else "-"

    header = (
        f"{'M x K x N  r':<20}{'dtype':<9}{'pass':<8}{'p':>4}{'fused/limit':>12}"
        f"{'plain/fused':>12}{'compiled/f':>11}{'addmm/f':>9}"
        f"{'MiB: fused':>11}{'plain':>7}{'compiled':>9}{'addmm':>7}{'limit':>7}"
    )
    lines = [header]
    for row in rows:
        label = f"{row['m']}x{row['k']}x{row['n']} {row['r']}"
        pass_label = "fwd" if row["pass_name"] == "forward" else "fwd+bwd"
        lines.append(
            f"{label:<20}{row['dtype']:<9}{pass_label:<8}{row['dropout']:>4}"
            f"{row['fused_over_limit']:>11.3f}x{ratio(row, 'plain_over_fused'):>12}"
            f"{ratio(row, 'plain_compiled_over_fused'):>11}{ratio(row, 'plain_addmm_over_fused'):>9}"
            f"{mib(row, 'fused'):>11}{mib(row, 'plain'):>7}{mib(row, 'plain_compiled'):>9}"
            f"{mib(row, 'plain_addmm'):>7}{mib(row, 'limit'):>7}"
        )
    return lines
