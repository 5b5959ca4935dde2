"""Mixed-adapter batches (every row on its own adapter) against the ways to do it in plain MLX.

    MLX_FUSED_LORA_FAST_BLAS=1 pytest benchmarks/bench_mixed_lora.py --benchmark-only \\
        --benchmark-json benchmarks/results/cpu-mixed-lora.json
    python benchmarks/bench_mixed_lora.py benchmarks/results/cpu-mixed-lora.json --write

One 2048 x 2048 layer, r = 16, 8 adapters, 8 sequences each on its own adapter (ids per
sequence): decode-like (8 x 1 token) and prefill-like (8 x 256). Kinds, all over the same
x, W and adapters, run alternately round by round (pytest-benchmark times the mixed op;
the others run in each round's setup, in an order rotated every round, and are timed here):

- forward (serving):
  - ``mixed``: ``fused_lora_linear(..., adapter_ids=ids)``, the 8 adapters stacked;
  - ``single``: the single-adapter fused op on the same rows (adapter 0 for all): the
    target is mixed / single <= 1.05;
  - ``peft_loop``: PEFT's mixed-batch forward in plain MLX: the base product once, then
    per adapter the rows' sub-batch gathered, its rank-r term, scattered back (the
    target: mixed >= 5x faster at decode-like shapes);
  - ``layer_loop``: the naive serving loop: each adapter's rows through their own LoRA
    layer (base product included), as a loop over per-adapter models does.
- forward + backward, dropout 0.1 (the gradients of x and of the stacked adapters):
  - ``mixed``, and ``gather_mm``: the plain-MLX formulation a user would write by hand
    (mask drawn and the dropped x materialized, ``mx.gather_mm`` for each row's A and B;
    autodiff keeps both): the target is mixed faster, with peak memory lower by at least
    the mask and the dropped copy of x.

Times are the best round of each kind (wall clock, the targets' measure) and, beside
them, the best process CPU time (less sensitive to other processes on a busy machine).
Peak memory is MLX's over one call, inputs included. The report prints the markdown
table the README shows and checks the targets (``--write`` keeps the rows and that text
in the results file; ``--check`` exits 1 on a miss).
"""

import os
import sys
import time

import mlx.core as mx

K = N = 2048
R, ADAPTERS, SEQUENCES, P = 16, 8, 8, 0.1
SHAPES = {"decode": 1, "prefill": 256}  # tokens per sequence
CASES = [(pass_name, shape) for pass_name in ("forward", "forward_backward") for shape in SHAPES]
PEERS = {"forward": ("single", "peft_loop", "layer_loop"), "forward_backward": ("gather_mm",)}
ROUNDS = {"decode": 100, "prefill": 15}


def make_inputs(tokens):
    """x (8, tokens, K), W, 8 stacked adapters with their scales, ids per sequence, and
    the cotangent of the output."""
    keys = mx.random.split(mx.random.key(0), 6)
    x = mx.random.normal((SEQUENCES, tokens, K), key=keys[0])
    w = mx.random.normal((N, K), key=keys[1]) / K**0.5
    a = mx.random.normal((ADAPTERS, K, R), key=keys[2]) / K**0.5
    b = mx.random.normal((ADAPTERS, R, N), key=keys[3]) / R**0.5
    scales = mx.array([2.0 * (i + 1) / ADAPTERS for i in range(ADAPTERS)])
    ids = mx.arange(SEQUENCES, dtype=mx.int32) % ADAPTERS
    dy = mx.random.normal((SEQUENCES, tokens, N), key=keys[4])
    mx.eval(x, w, a, b, scales, ids, dy)
    return dict(x=x, w=w, a=a, b=b, scales=scales, ids=ids, dy=dy, key=keys[5])


def forward_kinds(inputs):
    """Zero-argument forwards of each kind (each evaluates its output)."""
    from mlx_fused_lora import fused_lora_linear

    x, w, a, b, scales, ids = (inputs[k] for k in ("x", "w", "a", "b", "scales", "ids"))
    names = [int(i) for i in ids.tolist()]  # an adapter name per sequence, as PEFT takes them
    scale_list = scales.tolist()

    def mixed():
        mx.eval(fused_lora_linear(x, w, None, a, b, scale=scales, adapter_ids=ids))

    def single():
        mx.eval(fused_lora_linear(x, w, None, a[0], b[0], scale=scale_list[0]))

    def peft_loop():
        # peft.tuners.lora.layer.Linear._mixed_batch_forward, in MLX: base once, then per
        # adapter its sub-batch's rank-r term added back at the sub-batch's rows.
        result = x @ w.T
        for adapter in sorted(set(names)):
            rows = mx.array([i for i, name in enumerate(names) if name == adapter])
            lora = ((x[rows] @ a[adapter]) @ b[adapter]) * scale_list[adapter]
            result = result.at[rows].add(lora)
        mx.eval(result)

    def layer_loop():
        result = mx.zeros((*x.shape[:-1], N))
        for adapter in sorted(set(names)):
            rows = mx.array([i for i, name in enumerate(names) if name == adapter])
            sub = x[rows]
            result[rows] = sub @ w.T + ((sub @ a[adapter]) @ b[adapter]) * scale_list[adapter]
        mx.eval(result)

    return dict(mixed=mixed, single=single, peft_loop=peft_loop, layer_loop=layer_loop)


def training_kinds(inputs):
    """Zero-argument forward + backward steps (dropout P): the gradients of x and of the
    stacked adapters, with the loss's value (in a model the forward is needed)."""
    from mlx_fused_lora import fused_lora_linear

    x, w, a, b, scales, ids, dy, key = (inputs[k] for k in ("x", "w", "a", "b", "scales", "ids", "dy", "key"))
    rows = mx.broadcast_to(ids[:, None], x.shape[:-1]).reshape(-1)

    def mixed_loss(x, a, b):
        return (fused_lora_linear(x, w, None, a, b, scale=scales, dropout=P, key=key, adapter_ids=ids) * dy).sum()

    def gather_mm_loss(x, a, b):
        keep = mx.random.bernoulli(1 - P, x.shape, key=key)
        dropped = (keep * x) * (1 / (1 - P))
        flat = dropped.reshape(-1, 1, K)
        h = mx.gather_mm(flat, a, rhs_indices=rows)
        lora = mx.gather_mm(h, b, rhs_indices=rows).reshape(dy.shape)
        y = x @ w.T + scales[ids][:, None, None] * lora
        return (y * dy).sum()

    steps = {}
    for name, loss in (("mixed", mixed_loss), ("gather_mm", gather_mm_loss)):
        grad = mx.value_and_grad(loss, argnums=(0, 1, 2))
        steps[name] = lambda grad=grad: mx.eval(grad(x, a, b))
    return steps


def peak_of(step):
    """The peak memory MLX held during one step, inputs included."""
    from mlx_fused_lora.bench.timing import timed_call

    return timed_call(step)[1]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", CASES, ids=[f"{p}-{s}" for p, s in CASES])


def test_mixed_lora(benchmark, case):
    """pytest-benchmark times the mixed op; its peers run in each round's setup, timed
    here, so all kinds alternate round by round."""
    from mlx_fused_lora.fast_blas import active_blas

    pass_name, shape = case
    load_average = os.getloadavg()
    inputs = make_inputs(SHAPES[shape])
    kinds = (forward_kinds if pass_name == "forward" else training_kinds)(inputs)
    kinds = {k: kinds[k] for k in ("mixed", *PEERS[pass_name])}
    for step in kinds.values():  # warm-up
        step()
    peaks = {name: peak_of(step) for name, step in kinds.items()}
    # Wall time (pytest-benchmark's, and here for the peers) and process CPU time, which a
    # busy machine inflates far less (it does not count the time this process waits).
    times = {name: [] for name in PEERS[pass_name]}
    cpu_times = {name: [] for name in kinds}

    def timed(name):
        def run():
            start, cpu_start = time.perf_counter(), time.process_time()
            kinds[name]()
            cpu_times[name].append(time.process_time() - cpu_start)
            if name in times:
                times[name].append(time.perf_counter() - start)

        return run

    # The peers run in a rotated order each round, so each of them in turn runs right
    # before the timed kind: with a fixed order the mixed op always followed the heaviest
    # peer (the per-adapter layer loop) and the single op always followed the mixed op,
    # which cost the mixed side 10-15 % in wall time and nearly doubled its CPU time at
    # decode (the same two calls timed alone: within 2 % of each other).
    order = list(times)

    def run_peers():
        for name in order:
            timed(name)()
        order.append(order.pop(0))

    benchmark.group = f"mixed {pass_name} {shape}"
    benchmark.pedantic(timed("mixed"), setup=run_peers, rounds=ROUNDS[shape], warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(
        pass_name=pass_name,
        shape=shape,
        rows=SEQUENCES * SHAPES[shape],
        k=K,
        n=N,
        r=R,
        adapters=ADAPTERS,
        dropout=P if pass_name == "forward_backward" else 0.0,
        peaks=peaks,
        peer_times_s=times,
        peer_min_s={name: min(t) for name, t in times.items()},
        cpu_min_s={name: min(t) for name, t in cpu_times.items()},
        blas=active_blas(),
        load_average=[load_average, os.getloadavg()],  # (1, 5, 15 min) at the start and the end
    )


# -- the report: python benchmarks/bench_mixed_lora.py RESULTS.json [--write] [--check] --


def ratio_rows(path):
    """One row per (pass, shape) from a pytest-benchmark JSON file of these cases."""
    from mlx_fused_lora.bench.results import benchmark_cases

    rows = []
    for mixed_s, info in benchmark_cases(path):
        row = dict(
            pass_name=info["pass_name"],
            shape=info["shape"],
            rows=info["rows"],
            mixed_s=mixed_s,
            peak_mib={name: peak / 2**20 for name, peak in info["peaks"].items()},
            blas=info["blas"],
            load_average=info["load_average"],
        )
        cpu = info["cpu_min_s"]
        for name, peer_s in info["peer_min_s"].items():
            row[f"{name}_s"] = peer_s
            row[f"{name}_over_mixed"] = peer_s / mixed_s
            row[f"{name}_over_mixed_cpu"] = cpu[name] / cpu["mixed"]
        if "single" in cpu:  # the target's direction: mixed / single
            row.update(mixed_over_single=mixed_s / row["single_s"], mixed_over_single_cpu=cpu["mixed"] / cpu["single"])
        rows.append(row)
    return rows


def report(rows):
    """(markdown lines, target misses) for `ratio_rows`."""
    from mlx_fused_lora.bench.results import FASTER

    lines = [
        f"{K} x {N} layer, r = {R}, {ADAPTERS} adapters, float32; BLAS: {rows[0]['blas']}",
        "",
        "| pass | shape (rows) | mixed s | peer | peer s | peer / mixed | CPU time: peer / mixed | peak MiB mixed · peer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    misses = []
    by_case = {(row["pass_name"], row["shape"]): row for row in rows}
    for pass_name, shape in CASES:
        row = by_case.get((pass_name, shape))
        if row is None:
            misses.append(f"{pass_name} {shape}: not measured")
            continue
        for peer in PEERS[pass_name]:
            lines.append(
                f"| {pass_name} | {shape} ({row['rows']}) | {row['mixed_s']:.4f} | {peer} | {row[peer + '_s']:.4f} "
                f"| {row[peer + '_over_mixed']:.2f}× | {row[peer + '_over_mixed_cpu']:.2f}× "
                f"| {row['peak_mib']['mixed']:.1f} · {row['peak_mib'][peer]:.1f} |"
            )
        if pass_name == "forward":
            if row["mixed_over_single"] > 1.05:
                misses.append(f"forward {shape}: mixed / single {row['mixed_over_single']:.2f}x > 1.05x")
            if shape == "decode" and row["peft_loop_over_mixed"] < 5:
                misses.append(f"forward decode: PEFT's loop / mixed {row['peft_loop_over_mixed']:.2f}x < 5x")
        else:
            kept_mib = row["rows"] * K * (1 + 4) / 2**20  # the bool mask and the dropped float32 x
            saved = row["peak_mib"]["gather_mm"] - row["peak_mib"]["mixed"]
            if row["gather_mm_over_mixed"] < FASTER:
                misses.append(f"fwd+bwd {shape}: gather_mm / mixed {row['gather_mm_over_mixed']:.2f}x < {FASTER}x")
            if saved < kept_mib:
                misses.append(f"fwd+bwd {shape}: peak saved {saved:.1f} MiB < mask + dropped x {kept_mib:.1f} MiB")
    loads = [row["load_average"][when][0] for row in rows for when in (0, 1)]
    lines += ["", f"load average (1 min) {min(loads):.1f} to {max(loads):.1f} while the cases ran"]
    lines += [f"TARGET MISSED: {miss}" for miss in misses] or ["all targets met"]
    return lines, misses


if __name__ == "__main__":
    from mlx_fused_lora.bench.results import report_benchmark_file

    sys.exit(report_benchmark_file(sys.argv[1:], ratio_rows, report))
