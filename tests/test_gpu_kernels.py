"""The GPU kernels as their two real compilers see them, and their launch geometry.

- Metal: the exact source MLX 0.32.4 builds for each launch (its own generator, run under
  export tracing, which needs no Metal), compiled as C++ by clang++ against
  tests/metal_shim.h, which rejects what Metal rejects (tests below prove each).
- CUDA: the exact source MLX 0.32.4 hands NVRTC, compiled by nvcc where it is installed,
  with MLX's embedded device header replaced by tests/cuda_stub's declarations.
- Geometry: the grids Kernels computes for M*K >= 2^31 stay launchable.
The bodies themselves run in tests/test_gpu_opencl.py (PoCL).
"""

import re
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest
from kernel_sources import RecordingLauncher, cuda_source, metal_source, mlx_metal_source, record_op_launches
from mlx_fused_lora.ops.gpu import bodies, geometry, kernels

HERE = Path(__file__).parent
CLANG = shutil.which("clang++")
NVCC = shutil.which("nvcc")
needs_clang = pytest.mark.skipif(CLANG is None, reason="needs clang++ (apt-get install clang)")
DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def metal_compile(source, tmp_path):
    # C++ has no place for attributes on an explicit instantiation: drop them there only.
    source = re.sub(r'template \[\[host_name\("\w+"\)\]\] \[\[kernel\]\]', "template", source)
    path = tmp_path / "kernels.metal.cpp"
    path.write_text(source)
    return subprocess.run(
        [CLANG, "-std=c++17", "-fsyntax-only", "-Wno-unknown-attributes", "-include", str(HERE / "metal_shim.h")]
        + ["-x", "c++", str(path)],
        capture_output=True,
        text=True,
    )


@needs_clang
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_metal_sources_compile_against_the_strict_shim(dtype, tmp_path):
    """The sources MLX 0.32.4's own generator writes (recorded under export tracing)."""
    launches = record_op_launches(dtype)
    assert {launch.name for launch in launches} == set(bodies.KERNELS)
    # One Metal library per source, as MLX builds them; the same source twice is one.
    sources = dict.fromkeys(mlx_metal_source(launch, str(tmp_path)) for launch in launches)
    result = metal_compile("\n".join(sources), tmp_path)
    assert result.returncode == 0, result.stderr


def test_the_metal_replica_is_mlx_own_source(tmp_path):
    """kernel_sources.metal_source (which can swap a body, for the tests below) writes
    byte for byte what MLX 0.32.4 generates."""
    for dtype in (mx.float16, mx.bfloat16):
        for launch in record_op_launches(dtype):
            assert metal_source(launch) == mlx_metal_source(launch, str(tmp_path))


def bad_metal(snippet, tmp_path):
    """A real launch's source with `snippet` put in its body: (clean result, bad result)."""
    launch = next(launch for launch in record_op_launches(mx.bfloat16) if launch.name == "down_grad")
    _, body = kernels.kernel_source("metal", "down_grad")
    clean = metal_compile(metal_source(launch), tmp_path)
    bad = metal_compile(metal_source(launch, body=body + snippet), tmp_path)
    return clean, bad


@needs_clang
@pytest.mark.parametrize(
    "snippet,error",
    [
        # Metal: a threadgroup pointer cannot point at device memory, nor the reverse.
        ("threadgroup float* t = da_part;", "address_space"),
        ("{ device float* d = xs; }", "address_space"),
        # ... nor constant memory (where MLX puts small inputs such as the key) at device.
        ("{ const device uint32_t* k = key; }", "address_space"),
        # Metal has atomics for int, uint, bool and float only.
        ("{ atomic<half> h; }", "Metal has no atomic"),
        ("{ atomic<double> d; }", "Metal has no atomic"),
        # Names of the other dialects or of the C library.
        ("__syncthreads();", "undeclared identifier"),
        ("barrier(CLK_LOCAL_MEM_FENCE);", "undeclared identifier"),
        ('printf("%f", 1.0f);', "undeclared identifier"),
    ],
)
def test_metal_shim_rejects_what_metal_rejects(snippet, error, tmp_path):
    clean, bad = bad_metal(snippet, tmp_path)
    assert clean.returncode == 0, clean.stderr
    assert bad.returncode != 0 and error in bad.stderr, bad.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    sources = {cuda_source(launch) for dtype in DTYPES for launch in record_op_launches(dtype)}
    path = tmp_path / "kernels.cu"
    path.write_text("\n".join(sorted(sources)))
    result = subprocess.run(
        [NVCC, "-std=c++17", "-arch=compute_90a", "-I", str(HERE / "cuda_stub"), "-ptx", str(path)]
        + ["-o", str(tmp_path / "kernels.ptx")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    entries = (tmp_path / "kernels.ptx").read_text().count(".entry")
    assert entries == len(sources)


def test_sources_follow_mlx_signatures():
    """Spot checks of what MLX 0.32.4 generates: 0-d inputs by reference in constant
    memory on Metal and as pointers in CUDA; shapes only where the body names them."""
    launch = next(launch for launch in record_op_launches(mx.bfloat16) if launch.name == "down_proj")
    metal, cuda = metal_source(launch), cuda_source(launch)
    assert "const constant float& dropout [[buffer(" in metal
    assert "const constant uint32_t* key [[buffer(" in metal
    assert "const device bfloat16_t* x [[buffer(0)]]" in metal
    assert "const constant int* x_shape [[buffer(1)]]" in metal
    assert "uint3 threadgroup_position_in_grid [[threadgroup_position_in_grid]]" in metal
    assert "const float* dropout," in cuda and "const __grid_constant__ Shape x_shape," in cuda
    assert "using T = __nv_bfloat16;" in cuda and "a_shape" not in cuda


# MLX dims are int32: M*K past 2^31 comes from many rows or wide rows.
HUGE = [(150_000, 14_336, 14_336), (2**31 // 4096 + 7, 4096, 4096), (40_000, 65_536, 64)]


@pytest.mark.parametrize("m,k,n", HUGE)
@pytest.mark.parametrize("r", [1, 16, 128])
def test_launch_geometry_for_m_times_k_past_2_to_the_31(m, k, n, r):
    """The grids Kernels computes for M*K >= 2^31 (nothing runs: lazy arrays only)."""
    assert m * k >= 2**31
    recorder = RecordingLauncher()
    gpu = kernels.Kernels(recorder)
    x, dy = mx.zeros((m, k), dtype=mx.bfloat16), mx.zeros((m, n), dtype=mx.bfloat16)
    h = mx.zeros((m, r))
    key = mx.random.key(0)
    gpu.dropout_mask(key, (m, k), 0.1)
    gpu.down_proj(x, mx.zeros((k, r)), key, 0.1)
    gpu.low_rank_grad(dy, h, mx.zeros((r, n)), 1.0)
    gpu.down_grad(x, h, mx.zeros((k, r)), key, 0.1)
    for launch in recorder.launches:
        geometry.check_grid(launch.grid, launch.threadgroup)
        groups_x = launch.grid[0] // launch.threadgroup[0]
        assert launch.threadgroup == (geometry.GROUP, 1, 1)
        assert groups_x <= geometry.MAX_GROUPS and launch.grid[1] <= geometry.MAX_SPLITS
    mask = recorder.launches[0]
    assert mask.grid[0] * 2**16 >= m * k  # the group-stride loop's reach: every element


def test_check_grid_rejects_what_mlx_cannot_launch():
    for grid in [(2**31, 1, 1), (300, 1, 1), (256, 70_000, 1)]:
        with pytest.raises(ValueError, match="grid"):
            geometry.check_grid(grid, (256, 1, 1))


@pytest.mark.parametrize("r", [1, 2, 3, 16, 64, 100, 128, 256, 512, 1024])
def test_tiles_fit_shared_memory_for_any_rank(r):
    floats = {
        "down_proj": lambda t: t["TM"] * (t["TK"] + 1) + t["TK"] * r,
        "low_rank_grad": lambda t: t["TM"] * (t["TN"] + 1) + t["TM"] * r + r * (t["TN"] + 1),
        "down_grad": lambda t: 2 * t["TM"] * (t["TK"] + 1) + t["TM"] * r + t["TK"] * (r + 1),
    }
    for name, config in [
        ("down_proj", geometry.down_proj(1000, r)[0]),
        ("low_rank_grad", geometry.low_rank_grad(1000, 1000, r)[0]),
        ("down_grad", geometry.down_grad(1000, 1000, r)[0]),
    ]:
        assert floats[name](config) <= geometry.SHARED_FLOATS, (name, config)
        outputs = {"down_proj": config["TM"] * r}.get(name)
        if outputs is not None:
            assert config["P"] * geometry.GROUP >= outputs


HAS_GPU = mx.default_device() == mx.gpu and (mx.cuda.is_available() or mx.metal.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="MLX has no Metal or CUDA device here")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 16, 64, 128])
@pytest.mark.parametrize("dropout", [False, True])
def test_on_a_gpu_the_kernels_pass_their_self_check(dtype, r, dropout):
    """Where MLX has a GPU: the MLX-launched kernels, forward and every gradient, against
    reference.py, and the mask against the CPU's (what the op checks at first use)."""
    from mlx_fused_lora.ops.backends import gpu
    from mlx_fused_lora.ops.gpu.self_check import self_check

    backend = gpu.backend(gpu.available_backend() or ("cuda" if mx.cuda.is_available() else "metal"))
    run = lambda inputs, scale, p: gpu.gpu_op(backend.kernels, scale, p)(*inputs)[0]  # noqa: E731
    assert self_check(backend.kernels, run, dtype, r, dropout) is None
