"""The GPU kernels, checked on a machine without a GPU, and run where there is one.

- Metal: the source MLX would build is compiled as C++ against tests/metal_shim.h.
- CUDA: the source NVRTC would see is compiled by nvcc, where nvcc is installed.
- Logic: each CUDA template is compiled for the CPU with an emulated thread grid (a
  loop over blocks and threads, atomics as plain adds: the kernels use no barriers)
  and checked against numpy and the CPU extension's mask.
- On a GPU (marker `gpu`): the kernels themselves against the CPU.
"""

import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest
from kernel_sources import cuda_constants, cuda_source, metal_source
from mlx_fused_lora import dropout_mask
from mlx_fused_lora.ops import gpu_kernels

CXX = shutil.which("g++") or shutil.which("clang++")
NVCC = shutil.which("nvcc")
SHIM = __import__("pathlib").Path(__file__).parent / "metal_shim.h"
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler")

# Per kernel: inputs (name, type, size, ndim), outputs (name, type), template.
M, K, R = 37, 150, 5
KERNEL_IO = {
    "dropout_mask": (
        [("key", "uint32_t", 2, 1), ("dropout", "float", 1, 0), ("size", "uint64_t", 1, 0)],
        [("mask", "float")],
        [],
    ),
    "dropout_down_proj": (
        [("x", "bfloat16", M * K, 2), ("a", "float", K * R, 2), ("key", "uint32_t", 2, 1), ("dropout", "float", 1, 0)],
        [("h", "float")],
        [("R", R), ("CHUNK", gpu_kernels.REDUCTION_CHUNK)],
    ),
    "dropout_down_grad": (
        [("x", "float16", M * K, 2), ("ds", "float", M * R, 2), ("key", "uint32_t", 2, 1), ("dropout", "float", 1, 0)],
        [("da", "float")],
        [("R", R), ("CHUNK", gpu_kernels.REDUCTION_CHUNK)],
    ),
    "masked_input_grad": (
        [("ds", "float", M * R, 2), ("a", "float", K * R, 2), ("key", "uint32_t", 2, 1), ("dropout", "float", 1, 0)],
        [("e", "bfloat16")],
        [("R", R), ("OutT", "bfloat16")],
    ),
}
assert KERNEL_IO.keys() == gpu_kernels.KERNELS.keys(), "every kernel needs its IO spec here"


def metal_syntax_check(name, tmp_path, body=None):
    inputs, outputs, template = KERNEL_IO[name]
    _, _, header, full_body = gpu_kernels.kernel_parts("metal", name)
    if body is not None:
        full_body = gpu_kernels.BODY_PRELUDE["metal"] + body
    atomic = gpu_kernels.KERNELS[name][3]
    path = tmp_path / f"{name}.metal.cpp"
    path.write_text(metal_source(f"mfl_{name}", inputs, outputs, header, full_body, template, atomic))
    return subprocess.run(
        [CXX, "-std=c++17", "-fsyntax-only", "-Wno-attributes", "-include", str(SHIM), "-x", "c++", str(path)],
        capture_output=True,
        text=True,
    )


@needs_cxx
@pytest.mark.parametrize("name", sorted(gpu_kernels.KERNELS))
def test_metal_source_compiles(name, tmp_path):
    result = metal_syntax_check(name, tmp_path)
    assert result.returncode == 0, result.stderr


@needs_cxx
def test_metal_check_catches_a_typo_and_an_undeclared_name(tmp_path):
    body = gpu_kernels.DROPOUT_DOWN_PROJ_BODY
    for broken in (body.replace("mfl_keep_threshold", "mfl_keep_treshold"), body.replace("acc[j] +=", "accu[j] +=")):
        assert broken != body
        result = metal_syntax_check("dropout_down_proj", tmp_path, broken)
        assert result.returncode != 0
        assert "was not declared" in result.stderr or "undeclared" in result.stderr, result.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("name", sorted(gpu_kernels.KERNELS))
def test_cuda_source_compiles(name, tmp_path):
    inputs, outputs, template = KERNEL_IO[name]
    _, _, header, body = gpu_kernels.kernel_parts("cuda", name)
    path = tmp_path / f"{name}.cu"
    path.write_text(cuda_source(f"mfl_{name}", inputs, outputs, header, body, template))
    result = subprocess.run(
        [NVCC, "-std=c++17", "-c", str(path), "-o", str(tmp_path / f"{name}.o")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


EMULATION_PRELUDE = """
#include <cstdint>
#include <cstdio>
#include <vector>
#define __device__
struct Dim3 { unsigned x = 1, y = 1, z = 1; };
static Dim3 blockIdx, blockDim, threadIdx;
static float atomicAdd(float* address, float value) { float old = *address; *address += value; return old; }
using Shape = const int*;
template <typename T> std::vector<T> load(const char* path, size_t n) {
  std::vector<T> v(n); FILE* f = fopen(path, "rb"); fread(v.data(), sizeof(T), n, f); fclose(f); return v;
}
"""

NP_TO_C = {np.float32: "float", np.uint32: "uint32_t", np.uint64: "uint64_t"}


def emulate(name, tmp_path, inputs, outputs, template, threads):
    """Runs kernel `name` (its CUDA body, float32 data) thread by thread on the CPU.

    inputs: [(arg, numpy array)]; outputs: [(arg, shape)], zero-filled first as MLX's
    init_value=0 does. Returns the outputs as numpy arrays.
    """
    _, _, header, body = gpu_kernels.kernel_parts("cuda", name)
    params, loads, call_args = [], [], []
    for n, (arg, array) in enumerate(inputs):
        ctype = NP_TO_C[array.dtype.type]
        params.append(f"const {ctype}* {arg}")
        loads.append(f"auto in_{arg} = load<{ctype}>(argv[{n + 1}], {array.size});")
        call_args.append(f"in_{arg}.data()")
        (tmp_path / f"in_{arg}.bin").write_bytes(np.ascontiguousarray(array).tobytes())
        if array.ndim > 0 and f"{arg}_shape" in body:
            params.append(f"Shape {arg}_shape")
            loads.append(f"static const int shape_{arg}[] = {{{', '.join(map(str, array.shape))}}};")
            call_args.append(f"shape_{arg}")
    for arg, shape in outputs:
        params.append(f"float* {arg}")
        loads.append(f"std::vector<float> out_{arg}({int(np.prod(shape))}, 0.0f);")
        call_args.append(f"out_{arg}.data()")
    writes = "".join(
        f'{{ FILE* f = fopen("{tmp_path / ("out_" + arg + ".bin")}", "wb"); '
        f"fwrite(out_{arg}.data(), sizeof(float), out_{arg}.size(), f); fclose(f); }}\n"
        for arg, _ in outputs
    )
    source = (
        EMULATION_PRELUDE
        + header
        + f"\nstatic void kernel({', '.join(params)}) {{\n{cuda_constants(template)}{body}\n}}\n"
        + "int main(int argc, char** argv) {\n"
        + "\n".join(loads)
        + f"\nblockDim.x = {gpu_kernels.ELEMENTWISE_GROUP};\n"
        + f"for (unsigned b = 0; b < ({threads} + blockDim.x - 1) / blockDim.x; ++b)\n"
        + "  for (unsigned t = 0; t < blockDim.x; ++t) {\n    blockIdx.x = b; threadIdx.x = t;\n"
        + f"    kernel({', '.join(call_args)});\n  }}\n"
        + writes
        + "}\n"
    )
    (tmp_path / "emulate.cpp").write_text(source)
    build = subprocess.run(
        [CXX, "-std=c++17", "-O1", str(tmp_path / "emulate.cpp"), "-o", str(tmp_path / "emulate")],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(tmp_path / "emulate")] + [str(tmp_path / f"in_{a}.bin") for a, _ in inputs])
    assert run.returncode == 0
    return {arg: np.fromfile(tmp_path / f"out_{arg}.bin", dtype=np.float32).reshape(shape) for arg, shape in outputs}


KEY = np.array([123456789, 987654321], dtype=np.uint32)


def mask_of(shape, p):
    return np.array(dropout_mask(mx.array(KEY), shape, p)) if p > 0 else np.ones(shape, np.float32)


@needs_cxx
def test_dropout_mask_template_matches_the_cpu_mask_bit_for_bit(tmp_path):
    n, p = 3 * 256 + 77, 0.3  # not a multiple of the block: the bound check matters
    out = emulate(
        "dropout_mask",
        tmp_path,
        [("key", KEY), ("dropout", np.array(p, np.float32)), ("size", np.array(n, np.uint64))],
        [("mask", (n,))],
        [],
        n,
    )
    assert np.array_equal(out["mask"].view(np.uint32), mask_of((n,), p).view(np.uint32))


def random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@needs_cxx
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_reduction_and_epilogue_templates_match_numpy(p, tmp_path):
    x, a, ds = random((M, K), 1), random((K, R), 2), random((M, R), 3)
    chunk = gpu_kernels.REDUCTION_CHUNK
    common = [("key", KEY), ("dropout", np.array(p, np.float32))]
    xm = x * mask_of((M, K), p)

    h = emulate(
        "dropout_down_proj",
        tmp_path,
        [("x", x), ("a", a)] + common,
        [("h", (M, R))],
        [("R", R), ("CHUNK", chunk)],
        M * -(-K // chunk),
    )["h"]
    np.testing.assert_allclose(h, xm @ a, rtol=1e-5, atol=1e-4)

    da = emulate(
        "dropout_down_grad",
        tmp_path,
        [("x", x), ("ds", ds)] + common,
        [("da", (K, R))],
        [("R", R), ("CHUNK", chunk)],
        K * -(-M // chunk),
    )["da"]
    np.testing.assert_allclose(da, xm.T @ ds, rtol=1e-5, atol=1e-4)

    e = emulate(
        "masked_input_grad",
        tmp_path,
        [("ds", ds), ("a", a)] + common,
        [("e", (M, K))],
        [("R", R), ("OutT", "float")],
        M * K,
    )["e"]
    np.testing.assert_allclose(e, mask_of((M, K), p) * (ds @ a.T), rtol=1e-5, atol=1e-5)


HAS_GPU = mx.default_device() == mx.gpu


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="MLX has no GPU here")
def test_gpu_mask_equals_cpu_mask_bit_for_bit(monkeypatch):
    monkeypatch.setenv(gpu_kernels.ENABLE_VARIABLE, "1")
    key = mx.random.key(31)
    shape = (37, 1029)
    gpu = np.array(dropout_mask(key, shape, 0.1))
    with mx.stream(mx.cpu):
        cpu = np.array(dropout_mask(key, shape, 0.1))
    assert np.array_equal(gpu.view(np.uint32), cpu.view(np.uint32))


class PlainKernels:
    """gpu_kernels.Kernels' contract in plain MLX, to run the GPU op's glue on the CPU."""

    def dropout_down_proj(self, x, a, key, p):
        return (x.astype(mx.float32) * dropout_mask(key, x.shape, p)) @ a

    def dropout_down_grad(self, x, ds, key, p):
        return (x.astype(mx.float32) * dropout_mask(key, x.shape, p)).T @ ds

    def masked_input_grad(self, ds, a, key, p, dtype):
        return (dropout_mask(key, (ds.shape[0], a.shape[0]), p) * (ds @ a.T)).astype(dtype)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gpu_op_glue_matches_reference(dtype, p):
    """The GPU op's formulas (forward, every gradient), with the kernels' contract."""
    from mlx_fused_lora.ops import layout, reference
    from mlx_fused_lora.ops.backends.gpu import gpu_op

    mx.random.seed(0)
    x = mx.random.normal((19, 40)).astype(dtype)
    w = (mx.random.normal((24, 40)) / 6).astype(dtype)
    b = mx.random.normal((24,)).astype(dtype)
    a, bb = mx.random.normal((40, 4)) / 6, mx.random.normal((4, 24)) / 2
    key = mx.random.key(5)
    op = gpu_op(PlainKernels(), 1.5, p)
    mask = dropout_mask(key, x.shape, p) if p > 0 else None
    ct = mx.random.normal((19, 24))

    def fused(x, b, a, bb):
        args = layout.op_inputs(x, w, b, a, bb, key, p)
        return (op(*args)[0].astype(mx.float32) * ct).sum()

    def ref(x, b, a, bb):
        return (reference.lora_linear(x, w, b, a, bb, 1.5, mask).astype(mx.float32) * ct).sum()

    tol = 2e-5 if dtype == mx.float32 else 2e-2
    got, want = (
        mx.value_and_grad(fused, argnums=(0, 1, 2, 3))(x, b, a, bb),
        mx.value_and_grad(ref, argnums=(0, 1, 2, 3))(x, b, a, bb),
    )
    assert abs(got[0].item() - want[0].item()) <= tol * max(1.0, abs(want[0].item())) * 10
    for g, r in zip(got[1], want[1], strict=False):
        g, r = np.array(g.astype(mx.float32)), np.array(r.astype(mx.float32))
        assert np.abs(g - r).max() <= tol * np.abs(r).max()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="MLX has no GPU here")
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_gpu_op_matches_reference(dtype, p, monkeypatch):
    """On the GPU, the kernels path: forward and gradients against reference.py."""
    from mlx_fused_lora import fused_lora_linear
    from mlx_fused_lora.ops import reference
    from test_fused_lora_linear import SHAPES, TOL, both, make_inputs, rel_err

    monkeypatch.setenv(gpu_kernels.ENABLE_VARIABLE, "1")
    for shape, n, r in SHAPES:
        args = make_inputs(shape, n, r, dtype)
        x, w, b, a, bb = args
        key = mx.random.key(7)
        mask = dropout_mask(key, x.shape, p) if p > 0 else None
        y = fused_lora_linear(x, w, b, a, bb, scale=1.7, dropout=p, key=key)
        assert rel_err(y, reference.lora_linear(x, w, b, a, bb, 1.7, mask)) < TOL[dtype]
        fused, ref = both(args, p, key, 1.7)
        for gi, gr in zip(
            mx.grad(fused, argnums=(0, 1, 2, 3))(x, b, a, bb),
            mx.grad(ref, argnums=(0, 1, 2, 3))(x, b, a, bb),
            strict=False,
        ):
            assert rel_err(gi, gr) < TOL[dtype]
