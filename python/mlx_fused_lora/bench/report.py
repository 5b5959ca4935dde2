"""Ratios of a run: fused / limit, peer / fused, peak memory per kind; which cells to distrust; the targets; the text table."""

from .grid import PEERS, TARGET_SHAPE, TARGETS

# A cell is distrusted when the limit's two fastest rounds disagree by more than this:
# its best round, which the ratios use, was not reproduced, so the machine's load moved
# under it. (Rounds slowed by load elsewhere in the cell do not enter the best-round
# ratios, so they alone do not distrust it.) Fused and the limit are a few per cent
# apart: a gauge that moves more than that hides the difference.
GAUGE_TOLERANCE = 0.10

BELOW_LIMIT = "fused below the limit"
GAUGE_MOVED = "gauge moved"
PEFT_BELOW_LIMIT = "PEFT below its limit"
FUSED_UNSTEADY = "fused not reproduced"


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


def limit_drift(record):
    """How far a kind's best round was from being reproduced: second best / best - 1 (0 for one round)."""
    times = sorted(record.get("times_s") or [record["time_s"]])
    return times[1] / times[0] - 1 if len(times) > 1 else 0.0


def untrusted_reasons(kinds):
    """Why a cell's ratios cannot be trusted; [] when they can.

    - fused below the limit: fused runs the limit's GEMMs and more, so a fused time under
      the limit's means load slowed the limit's best round, not that fused beat it;
    - gauge moved: the limit's two fastest rounds differ by more than GAUGE_TOLERANCE;
    - fused not reproduced: the same for the fused op's rounds (its best came from a
      quieter moment than the rest, or the rest were slowed).
    """
    reasons = []
    if kinds["fused"]["time_s"] < kinds["limit"]["time_s"]:
        reasons.append(BELOW_LIMIT)
    if limit_drift(kinds["limit"]) > GAUGE_TOLERANCE:
        reasons.append(GAUGE_MOVED)
    if limit_drift(kinds["fused"]) > GAUGE_TOLERANCE:
        reasons.append(FUSED_UNSTEADY)
    if {"peft", "peft_limit"} <= kinds.keys() and kinds["peft"]["time_s"] < kinds["peft_limit"]["time_s"]:
        reasons.append(PEFT_BELOW_LIMIT)
    return reasons


def ratio_rows(records):
    """One row per group: fused / limit, peer / fused, peak MiB of each kind, and why not to trust it."""
    groups = {}
    for record in records:
        groups.setdefault(_group_key(record), {})[record["kind"]] = record
    rows = []
    for key, kinds in sorted(groups.items()):
        if not {"fused", "limit"} <= kinds.keys():
            continue
        m, k, n, r, dtype, pass_name, p = key
        fused, limit = kinds["fused"], kinds["limit"]
        row = dict(
            m=m,
            k=k,
            n=n,
            r=r,
            dtype=dtype,
            pass_name=pass_name,
            dropout=p,
            fused_over_limit=fused["time_s"] / limit["time_s"],
            memory_mib={
                kind: rec["peak_memory"] / 2**20 for kind, rec in kinds.items() if rec.get("peak_memory") is not None
            },
            limit_drift=limit_drift(limit),
            untrusted=untrusted_reasons(kinds),
        )
        for peer in PEERS:
            if peer in kinds:
                row[f"{peer}_over_fused"] = kinds[peer]["time_s"] / fused["time_s"]
                row[f"{peer}_over_limit"] = kinds[peer]["time_s"] / limit["time_s"]
        if {"peft", "peft_limit"} <= kinds.keys():
            row["peft_over_fused"] = kinds["peft"]["time_s"] / fused["time_s"]
            row["peft_over_peft_limit"] = kinds["peft"]["time_s"] / kinds["peft_limit"]["time_s"]
            row["peft_limit_over_limit"] = kinds["peft_limit"]["time_s"] / limit["time_s"]
        at_p0 = groups.get((m, k, n, r, dtype, pass_name, 0.0), {}).get("fused")
        if p > 0 and at_p0:
            row["fused_memory_over_p0"] = fused["peak_memory"] / at_p0["peak_memory"]
        rows.append(row)
    return rows


def target_status(rows):
    """One dict per target measured in `rows` at TARGET_SHAPE: what, p, value, bound, met, untrusted.

    Time targets are checked at every p the run has; the memory target (peak at p > 0
    over p = 0) at every p > 0 whose p = 0 twin ran. [] when the shape is not in `rows`.
    """
    status = []
    for row in rows:
        if (row["m"], row["k"], row["n"], row["r"], row["dtype"]) != TARGET_SHAPE:
            continue
        for (pass_name, what), bound in TARGETS.items():
            if pass_name != row["pass_name"]:
                continue
            value = row["fused_over_limit"] if what == "time" else row.get("fused_memory_over_p0")
            if value is None:
                continue
            status.append(
                dict(
                    pass_name=pass_name,
                    what=what,
                    dropout=row["dropout"],
                    value=value,
                    bound=bound,
                    met=value <= bound,
                    # Peak memory is not timed: only the time targets inherit a cell's doubts.
                    untrusted=list(row.get("untrusted", [])) if what == "time" else [],
                )
            )
    return status


def target_misses(rows):
    """Lines naming each target the rows of the target shape miss."""
    return [
        f"{t['pass_name']} p={t['dropout']}: {t['what']} ratio {t['value']:.3f} > {t['bound']}"
        for t in target_status(rows)
        if not t["met"]
    ]


def target_lines(rows):
    """What a run says about the targets: each one measured, met or missed; or that none was measured."""
    m, k, n, r, dtype = TARGET_SHAPE
    status = target_status(rows)
    if not status:
        return [f"targets ({m}x{k}x{n} r{r} {dtype}): none measured, the shape is not in this run"]
    lines = [f"targets ({m}x{k}x{n} r{r} {dtype}): {sum(t['met'] for t in status)} of {len(status)} measured met"]
    for t in status:
        what = "fused / limit" if t["what"] == "time" else "fused peak memory / p=0"
        doubt = f" (untrusted: {', '.join(t['untrusted'])})" if t["untrusted"] else ""
        verdict = "met" if t["met"] else "MISSED"
        lines.append(f"  {t['pass_name']} p={t['dropout']}: {what} {t['value']:.3f}x <= {t['bound']}: {verdict}{doubt}")
    return lines


def format_ratio_table(rows):
    """The ratio table as lines of text (times: best rounds; memory: MLX's peak, MiB)."""
    with_peft = any("peft_over_fused" in row for row in rows)

    def ratio(row, name):
        return f"{row[name]:.2f}x" if name in row else "-"

    def mib(row, kind):
        return f"{row['memory_mib'][kind]:.1f}" if kind in row["memory_mib"] else "-"

    header = (
        f"{'M x K x N  r':<20}{'dtype':<9}{'pass':<8}{'p':>4}{'fused/limit':>12}"
        f"{'plain/fused':>12}{'compiled/f':>11}{'addmm/f':>9}"
        + (f"{'peft/f':>8}{'peft/plim':>10}" if with_peft else "")
        + f"{'MiB: fused':>11}{'plain':>7}{'compiled':>9}{'addmm':>7}{'limit':>7}  untrusted"
    )
    lines = [header]
    for row in rows:
        label = f"{row['m']}x{row['k']}x{row['n']} {row['r']}"
        pass_label = "fwd" if row["pass_name"] == "forward" else "fwd+bwd"
        lines.append(
            f"{label:<20}{row['dtype']:<9}{pass_label:<8}{row['dropout']:>4}"
            f"{row['fused_over_limit']:>11.3f}x{ratio(row, 'plain_over_fused'):>12}"
            f"{ratio(row, 'plain_compiled_over_fused'):>11}{ratio(row, 'plain_addmm_over_fused'):>9}"
            + (f"{ratio(row, 'peft_over_fused'):>8}{ratio(row, 'peft_over_peft_limit'):>10}" if with_peft else "")
            + f"{mib(row, 'fused'):>11}{mib(row, 'plain'):>7}{mib(row, 'plain_compiled'):>9}"
            f"{mib(row, 'plain_addmm'):>7}{mib(row, 'limit'):>7}  {', '.join(row.get('untrusted', [])) or '-'}"
        )
    return lines
