"""The fused LoRA linear op against the plain-MLX peers and the GEMM limit.

    pytest benchmarks/ --benchmark-only            # the issue's full grid (long on a CPU: see README)
    pytest benchmarks/ --benchmark-only --quick    # a few cases, under two minutes on 2 CPU cores

The grid, the cases and the ratios are those of ``mlx_fused_lora.bench``,
which ``mlx-fused-lora bench`` runs too; this is the pytest-benchmark runner of
the same cases. Each test is one kind on one group (shape, dtype, p, pass) and
records its best round (pytest-benchmark's min) and, in extra_info, the peak memory
MLX held; conftest.py prints the ratio table and checks the targets at the end.
Unlike the CLI, pytest runs each case's rounds back to back, not interleaved.
"""

import mlx.core as mx
from mlx_fused_lora.bench import e2e, grid, peft_peer, timing
from mlx_fused_lora.bench.cases import cases, make_inputs
from mlx_fused_lora.layers import FusedLoRALinear, plain_layer_class

BUDGET_S, MAX_ROUNDS = 2.0, 10
_inputs_cache = {}


def pytest_generate_tests(metafunc):
    quick = metafunc.config.getoption("--quick")
    if "group" in metafunc.fixturenames:
        shapes = grid.quick_shapes() if quick else grid.full_shapes()
        extra = peft_peer.PEFT_KINDS if peft_peer.available() else ()
        groups = grid.grid(
            shapes, grid.device_dtypes(), peer_max_gflop=grid.default_peer_max_gflop(), extra_kinds=extra
        )
        params = [(g, kind) for g in groups for kind in g.kinds]
        ids = [f"{g.shape.label.replace(' ', '-')}-{g.dtype}-p{g.dropout}-{g.pass_name}-{kind}" for g, kind in params]
        metafunc.parametrize("group,kind", params, ids=ids)
    if "e2e_kind" in metafunc.fixturenames:
        metafunc.parametrize("e2e_kind", ["fused", "plain"])


def _inputs(group):
    key = (group.shape, group.dtype)
    if key not in _inputs_cache:
        _inputs_cache.clear()  # one shape's arrays at a time
        s = group.shape
        _inputs_cache[key] = make_inputs(s.m, s.k, s.n, s.r, group.dtype)
    return _inputs_cache[key]


def _run(benchmark, fn, kind):
    timing.timed_call(fn)  # warm-up
    seconds, peak = timing.timed_call(fn)
    rounds = timing.rounds_for(seconds, BUDGET_S, MAX_ROUNDS, timing.MIN_ROUNDS.get(kind, 1))
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
    return peak


def test_lora_linear(benchmark, group, kind):
    fn = cases(_inputs(group), group.dropout, kinds=(kind,))[kind][group.pass_name]
    s = group.shape
    benchmark.group = f"{s.label} {group.dtype} p={group.dropout} {group.pass_name}"
    peak = _run(benchmark, fn, kind)
    benchmark.extra_info.update(
        m=s.m,
        k=s.k,
        n=s.n,
        r=s.r,
        dtype=group.dtype,
        dropout=group.dropout,
        pass_name=group.pass_name,
        kind=kind,
        peak_memory=None if kind in timing.FOREIGN_KINDS else peak,
        device=str(mx.default_device()),
    )


def test_end_to_end_training_step(benchmark, e2e_kind, request):
    config = e2e.E2E_QUICK if request.config.getoption("--quick") else e2e.E2E_FULL
    layer_cls = FusedLoRALinear if e2e_kind == "fused" else plain_layer_class()
    benchmark.group = "end-to-end training step"
    peak = _run(benchmark, e2e.training_step(config, layer_cls), e2e_kind)
    benchmark.extra_info.update(e2e_kind=e2e_kind, tokens=config.tokens, peak_memory=peak, config=dict(config.__dict__))
