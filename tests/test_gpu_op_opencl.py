"""The GPU backend's whole op (forward and every gradient), with the kernels run on PoCL
standing in for MLX's launcher, against reference.py; its self-check and fallback; and
the switch that puts a GPU device on the kernels by default."""

import warnings

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("pyopencl", reason='needs pip install "pyopencl[pocl]" (the test extra)')

from mlx_fused_lora import fused_lora_linear  # noqa: E402
from mlx_fused_lora.ops import backends, layout, reference  # noqa: E402
from mlx_fused_lora.ops.backends import cpu, gpu  # noqa: E402
from mlx_fused_lora.ops.gpu import Kernels, opencl  # noqa: E402

TOL = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 2e-2}


def opencl_backend(launcher=None):
    return gpu.GPUBackend(Kernels(launcher or opencl.OpenCLLauncher()), "PoCL")


def make(dtype, r, m=(3, 13), k=150, n=70, seed=0):
    rng = np.random.default_rng(seed)

    def arr(shape, scale=1.0):
        return mx.array((scale * rng.standard_normal(shape)).astype(np.float32))

    x, w, b = arr((*m, k)).astype(dtype), arr((n, k), 0.1).astype(dtype), arr((n,)).astype(dtype)
    return x, w, b, arr((k, r), 0.1), arr((r, n), 0.5), arr((*m, n))


def rel_err(got, want):
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    return np.abs(got - want).max() / max(1.0, np.abs(want).max())


@pytest.mark.parametrize(
    "dtype,r,p,with_bias,k,n",
    [
        (mx.float32, 16, 0.0, True, 150, 70),
        (mx.float32, 16, 0.1, False, 148, 68),  # rows of a multiple of 4: 4-wide accesses
        (mx.float32, 64, 0.5, True, 150, 70),  # dS, dB by two GEMMs (the kernel's partials cost more)
        (mx.float32, 1, 0.1, True, 148, 68),
        (mx.float16, 16, 0.5, True, 148, 68),
        (mx.bfloat16, 16, 0.1, True, 150, 70),
        (mx.bfloat16, 16, 0.0, False, 148, 68),
    ],
    ids=str,
)
def test_gpu_op_matches_reference(monkeypatch, dtype, r, p, with_bias, k, n):
    """fused_lora_linear itself, with backends.current() giving the PoCL-run GPU backend."""
    backend = opencl_backend()
    monkeypatch.setattr(backends, "current", lambda: backend)
    x, w, b, a, bb, ct = make(dtype, r, k=k, n=n)
    b = b if with_bias else None
    key = mx.random.key(3)
    mask = cpu.dropout_mask(key, (x.size // x.shape[-1], x.shape[-1]), p, mx.float32) if p > 0 else None

    def fused(x, w, b, a, bb):
        return fused_lora_linear(x, w, b, a, bb, scale=1.7, dropout=p, key=key)

    def plain(x, w, b, a, bb):
        y = reference.lora_linear(x.reshape(-1, x.shape[-1]), w, b, a, bb, 1.7, mask)
        return y.reshape(*x.shape[:-1], w.shape[0])

    primals = [x, w, b, a, bb] if with_bias else [x, w, a, bb]

    def call(f):
        return (lambda x, w, b, a, bb: f(x, w, b, a, bb)) if with_bias else (lambda x, w, a, bb: f(x, w, None, a, bb))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the self-check passes: no fallback warning
        got = mx.vjp(call(fused), primals, [ct.astype(dtype)])
    want = mx.vjp(call(plain), primals, [ct.astype(dtype)])
    assert backend.checked == {(dtype, r, p > 0): None}
    for g, wv in zip([*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        assert g.dtype == wv.dtype and g.shape == wv.shape
        assert rel_err(g, wv) < TOL[dtype]


def test_gpu_op_is_bitwise_deterministic():
    backend = opencl_backend()
    x, w, b, a, bb, ct = make(mx.bfloat16, 16, m=(29,))
    key = mx.random.key(9)
    inputs = layout.op_inputs(x, w, b, a, bb, key, 0.1)

    def run():
        y, grads = mx.vjp(lambda *s: backend.lora_linear(layout.Inputs(*s), 1.7, 0.1), list(inputs), [ct])
        return [np.array(t.astype(mx.float32)) for t in [*y, *grads]]

    for first, second in zip(run(), run(), strict=True):
        assert np.array_equal(first.view(np.uint32), second.view(np.uint32))


class FaultyLauncher(opencl.OpenCLLauncher):
    """Runs the kernels on PoCL, then breaks one: adds 1 to an output, or raises."""

    def __init__(self, broken, how="add"):
        super().__init__()
        self.broken, self.how = broken, how

    def launch(self, name, inputs, outputs, template, element_dtype, grid, threadgroup):
        if name == self.broken and self.how == "raise":
            raise RuntimeError("kernel exploded")
        results = super().launch(name, inputs, outputs, template, element_dtype, grid, threadgroup)
        if name == self.broken:
            results[-1] = results[-1] + 1
        return results


@pytest.mark.parametrize(
    "broken,how,p,message",
    [
        ("down_grad", "add", 0.1, "dx differs from reference.py"),
        ("down_proj", "add", 0.1, "y differs from reference.py"),
        ("low_rank_grad", "raise", 0.0, "RuntimeError: kernel exploded"),
    ],
)
def test_a_faulty_kernel_falls_back_to_the_reference_with_one_warning(broken, how, p, message):
    backend = opencl_backend(FaultyLauncher(broken, how))
    x, w, b, a, bb, _ = make(mx.float32, 16, m=(21,))
    key = mx.random.key(4)
    inputs = layout.op_inputs(x, w, b, a, bb, key, p)
    with pytest.warns(UserWarning, match=message) as record:
        y = backend.lora_linear(inputs, 1.7, p)
    assert len(record) == 1 and "plain-MLX reference" in str(record[0].message)
    assert np.array_equal(np.array(y), np.array(gpu.plain_lora_linear(inputs, 1.7, p)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per configuration
        backend.lora_linear(inputs, 1.7, p)


def test_a_faulty_mask_falls_back_to_the_cpu_mask():
    backend = opencl_backend(FaultyLauncher("dropout_mask"))
    key = mx.random.key(4)
    with pytest.warns(UserWarning, match="dropout mask differs from the CPU's"):
        mask = backend.dropout_mask(key, (5, 7), 0.3, mx.float32)
    assert np.array_equal(np.array(mask), np.array(cpu.dropout_mask(key, (5, 7), 0.3, mx.float32)))


def test_a_gpu_device_takes_the_kernels_unless_turned_off(monkeypatch):
    """No GPU here: MLX's device queries are patched to say there is a CUDA GPU."""
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.delenv(gpu.ENABLE_VARIABLE, raising=False)
    assert gpu.available_backend() == "cuda"
    chosen = backends.current()
    assert isinstance(chosen, gpu.GPUBackend) and chosen.device.startswith("cuda")
    monkeypatch.setenv(gpu.ENABLE_VARIABLE, "0")
    assert gpu.available_backend() is None
    assert not isinstance(backends.current(), gpu.GPUBackend)
    monkeypatch.setenv(gpu.ENABLE_VARIABLE, "1")
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert gpu.available_backend() == "metal"


def test_the_self_check_runs_when_first_use_is_inside_mx_compile():
    """The trainer compiles its step, so the first call (and self-check) may come while
    mx.compile traces: the check evaluates arrays of its own, which MLX allows there."""
    backend = opencl_backend()

    @mx.compile
    def step(x):
        passed = backend._passes((mx.bfloat16, 16, True), mx.bfloat16, 16, True)
        return x * (2.0 if passed else 3.0)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(np.array(step(mx.ones(3))), np.full(3, 2.0, np.float32))
    assert backend.checked == {(mx.bfloat16, 16, True): None}
