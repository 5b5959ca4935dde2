"""The GPU backend's mixed-adapter op (every row on its adapter), with the kernels run on
PoCL standing in for MLX's launcher: against reference.py through fused_lora_linear, every
plan the op may take, the single-adapter op as its n = 1 case (bit for bit), ids out of
range (NaN rows, never a read out of bounds), the first-use check and its fallback."""

import warnings

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("pyopencl", reason='needs pip install "pyopencl[pocl]" (the test extra)')

from mlx_fused_lora import fused_lora_linear  # noqa: E402
from mlx_fused_lora.ops import backends, layout, reference  # noqa: E402
from mlx_fused_lora.ops.backends import cpu, gpu  # noqa: E402
from mlx_fused_lora.ops.backends import reference as lean  # noqa: E402
from mlx_fused_lora.ops.gpu import Kernels, costs, opencl, self_check  # noqa: E402

TOL = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 2e-2}


def opencl_backend(launcher=None):
    return gpu.GPUBackend(Kernels(launcher or opencl.OpenCLLauncher()), "PoCL")


def make(dtype, r, shape, n, count, seed=0):
    """x, W, bias, `count` stacked adapters (any of them distinct), a cotangent."""
    rng = np.random.default_rng(seed)

    def arr(s, scale=1.0):
        return mx.array((scale * rng.standard_normal(s)).astype(np.float32))

    k = shape[-1]
    x, w, b = arr(shape).astype(dtype), arr((n, k), 0.1).astype(dtype), arr((n,)).astype(dtype)
    return x, w, b, arr((count, k, r), 0.1), arr((count, r, n), 0.5), arr((*shape[:-1], n))


def rel_err(got, want):
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    return np.abs(got - want).max(initial=0) / max(1.0, np.abs(want).max(initial=0))


# (dtype, r, p, bias, x shape, ids): adapter 3 of 4 unused everywhere
CASES = [
    # rows on the base alone, a long run, scattered rows: several tiles and splits
    (mx.float32, 16, 0.1, True, (150, 148), np.r_[[-1] * 4, [1] * 90, np.arange(56) % 4 - 1].clip(-1, 2)),
    # 3-D x with an id per sequence, a rank tail
    (mx.bfloat16, 17, 0.0, False, (3, 13, 150), np.array([2, -1, 0])),
    # rank 1, rows of 150 elements (element-wise accesses)
    (mx.float16, 1, 0.3, True, (37, 150), np.arange(37) % 3 - 1),
    # r > 32: dS and dB by MLX's GEMMs, h and dA, e by the kernels
    (mx.bfloat16, 40, 0.1, True, (40, 68), np.arange(40) // 14),
]


@pytest.mark.parametrize(
    "dtype,r,p,with_bias,shape,id_list", CASES, ids=["f32-runs", "bf16-per-sequence", "f16-r1", "bf16-r40"]
)
def test_gpu_mixed_op_matches_reference(monkeypatch, dtype, r, p, with_bias, shape, id_list):
    """fused_lora_linear with adapter_ids, on the PoCL-run GPU backend: forward and every
    gradient (the scales' too) against reference.py with the CPU's mask; its first-use
    check passes (no warning)."""
    backend = opencl_backend()
    monkeypatch.setattr(backends, "current", lambda: backend)
    x, w, b, a, bb, ct = make(dtype, r, shape, 70, 4)
    b = b if with_bias else None
    ids = mx.array(id_list.astype(np.int32))
    scales = mx.array([1.7, -0.6, 2.5, 1.1])
    key = mx.random.key(3)
    mask = cpu.dropout_mask(key, x.shape, p, mx.float32) if p > 0 else None

    def fused(x, a, bb, scales):
        return fused_lora_linear(x, w, b, a, bb, scale=scales, dropout=p, key=key, adapter_ids=ids)

    def plain(x, a, bb, scales):
        per_row = mx.broadcast_to(ids.reshape(*ids.shape, *[1] * (x.ndim - 1 - ids.ndim)), x.shape[:-1])
        return reference.lora_linear(x, w, b, a, bb, scales, mask, per_row)

    primals, cts = [x, a, bb, scales], [ct.astype(dtype)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the self-check passes: no fallback warning
        got = mx.vjp(fused, primals, cts)
    want = mx.vjp(plain, primals, cts)
    assert backend.checked == {(dtype, r, p > 0, True): None}
    for g, wv in zip([*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        assert g.dtype == wv.dtype and g.shape == wv.shape
        assert rel_err(g, wv) < TOL[dtype]
    assert not np.array(got[1][1][3]).any() and not np.array(got[1][2][3]).any()  # unused


def plan_op(plan, p):
    return gpu.gpu_op(Kernels(opencl.OpenCLLauncher()), 1.0, p, costs.H100, plan)


@pytest.mark.parametrize("plan", self_check.plans(16, True, mixed=True), ids=lambda p: "-".join(p.values()))
def test_every_plan_gives_nan_rows_for_ids_out_of_range_and_reads_nothing_out_of_bounds(plan):
    """Ids outside [-1, n) (here 4 and -5 with n = 4): those rows of y are NaN, every other
    row is the reference's (the bad rows as base-only rows), and no gradient sees them:
    the adapters' and x's other rows equal the reference's, the bad rows of dX the base's."""
    x, w, b, a, bb, ct = make(mx.float32, 16, (40, 68), 36, 4, seed=2)
    good = np.arange(40) % 5 - 1
    bad = good.copy()
    bad[[3, 17]] = [4, -5]
    key, scales = mx.random.key(8), mx.array([1.0, 2.0, -1.0, 0.5])
    mask = cpu.dropout_mask(key, x.shape, 0.2, mx.float32)
    slots = layout.mixed_op_inputs(x, w, b, a, bb, key, 0.2, scales, mx.array(bad.astype(np.int32)))
    op = plan_op(plan, 0.2)
    y, grads = mx.vjp(lambda x, a, bb: op(x, w, b, a, bb, *slots[5:])[0], [x, a, bb], [ct])
    base_ids = mx.array(np.where((bad >= -1) & (bad < 4), bad, -1).astype(np.int32))
    want, want_grads = mx.vjp(lambda x, a, bb: reference.lora_linear(x, w, b, a, bb, scales, mask, base_ids), [x, a, bb], [ct])  # fmt: skip
    y, want = np.array(y[0]), np.array(want[0])
    assert np.isnan(y[[3, 17]]).all()
    rows = np.setdiff1d(np.arange(40), [3, 17])
    assert np.abs(y[rows] - want[rows]).max() < 1e-4
    for g, wv in zip(grads, want_grads, strict=True):
        assert np.isfinite(np.array(g)).all() and rel_err(g, wv) < 1e-4


@pytest.mark.parametrize("plan", self_check.plans(16, True, mixed=True)[:2], ids=["kernels", "gemms"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_one_adapter_every_row_on_it_is_the_single_adapter_op_bit_for_bit(plan, dtype):
    """The mixed slots with n = 1 and every id 0 give the single-adapter op's bits,
    forward and gradients (x, A, B): one op, the single-adapter op its n = 1 case."""
    x, w, b, a, bb, ct = make(dtype, 16, (150, 148), 70, 1)
    key, ids = mx.random.key(5), mx.zeros((150,), dtype=mx.int32)
    kernels = Kernels(opencl.OpenCLLauncher())
    single_op, mixed_op = (gpu.gpu_op(kernels, scale, 0.1, costs.H100, plan) for scale in (1.7, 1.0))
    got_single = mx.vjp(lambda x, a2, b2: single_op(x, w, b, a2, b2, key)[0], [x, a[0], bb[0]], [ct.astype(dtype)])
    got_mixed = mx.vjp(lambda x, a3, b3: mixed_op(x, w, b, a3, b3, key, mx.array([1.7]), ids)[0], [x, a, bb], [ct.astype(dtype)])  # fmt: skip
    for one, other in zip([*got_single[0], *got_single[1]], [*got_mixed[0], *got_mixed[1]], strict=True):
        assert np.array_equal(opencl.to_numpy(one), opencl.to_numpy(other).reshape(one.shape))


def test_an_empty_batch_and_the_lean_path():
    """M = 0 runs the lean formulation: an empty y, zero gradients for every adapter."""
    backend = opencl_backend()
    x, w, b, a, bb, _ = make(mx.float32, 4, (0, 16), 8, 3)
    slots = layout.mixed_op_inputs(x, w, b, a, bb, None, 0.0, mx.ones((3,)), mx.zeros((0,), dtype=mx.int32))
    y = backend.lora_linear(slots, 1.0, 0.0)
    assert y.shape == (0, 8)
    ga = mx.grad(lambda a: backend.lora_linear(slots._replace(lora_a=a), 1.0, 0.0).sum())(a)
    assert ga.shape == a.shape and not np.array(ga).any()


class FaultyLauncher(opencl.OpenCLLauncher):
    """Runs the kernels on PoCL, breaking the mixed launches (MIXED = 1) of one."""

    def __init__(self, broken):
        super().__init__()
        self.broken = broken

    def launch(self, name, inputs, outputs, template, element_dtype, grid, threadgroup):
        results = super().launch(name, inputs, outputs, template, element_dtype, grid, threadgroup)
        if name == self.broken and template.get("MIXED"):
            results[-1] = results[-1] + 1
        return results


def test_a_faulty_mixed_kernel_falls_back_for_mixed_batches_only():
    """A kernel wrong only in its mixed variant: the mixed op's first-use check fails (one
    warning, the lean fallback from then on), the single-adapter op keeps the kernels."""
    backend = opencl_backend(FaultyLauncher("down_grad"))
    x, w, b, a, bb, _ = make(mx.float32, 16, (21, 68), 36, 3)
    key = mx.random.key(4)
    ids = mx.array((np.arange(21) % 4 - 1).astype(np.int32))
    slots = layout.mixed_op_inputs(x, w, b, a, bb, key, 0.1, mx.ones((3,)), ids)
    with pytest.warns(UserWarning, match="mixed adapters: dx differs from reference.py") as record:
        y = backend.lora_linear(slots, 1.0, 0.1)
    assert len(record) == 1 and "lean plain-MLX formulation" in str(record[0].message)
    assert np.array_equal(np.array(y), np.array(lean.lean_lora_linear(slots, 1.0, 0.1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.lora_linear(layout.op_inputs(x, w, b, a[0], bb[0], key, 0.1), 1.0, 0.1)
    assert backend.checked[(mx.float32, 16, True, False)] is None
