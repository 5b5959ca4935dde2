"""The --quick option, the fast BLAS, and the ratio table and targets printed after a benchmark run."""

# Before anything imports mlx.core: MLX binds its BLAS when it loads. As the
# mlx-fused-lora command does, the plain peers get OpenBLAS unless
# MLX_FUSED_LORA_FAST_BLAS=0, so fused / plain is the fusion's own gain.
from mlx_fused_lora import fast_blas
from mlx_fused_lora.env_switch import switch

if switch(fast_blas.ENV_VAR, default=True):
    fast_blas.enable()

from mlx_fused_lora.bench import report  # noqa: E402  (after the BLAS is chosen)


def pytest_addoption(parser):
    parser.addoption(
        "--quick",
        action="store_true",
        default=False,
        help="benchmark a few cases (under two minutes on 2 CPU cores) instead of the full grid",
    )


def _stat(bench, name):
    stats = bench["stats"] if isinstance(bench, dict) else bench.stats
    return stats[name] if isinstance(stats, dict) else getattr(stats, name)


def _rounds(bench):
    """Every timed round (for the limit's drift), or just the best where the stats keep no rounds."""
    stats = bench["stats"] if isinstance(bench, dict) else bench.stats
    data = stats.get("data") if isinstance(stats, dict) else getattr(getattr(stats, "stats", stats), "data", None)
    return list(data) if data else [_stat(bench, "min")]


def _info(bench):
    return bench["extra_info"] if isinstance(bench, dict) else bench.extra_info


def records_from(benchmarks):
    """pytest-benchmark results -> the records bench.report.ratio_rows reads."""
    records = []
    for bench in benchmarks:
        info = _info(bench)
        if "kind" in info:
            records.append(dict(info, time_s=_stat(bench, "min"), times_s=_rounds(bench)))
    return records


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows = report.ratio_rows(records_from(session.benchmarks))
    write = terminalreporter.write_line
    if rows:
        terminalreporter.section("fused LoRA: ratios (best rounds of this run; x/fused > 1: fused is faster)")
        for line in report.format_ratio_table(rows):
            write(line)
        for line in report.target_lines(rows):
            write(line)
    write(f"BLAS: MLX's matmul (plain peers) {fast_blas.active_blas()}")
    e2e = {_info(b)["e2e_kind"]: b for b in session.benchmarks if "e2e_kind" in _info(b)}
    if {"fused", "plain"} <= e2e.keys():
        tokens = {k: _info(b)["tokens"] / _stat(b, "min") for k, b in e2e.items()}
        write(
            f"end-to-end training step: fused {tokens['fused']:.0f} tok/s "
            f"{_info(e2e['fused'])['peak_memory'] / 2**20:.0f} MiB, plain {tokens['plain']:.0f} tok/s "
            f"{_info(e2e['plain'])['peak_memory'] / 2**20:.0f} MiB: {tokens['fused'] / tokens['plain']:.2f}x"
        )
