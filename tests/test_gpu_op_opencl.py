"""The GPU backend's whole op (forward and every gradient), with the kernels run on PoCL
standing in for MLX's launcher, against reference.py; its self-check (TF32 included) and
fallback; and the switch that puts a GPU device on the kernels by default."""

import functools
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
        (mx.float32, 64, 0.5, True, 150, 70),  # dS, dB by two GEMMs (the cost model's choice)
        (mx.float32, 128, 0.1, False, 148, 68),  # down_grad's smallest groups
        (mx.float32, 17, 0.1, True, 150, 70),  # padded rank chunks
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
    assert backend.checked == {(dtype, r, p > 0, False): None}
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
    assert len(record) == 1 and "lean plain-MLX formulation" in str(record[0].message)
    assert np.array_equal(np.array(y), np.array(lean.lean_lora_linear(inputs, 1.7, p)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per configuration
        backend.lora_linear(inputs, 1.7, p)


def test_a_faulty_mask_falls_back_to_the_device_mask():
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
    assert backends.current_mixed() is chosen  # mixed batches: the same kernels
    monkeypatch.setenv(gpu.ENABLE_VARIABLE, "0")
    assert gpu.available_backend() is None
    assert not isinstance(backends.current(), gpu.GPUBackend)
    assert backends.current_mixed().lora_linear.func is lean.lora_linear  # the lean fallback
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
        passed = backend._passes((mx.bfloat16, 16, True, False))
        return x * (2.0 if passed else 3.0)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(np.array(step(mx.ones(3))), np.full(3, 2.0, np.float32))
    assert backend.checked == {(mx.bfloat16, 16, True, False): None}


def tf32(a):
    """float32 rounded to TF32 (a 10-bit mantissa), to nearest even: what cuBLAS's TF32
    GEMMs do to their inputs."""
    words = a.astype(mx.float32).view(mx.uint32)
    words = (words + mx.array(0xFFF, dtype=mx.uint32) + ((words >> 13) & 1)) & mx.array(0xFFFFE000, dtype=mx.uint32)
    return words.view(mx.float32)


@mx.custom_function
def tf32_inputs(a):
    return tf32(a)


@tf32_inputs.vjp
def _(primals, cotangent, output):
    return cotangent


@mx.custom_function
def tf32_cotangent(a):
    return a


@tf32_cotangent.vjp
def _(primals, cotangent, output):
    return tf32(cotangent)


def tf32_matmul(a, b):
    """a @ b with both inputs in TF32, forward and backward (the cotangent too)."""
    return tf32_cotangent(tf32_inputs(a) @ tf32_inputs(b))


def tf32_lora_linear(x, weight, bias, lora_a, lora_b, scale, mask=None):
    """reference.lora_linear as MLX computes it on CUDA by default: every float32 GEMM in
    TF32 (MLX_ENABLE_TF32=1)."""
    x32 = x.astype(mx.float32)
    y = tf32_matmul(x32, weight.astype(mx.float32).T)
    y = y if bias is None else y + bias.astype(mx.float32)
    h = tf32_matmul(x32 if mask is None else x32 * mask, lora_a.astype(mx.float32))
    return (y + scale * tf32_matmul(h, lora_b.astype(mx.float32))).astype(x.dtype)


def test_tf32_emulation_rounds_like_cublas():
    a = mx.array(np.array([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-10 + 2**-12, -3.0], dtype=np.float32))
    assert np.array(tf32(a)).tolist() == [1.0, 1 + 2**-9, 1 + 2**-10, -3.0]  # ties to even


@pytest.mark.parametrize("dropout", [True, False])
def test_the_self_check_passes_correct_kernels_against_a_tf32_reference(monkeypatch, dropout):
    """The first finding of issue 23: on CUDA, MLX's float32 GEMMs run in TF32, so a
    reference computed with them differs from exact float32 kernels by ~1e-3. With the
    reference emulating TF32 here, the self-check told the op may meet TF32 (as it is on
    CUDA) passes the correct kernels, the same check with exact-float32 bounds rejects
    the difference (the emulation is real), and a wrong kernel still fails."""
    monkeypatch.setattr(reference, "lora_linear", tf32_lora_linear)
    backend = opencl_backend()
    check = functools.partial(self_check.self_check, dtype=mx.float32, r=16, dropout=dropout)
    assert check(backend.kernels, backend.run, tf32=True) is None
    assert "rounding bound" in check(backend.kernels, backend.run, tf32=False)
    for broken in ["down_grad", "down_proj"] if dropout else ["low_rank_grad"]:
        faulty = opencl_backend(FaultyLauncher(broken))
        assert "differs from reference.py" in check(faulty.kernels, faulty.run, tf32=True)


def test_the_cuda_backend_checks_with_tf32_bounds_and_plans_for_an_h100():
    assert gpu.backend("cuda").tf32 and gpu.backend("cuda").model is costs.H100
    assert not gpu.backend("metal").tf32 and gpu.backend("metal").model is costs.M3_MAX


@pytest.mark.parametrize("dtype,r", [(mx.float16, 1), (mx.bfloat16, 40)], ids=str)
def test_the_self_check_passes_every_plan_on_pocl(dtype, r):
    """Every case and plan the op's first use checks, on PoCL (r = 40: the kernels for h
    and dA, e; two GEMMs for dS, dB)."""
    backend = opencl_backend()
    assert self_check.self_check(backend.kernels, backend.run, dtype, r, True) is None
