"""The fused LoRA linear op against plain MLX and against the GEMM limit, in one run.

    pytest benchmarks/ --benchmark-only

Each case records its best time (pytest-benchmark's min) and, in extra_info, the
peak memory MLX held while it ran; conftest.py prints the ratios and targets at
the end of the run. Shapes: fp32, M = 2048, K = N = 2048, r = 16, p in {0, 0.1}.
"""

import mlx.core as mx
import pytest

from mlx_fused_lora.benchmarking import cases, make_inputs, peak_memory

SHAPE = dict(m=2048, k=2048, n=2048, r=16)
# The plain layer runs on MLX's bundled reference BLAS on Linux: seconds per call.
ROUNDS = {"fused": 10, "limit": 10, "plain": 3}


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(**SHAPE, dtype=mx.float32)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["limit", "fused", "plain"])
@pytest.mark.parametrize("pass_name", ["forward", "forward_backward"])
def test_lora_linear(benchmark, inputs, pass_name, kind, p):
    fn = cases(inputs, dropout=p)[kind][pass_name]
    benchmark.group = f"{pass_name} p={p}"
    benchmark.extra_info.update(
        kind=kind, pass_name=pass_name, dropout=p, dtype="float32",
        device=str(mx.default_device()), peak_memory=peak_memory(fn), **SHAPE,
    )
    benchmark.pedantic(fn, rounds=ROUNDS[kind], warmup_rounds=1, iterations=1)
