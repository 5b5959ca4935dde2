"""The PyTorch + PEFT peer: the same function and gradients as the MLX layers, and its place in `bench`.

The peer's own tests skip where torch or peft is missing (the `peft` extra); the last
test, that the bench leaves it out then, runs everywhere.
"""

import contextlib
import io
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_fused_lora.bench import cli, peft_peer
from mlx_fused_lora.bench.cases import layer_from_inputs, make_inputs
from mlx_fused_lora.layers import PlainLoRALinear

needs_peft = pytest.mark.skipif(not peft_peer.available(), reason="needs torch and peft (pip install '.[peft]')")
TINY = ["--shapes", "32x64x48x4", "--budget", "0.001", "--rounds", "1", "--no-e2e", "--no-chart"]


def _mlx_outputs(inputs, dropout=0.0):
    layer = layer_from_inputs(PlainLoRALinear, inputs, dropout)

    def apply(x, a, b):
        layer.lora_a, layer.lora_b = a, b
        return layer(x)

    (y,), grads = mx.vjp(apply, [inputs["x"], inputs["lora_a"], inputs["lora_b"]], [inputs["cotangent"]])
    return [np.array(v) for v in (y, *grads)]


@needs_peft
def test_peft_layer_computes_the_same_output_and_gradients():
    import torch

    inputs = make_inputs(24, 40, 32, 4)
    cases = peft_peer.peft_cases(inputs, dropout=0.0, scale=2.0)
    y = cases["peft"]["forward"]()
    dx, d_lora_a, d_lora_b = cases["peft"]["forward_backward"]()
    y_mlx, dx_mlx, da_mlx, db_mlx = _mlx_outputs(inputs)
    np.testing.assert_allclose(y.numpy(), y_mlx, atol=1e-5)
    np.testing.assert_allclose(dx.numpy(), dx_mlx, atol=1e-5)
    # PEFT's lora_A.weight is (r, in) and lora_B.weight (out, r): mlx-lm's lora_a, lora_b transposed.
    np.testing.assert_allclose(d_lora_a.numpy().T, da_mlx, atol=1e-5)
    np.testing.assert_allclose(d_lora_b.numpy().T, db_mlx, atol=1e-5)
    assert not y.requires_grad  # the forward case builds no autograd graph, as MLX's does not
    layer, _ = peft_peer.peft_lora_linear(inputs, 0.0, 2.0)
    assert not layer.base_layer.weight.requires_grad and layer.training
    assert layer.scaling["default"] == pytest.approx(2.0)
    assert all(g.dtype == torch.float32 for g in (dx, d_lora_a, d_lora_b))


@needs_peft
def test_peft_dropout_drops_x_on_the_lora_path_only():
    inputs = make_inputs(256, 64, 16, 4)
    inputs["weight"] = mx.zeros_like(inputs["weight"])  # only the LoRA path is left
    kept = peft_peer.peft_cases(inputs, dropout=0.0, scale=1.0)["peft"]["forward"]().numpy()
    dropped = peft_peer.peft_cases(inputs, dropout=0.5, scale=1.0)["peft"]["forward"]().numpy()
    assert not np.allclose(kept, dropped)
    # Inverted dropout keeps the expectation: the means agree to sampling noise.
    assert abs(dropped.mean() - kept.mean()) < 0.1 * np.abs(kept).mean() + 0.05


@needs_peft
def test_peft_limit_is_torchs_two_gemms():
    inputs = make_inputs(16, 24, 20, 4)
    base, input_grad = peft_peer.peft_cases(inputs, 0.0, 2.0)["peft_limit"]["forward_backward"]()
    x, w, ct = (np.array(inputs[name]) for name in ("x", "weight", "cotangent"))
    np.testing.assert_allclose(base.numpy(), x @ w.T, atol=1e-5)
    np.testing.assert_allclose(input_grad.numpy(), ct @ w, atol=1e-5)


def _run(argv, tmp_path):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(argv + ["--out", str(tmp_path), "--name", "run"]) == 0
    return json.loads((tmp_path / "run.json").read_text()), printed.getvalue()


@needs_peft
def test_bench_measures_peft_beside_the_mlx_kinds(tmp_path):
    report, printed = _run(TINY + ["--passes", "forward_backward", "--dropouts", "0.1"], tmp_path)
    kinds = {case["kind"]: case for case in report["cases"]}
    assert {"peft", "peft_limit", "fused", "plain", "limit"} <= kinds.keys()
    assert kinds["peft"]["time_s"] > 0 and kinds["peft_limit"]["time_s"] > 0
    assert kinds["peft"]["peak_memory"] is None  # not measured, not MLX's number for it
    (row,) = report["ratios"]
    assert row["peft_over_fused"] == pytest.approx(kinds["peft"]["time_s"] / kinds["fused"]["time_s"])
    assert row["peft_over_peft_limit"] == pytest.approx(kinds["peft"]["time_s"] / kinds["peft_limit"]["time_s"])
    assert "peft" not in row["memory_mib"]
    assert report["blas"]["peft"].startswith("torch ")
    assert report["settings"]["peft"]["torch"] and report["settings"]["peft"]["peft"]
    assert {"peft", "peft_limit"} <= report["kinds"].keys()
    assert "peft/f" in printed and "PEFT torch" in printed


def test_without_torch_or_peft_the_bench_leaves_the_peer_out(tmp_path, monkeypatch):
    monkeypatch.setattr(peft_peer, "available", lambda: False)
    report, printed = _run(TINY + ["--passes", "forward", "--dropouts", "0"], tmp_path)
    assert {case["kind"] for case in report["cases"]} == {"fused", "plain", "plain_compiled", "plain_addmm", "limit"}
    assert "peft" not in report["blas"] and report["settings"]["peft"] is None
    assert "peft/f" not in printed


@needs_peft
def test_torch_is_imported_with_its_openmp_threads_sleeping_when_idle():
    # A subprocess: the first import of torch decides, and this process may have imported it.
    import subprocess
    import sys

    code = "import os; from mlx_fused_lora.bench import peft_peer; peft_peer.import_torch(); print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "PASSIVE"
