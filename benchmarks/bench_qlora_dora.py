"""QLoRA and DoRA layers against mlx-lm's, forward + backward: time and peak memory.

    MLX_FUSED_LORA_FAST_BLAS=1 pytest benchmarks/bench_qlora_dora.py --benchmark-only \\
        --benchmark-json benchmarks/results/cpu-qlora-dora.json
    python benchmarks/bench_qlora_dora.py benchmarks/results/cpu-qlora-dora.json --write

The first runs the cases (one training step each: the loss's gradient w.r.t. the
adapters and x, as for a layer inside a model); the second prints the markdown table
the README shows and checks issue 13's targets (``--write`` keeps the rows and that
text in the results file, for the README's figures; ``--check`` exits 1 on a miss):

- QLoRA (`FusedLoRALinear` vs mlx-lm's `LoRALinear`, both over the same 4-bit
  `QuantizedLinear`): fused faster; fused peak memory at p = 0.1 within 1 % of p = 0.
- DoRA (`FusedDoRALinear` vs mlx-lm's `DoRALinear` over the same base): fused faster;
  fused peak lower by at least the N x K float32 adapted weight mlx-lm forms per call.

Both layers wrap the same base and see the same x and output cotangent. Peak memory is
what MLX held during one step (`mx.get_peak_memory`), inputs and both layers included;
times are the best of the alternating rounds (the fused one is pytest-benchmark's min).
MLX's own matmuls (mlx-lm's layers) run on OpenBLAS with MLX_FUSED_LORA_FAST_BLAS=1, the
BLAS the fused op uses: the fair match.
"""

import sys
import time

import mlx.core as mx
import mlx.nn as nn

M, K, N, R = 256, 2048, 2048, 16
SCALE, GROUP_SIZE, BITS = 2.0, 64, 4
# (method, base, dropout): each case times the fused layer and mlx-lm's, alternating
CASES = [("qlora", "q4", 0.0), ("qlora", "q4", 0.1), ("dora", "dense", 0.0), ("dora", "q4", 0.0)]
ROUNDS = 5


def layer_class(method, kind):
    if kind == "fused":
        from mlx_fused_lora.layers import FusedLoRALinear
        from mlx_fused_lora.layers.fused_dora_linear import FusedDoRALinear

        return FusedLoRALinear if method == "qlora" else FusedDoRALinear
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    return LoRALinear if method == "qlora" else DoRALinear


def make_inputs(base_kind):
    """The frozen base (dense or 4-bit), x and the output cotangent dy, shared by both layers."""
    mx.random.seed(0)
    base = nn.Linear(K, N, bias=False)
    if base_kind == "q4":
        base = nn.QuantizedLinear.from_linear(base, GROUP_SIZE, BITS)
    x, dy = mx.random.normal((M, K)), mx.random.normal((M, N))
    mx.eval(base.parameters(), x, dy)
    return base, x, dy


def make_step(method, dropout, kind, base, x, dy):
    """A zero-argument training step of one layer kind around ``base``."""
    mx.random.seed(1)  # the same adapters for both kinds
    layer = layer_class(method, kind).from_base(base, r=R, dropout=dropout, scale=SCALE)
    layer.lora_b = 0.01 * mx.random.normal(layer.lora_b.shape)
    layer.freeze()
    layer.unfreeze(keys=[k for k in ("lora_a", "lora_b", "m") if k in layer], recurse=False)
    layer.train()

    def loss(params, x):
        layer.update(params)
        return (layer(x) * dy).sum()

    # The loss's value too: in a model the forward is needed, and without it MLX would
    # skip the base's forward product (this loss is linear in the output).
    grad = mx.value_and_grad(loss, argnums=(0, 1))
    mx.eval(layer.parameters())

    def step():
        mx.eval(grad(layer.trainable_parameters(), x))

    return step


def peak_of(step):
    """The peak memory MLX held during one step, inputs included."""
    from mlx_fused_lora.bench.timing import timed_call

    return timed_call(step)[1]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", CASES, ids=[f"{m}-{b}-p{p}" for m, b, p in CASES])


def test_qlora_dora_step(benchmark, case):
    """pytest-benchmark times the fused step; mlx-lm's step runs in each round's setup
    (untimed by pytest-benchmark, timed here), so the two alternate round by round and
    a burst of load on this shared machine lands on both alike."""
    from mlx_fused_lora.fast_blas import active_blas

    method, base_kind, dropout = case
    inputs = make_inputs(base_kind)
    fused, peer = (make_step(method, dropout, kind, *inputs) for kind in ("fused", "mlx_lm"))
    fused()  # warm-up
    peer()
    peaks = {"fused": peak_of(fused), "mlx_lm": peak_of(peer)}
    peer_times = []

    def run_peer():
        start = time.perf_counter()
        peer()
        peer_times.append(time.perf_counter() - start)

    benchmark.group = f"{method} {base_kind} p={dropout}"
    benchmark.pedantic(fused, setup=run_peer, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(
        method=method,
        base=base_kind,
        dropout=dropout,
        m=M,
        k=K,
        n=N,
        r=R,
        fused_peak_memory=peaks["fused"],
        mlx_lm_peak_memory=peaks["mlx_lm"],
        mlx_lm_times_s=peer_times,
        mlx_lm_min_s=min(peer_times),
        blas=active_blas(),
        device=str(mx.default_device()),
    )


# -- the report: python benchmarks/bench_qlora_dora.py RESULTS.json [--write] [--check] --


def ratio_rows(path):
    """One row per case from a pytest-benchmark JSON file of these cases."""
    from mlx_fused_lora.bench.results import benchmark_cases

    rows = []
    for fused_s, info in benchmark_cases(path):
        peer_s = info["mlx_lm_min_s"]
        rows.append(
            dict(
                method=info["method"],
                base=info["base"],
                dropout=info["dropout"],
                shape=[info["m"], info["k"], info["n"], info["r"]],
                fused_s=fused_s,
                mlx_lm_s=peer_s,
                speedup=peer_s / fused_s,
                fused_peak_mib=info["fused_peak_memory"] / 2**20,
                mlx_lm_peak_mib=info["mlx_lm_peak_memory"] / 2**20,
                blas=info["blas"],
            )
        )
    return rows


def report(rows):
    """(markdown lines, target misses) for `ratio_rows`."""
    from mlx_fused_lora.bench.results import FASTER

    m, k, n, r = rows[0]["shape"]
    n_by_k_mib = n * k * 4 / 2**20
    lines = [
        f"M × K × N = {m} × {k} × {n}, r = {r}, float32, forward + backward; BLAS: {rows[0]['blas']}",
        "",
        "| layer | base | p | fused s | mlx-lm s | mlx-lm / fused | peak MiB fused · mlx-lm |",
        "|---|---|---|---|---|---|---|",
    ]
    misses = []
    by_case = {(row["method"], row["base"], row["dropout"]): row for row in rows}
    for case in CASES:
        row = by_case.get(case)
        if row is None:
            misses.append(f"{case}: not measured")
            continue
        method, base, p = case
        name = "QLoRA" if method == "qlora" else "DoRA"
        saved = row["mlx_lm_peak_mib"] - row["fused_peak_mib"]
        lines.append(
            f"| {name} | {base} | {p} | {row['fused_s']:.3f} | {row['mlx_lm_s']:.3f} | {row['speedup']:.2f}× "
            f"| {row['fused_peak_mib']:.1f} · {row['mlx_lm_peak_mib']:.1f} |"
        )
        if row["speedup"] < FASTER:
            misses.append(f"{name} {base} p={p}: fused is not faster beyond noise ({row['speedup']:.2f}x < {FASTER}x)")
        if method == "dora" and saved < n_by_k_mib:
            misses.append(f"DoRA {base}: peak saved {saved:.1f} MiB < the N x K temporary {n_by_k_mib:.1f} MiB")
    q0, q1 = by_case.get(("qlora", "q4", 0.0)), by_case.get(("qlora", "q4", 0.1))
    if q0 and q1:
        growth = q1["fused_peak_mib"] / q0["fused_peak_mib"] - 1
        peer_growth = q1["mlx_lm_peak_mib"] / q0["mlx_lm_peak_mib"] - 1
        lines += [
            "",
            f"QLoRA peak memory, p = 0.1 vs p = 0: fused {100 * growth:+.2f} %, mlx-lm {100 * peer_growth:+.2f} %",
        ]
        if growth > 0.01:
            misses.append(f"QLoRA: fused peak grows {100 * growth:.2f} % from p = 0 to p = 0.1 (target <= 1 %)")
    lines += ["", f"DoRA: the N × K float32 adapted weight mlx-lm forms is {n_by_k_mib:.1f} MiB."]
    lines += [f"TARGET MISSED: {miss}" for miss in misses] or ["all targets met"]
    return lines, misses


if __name__ == "__main__":
    from mlx_fused_lora.bench.results import report_benchmark_file

    sys.exit(report_benchmark_file(sys.argv[1:], ratio_rows, report))
