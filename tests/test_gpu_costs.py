"""The GPU op's counted-cost model (ops/gpu/costs.py): its byte and FLOP counts, its
choices, and the README's estimates file it writes."""

import json
from pathlib import Path

import pytest
from mlx_fused_lora.ops.gpu import costs, geometry

ESTIMATES = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "gpu_estimates.json"
TOY = costs.Device("toy", bandwidth=100.0, gemm={2: 1000.0, 4: 500.0}, simt=10.0, integer=5.0, launch=0.5)


def test_a_gemm_counts_its_three_arrays_and_two_flops_per_fma():
    p = costs.gemm("g", 2, 3, 4, 2)  # (2, 3) @ (3, 4) of 16-bit elements
    assert p.bytes == (2 * 3 + 3 * 4 + 2 * 4) * 2 and p.flops == 2 * 2 * 3 * 4 and p.engine == "gemm"


def test_a_pass_takes_the_slower_of_memory_and_compute_plus_its_launches():
    memory_bound = costs.Pass("m", bytes=1000.0, flops=10.0, engine="simt", launches=2)
    assert memory_bound.seconds(TOY, 2) == 1000 / 100 + 2 * 0.5
    compute_bound = costs.Pass("c", bytes=10.0, flops=100.0, engine="simt", int_ops=50.0)
    assert compute_bound.seconds(TOY, 2) == 100 / 10 + 50 / 5 + 0.5  # hash not overlapped
    assert costs.Pass("g", 10.0, 4000.0, "gemm").seconds(TOY, 4) == 4000 / 500 + 0.5


def test_low_rank_grad_reads_dy_once_against_the_gemms_twice():
    m, n, r, s = 4096, 4096, 16, 2
    options = costs.low_rank_grad_options(m, n, r, s)
    template, grid, _ = geometry.low_rank_grad(m, n, r, s)
    blocks = n // geometry.column_tile("low_rank_grad", template)
    partials = (2 * blocks + 1) * m * r * 4 + (2 * grid[1] + 1) * r * n * 4
    (kernel,) = options["kernel"]
    assert kernel.bytes == m * n * s + (m * r + r * n) * 4 + partials
    assert kernel.flops == 4 * m * n * r and kernel.engine == "simt"
    gemm_bytes = sum(p.bytes for p in options["gemm"])
    assert 2 * m * n * s < gemm_bytes < 2.1 * m * n * s  # dY twice, the rank-r operands and casts
    assert "kernel" not in costs.low_rank_grad_options(m, n, geometry.MAX_LOW_RANK + 1, s)


def test_the_masked_kernels_hash_once_where_the_gemm_paths_hash_per_masked_copy():
    m, k, r, s = 1024, 2048, 16, 2
    (down_proj,) = costs.down_proj_options(m, k, r, s)["kernel"]
    (down_grad,) = costs.down_grad_options(m, k, r, s)["kernel"]
    assert down_proj.int_ops == down_grad.int_ops == costs.HASH_OPS * m * k
    assert sum(p.int_ops for p in costs.down_grad_options(m, k, r, s)["gemm"]) == 2 * costs.HASH_OPS * m * k
    # down_grad moves x and e once, its partials at most half of x more; the GEMM path
    # writes and reads a dropped copy and a masked e besides
    gemm_bytes = sum(p.bytes for p in costs.down_grad_options(m, k, r, s)["gemm"])
    assert 2 * m * k * s < down_grad.bytes < 2.6 * m * k * s and gemm_bytes > 6 * m * k * s


def test_the_gemms_must_win_by_the_margin():
    slow, fast = [costs.Pass("k", 1000.0, 0.0, "simt", 0)], [costs.Pass("g", 950.0, 0.0, "gemm", 0)]
    assert costs.cheaper({"kernel": slow, "gemm": fast}, TOY, 2) == "kernel"  # 5 % is noise
    assert costs.cheaper({"kernel": slow, "gemm": [fast[0]._replace(bytes=800.0)]}, TOY, 2) == "gemm"
    assert costs.cheaper({"gemm": fast}, TOY, 2) == "gemm"


@pytest.mark.parametrize("device", [costs.H100, costs.M3_MAX], ids=lambda d: d.name)
def test_the_plan_takes_the_kernels_at_small_r_and_the_gemms_past_them(device):
    m = k = n = 4096
    assert costs.plan(device, m, k, n, 8, 2, True) == {"ds_db": "kernel", "h": "kernel", "da_e": "kernel", "up": "gemm"}
    assert costs.plan(device, m, k, n, 8, 2, False) == {"ds_db": "kernel", "h": "gemm", "da_e": "gemm", "up": "gemm"}
    past = dict.fromkeys(["ds_db", "h", "da_e", "up"], "gemm")
    assert costs.plan(device, m, k, n, geometry.MAX_RANK + 1, 2, True) == past
    # CUDA cores against tensor cores: the H100 leaves the kernels sooner than an M3 Max
    first_gemm = {}
    for r in range(1, geometry.MAX_RANK + 1):
        for key, choice in costs.plan(device, m, k, n, r, 2, True).items():
            if choice == "gemm" and key != "up":
                first_gemm.setdefault(key, r)
    assert first_gemm["ds_db"] <= geometry.MAX_LOW_RANK + 1
    if device is costs.H100:
        assert first_gemm["h"] < 64 and first_gemm["da_e"] <= 64


def test_the_committed_estimates_are_the_model_s():
    """benchmarks/results/gpu_estimates.json (the README's figures) is what estimates()
    gives now; rewrite it with:
    python -c "import json; from mlx_fused_lora.ops.gpu import costs; print(json.dumps(costs.estimates(), indent=1))" > benchmarks/results/gpu_estimates.json
    """
    assert json.loads(ESTIMATES.read_text()) == json.loads(json.dumps(costs.estimates()))
    for case in costs.estimates()["cases"]:
        assert case["training_ratio"] > case["forward_ratio"] > 1
