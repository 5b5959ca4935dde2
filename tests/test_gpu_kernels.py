"""The GPU kernels as their two real compilers see them, and their launch geometry.

- Metal: the exact source MLX 0.32.4 builds for each launch (its own generator, run under
  export tracing, which needs no Metal), compiled as C++ by clang (the `test` extra's
  ziglang: a raw clang 22) against tests/metal_shim.h, which rejects what Metal rejects
  (tests below prove each).
- CUDA: the exact source MLX 0.32.4 hands NVRTC, compiled by nvcc for sm_90a (an H100)
  with MLX's embedded device header replaced by tests/cuda_stub's declarations, ptxas
  reporting each kernel's registers: no stack frame and no spills in any variant.
- Both compile every kernel variant the op builds (dtype x rank class x dropout), all in
  one translation unit per compiler; the results are cached under build/ by the sources'
  hash, so a rerun with unchanged kernels takes no compiler time.
- A missing compiler fails these tests (no silent skip): ziglang comes with the `test`
  extra; nvcc is CUDA's (CI's image has it). MLX_FUSED_LORA_SKIP_NVCC=1 skips the nvcc
  tests on a Linux without CUDA's toolkit, on purpose; off Linux (a Mac) they skip,
  saying so: CUDA has no toolkit there.
- Geometry: the grids Kernels computes for M*K >= 2^31 stay launchable; every tile fits
  and feeds at least 4 FMAs per 16-byte load; the self-check's cases run every path.
The bodies themselves run in tests/test_gpu_opencl.py (PoCL).
"""

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from kernel_sources import (
    DTYPES,
    RANK_CLASSES,
    RecordingLauncher,
    cuda_source,
    metal_source,
    mlx_metal_source,
    record_op_launches,
    variant_launches,
)
from mlx_fused_lora.ops.gpu import geometry, kernels, self_check

HERE = Path(__file__).parent
CACHE = HERE.parent / "build" / "gpu-compile-cache"


def metal_compiler():
    """The test extra's clang (ziglang), else a clang++ on PATH; a missing one fails."""
    if importlib.util.find_spec("ziglang") is not None:
        return [sys.executable, "-m", "ziglang", "clang"]
    if shutil.which("clang++"):
        return [shutil.which("clang++")]
    pytest.fail('no clang for the Metal-shim check: pip install ".[test]" (it brings ziglang)')


def nvcc():
    """CUDA's nvcc; on Linux a missing one fails (or skips where asked:
    MLX_FUSED_LORA_SKIP_NVCC=1); elsewhere (macOS) CUDA has no toolkit: a skip, saying so."""
    found = shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if os.path.exists(p)), None)
    if found:
        return found
    if not sys.platform.startswith("linux"):
        pytest.skip(f"CUDA has no toolkit for {sys.platform}: the nvcc checks run on Linux (CI)")
    if os.environ.get("MLX_FUSED_LORA_SKIP_NVCC") == "1":
        pytest.skip("MLX_FUSED_LORA_SKIP_NVCC=1: the nvcc checks were turned off on purpose")
    pytest.fail("nvcc not found: install CUDA's toolkit, or set MLX_FUSED_LORA_SKIP_NVCC=1 to skip on purpose")


def cached_run(kind, command, source, tmp_path, suffix):
    """(returncode, stderr) of `command` over `source` (written to a file, whose path
    replaces {src}; {out} is an output path), cached under build/ by a hash of both."""
    digest = hashlib.sha256(("\0".join(command) + "\0" + source).encode()).hexdigest()[:24]
    cached = CACHE / f"{kind}-{digest}.log"
    if cached.exists():
        code, _, log = cached.read_text().partition("\n")
        return int(code), log
    path = tmp_path / f"kernels{suffix}"
    path.write_text(source)
    args = [a.replace("{src}", str(path)).replace("{out}", str(tmp_path / "out")) for a in command]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode == 0:
        CACHE.mkdir(parents=True, exist_ok=True)
        cached.write_text(f"{result.returncode}\n{result.stderr}")
    return result.returncode, result.stderr


def metal_compile(source, tmp_path, cache=True):
    # C++ has no place for attributes on an explicit instantiation: drop them there only.
    source = re.sub(r'template \[\[host_name\("\w+"\)\]\] \[\[kernel\]\]', "template", source)
    command = metal_compiler() + ["-std=c++17", "-fsyntax-only", "-Wno-unknown-attributes"]
    command += ["-include", str(HERE / "metal_shim.h"), "-x", "c++", "{src}"]
    if cache:
        return cached_run("metal", command, source, tmp_path, ".metal.cpp")
    path = tmp_path / "kernels.metal.cpp"
    path.write_text(source)
    result = subprocess.run([a.replace("{src}", str(path)) for a in command], capture_output=True, text=True)
    return result.returncode, result.stderr


def test_every_metal_variant_compiles_against_the_strict_shim(tmp_path):
    """The sources MLX 0.32.4's own generator writes for every variant, in one library."""
    launches = variant_launches()
    assert {launch.name for launch in launches} == set(bodies_names())
    sources = dict.fromkeys(mlx_metal_source(launch, str(tmp_path)) for launch in launches)
    code, log = metal_compile("\n".join(sources), tmp_path)
    assert code == 0, log


def bodies_names():
    from mlx_fused_lora.ops.gpu import bodies

    return bodies.KERNELS


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
    bad = metal_compile(metal_source(launch, body=body + snippet), tmp_path, cache=False)
    return clean, bad


@pytest.mark.parametrize(
    "snippet,error",
    [
        # Metal: a threadgroup pointer cannot point at device memory, nor the reverse.
        ("threadgroup float* t = da_part;", "cannot initialize a variable of type 'threadgroup float *'"),
        ("{ device float* d = smem; }", "cannot initialize a variable of type 'device float *'"),
        # ... nor constant memory (where MLX puts small inputs such as the key) at device.
        ("{ const device uint32_t* k = key; }", "address_space(1))) unsigned int *') with an lvalue"),
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
    assert clean[0] == 0, clean[1]
    assert bad[0] != 0 and error in bad[1], bad[1]


def ptxas_report(log):
    """{kernel name: (registers, 'N bytes stack frame, ...' line)} from ptxas -v."""
    report, name = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
        elif "stack frame" in line and name:
            report[name] = [line.strip()]
        elif (m := re.search(r"Used (\d+) registers", line)) and name in report:
            report[name].insert(0, int(m.group(1)))
    return report


def test_every_cuda_variant_compiles_with_nvcc_and_spills_nothing(tmp_path):
    """One translation unit of every variant, to sm_90a machine code: ptxas reports no
    stack frame (arrays kept in registers) and no spill stores or loads in any kernel."""
    sources = sorted({cuda_source(launch) for launch in variant_launches()})
    command = [nvcc(), "-std=c++17", "-arch=sm_90a", "-I", str(HERE / "cuda_stub"), "-cubin", "-Xptxas", "-v"]
    code, log = cached_run("nvcc", command + ["{src}", "-o", "{out}"], "\n".join(sources), tmp_path, ".cu")
    assert code == 0, log
    report = ptxas_report(log)
    assert len(report) == len(sources), log
    clean = "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
    spilled = {name: line for name, (_, line) in report.items() if line != clean}
    assert not spilled, spilled
    assert max(registers for registers, _ in report.values()) <= 128  # 2 groups of 256 per SM


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
    if r <= geometry.MAX_LOW_RANK:
        gpu.low_rank_grad(dy, h, mx.zeros((r, n)), 1.0)
    gpu.down_grad(x, h, mx.zeros((k, r)), key, 0.1)
    for launch in recorder.launches:
        geometry.check_grid(launch.grid, launch.threadgroup)
        groups_x = launch.grid[0] // launch.threadgroup[0]
        assert groups_x <= geometry.MAX_GROUPS and launch.grid[1] <= geometry.MAX_SPLITS
    mask = recorder.launches[0]
    assert mask.grid[0] * 2**16 >= m * k  # the group-stride loop's reach: every element


def test_check_grid_rejects_what_mlx_cannot_launch():
    for grid in [(2**31, 1, 1), (300, 1, 1), (256, 70_000, 1)]:
        with pytest.raises(ValueError, match="grid"):
            geometry.check_grid(grid, (256, 1, 1))


def tiles(r):
    """(name, template) of each tiled kernel that takes rank r."""
    found = [("down_proj", geometry.down_proj(1000, 1000, r)[0]), ("down_grad", geometry.down_grad(1000, 1000, r)[0])]
    if r <= geometry.MAX_LOW_RANK:
        found.append(("low_rank_grad", geometry.low_rank_grad(1000, 1000, r)[0]))
    return found


SHARED = {
    "down_proj": lambda t, rp: t["RT"] * t["TR"] * t["XS"] + 4 * t["KL"] * t["AS"],
    "down_grad": lambda t, rp: (
        2 * (t["TG"] // t["KG"] * t["TRE"]) * t["XS"] + t["TG"] // t["KG"] * t["TRE"] * t["DS"] + rp * t["AT"]
    ),
    "low_rank_grad": lambda t, rp: rp * t["BS"] + t["TM"] * (t["YS"] + t["HS"]),
}


@pytest.mark.parametrize("r", range(1, geometry.MAX_RANK + 1))
def test_tiles_fit_and_feed_at_least_4_fmas_per_16_byte_load(r):
    """For every r the kernels take: the shared tiles fit in 32 KiB, every shared row
    stride is an odd number of 16-byte words (conflict-free), and each rank-r product
    reads at most one 16-byte shared load per 4 FMAs."""
    for name, t in tiles(r):
        rp = geometry.padded_rank(name, t)
        assert SHARED[name](t, rp) <= t["SMEM"] <= geometry.SHARED_FLOATS, (name, t)
        for stride in [t[k] for k in ("XS", "AS", "DS", "AT", "YS", "HS", "BS") if k in t]:
            assert stride % 4 == 0 and (stride // 4) % 2 == 1, (name, t)
        assert geometry.fmas_per_load(name, t) >= 4, (name, t)
        # few padded rank columns (low_rank_grad's dS tile wants RP / 4 to divide its group)
        assert r <= rp <= max(r + 3, (2 if name == "low_rank_grad" else 1.5) * r), (name, t)


def test_ranks_past_the_kernels_limits_are_refused_by_name():
    with pytest.raises(ValueError, match="down_proj takes 1 <= r <= 128, got r = 129"):
        geometry.down_proj(10, 10, geometry.MAX_RANK + 1)
    with pytest.raises(ValueError, match="low_rank_grad takes 1 <= r <= 32"):
        geometry.low_rank_grad(10, 10, geometry.MAX_LOW_RANK + 1)


@pytest.mark.parametrize("r", [8, 16])
def test_down_proj_fills_an_h100_at_m_512_by_splitting_k(r):
    """>= 2 groups per SM of an H100's 132 at M = 512, K = 4096 (bf16)."""
    _, grid, group = geometry.down_proj(512, 4096, r, 2)
    assert grid[0] // group[0] * grid[1] >= 2 * 132


def mixed_counts(m):
    """Rows per class of the self-check's mixed ids: on the base alone, then each adapter."""
    ids = self_check.mixed_ids(m)
    return [int((ids == -1).sum())] + [int((ids == i).sum()) for i in range(self_check.ADAPTERS)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", RANK_CLASSES + [3, 100])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("mixed", [False, True], ids=["single", "mixed"])
def test_the_self_check_runs_every_path_of_every_kernel_it_may_launch(dtype, r, dropout, mixed):
    """The paths each self-check case takes, read off the geometry of the launches the
    op makes for it (recorded, not run) and, mixed, off its ids: together, every path
    each kernel can take. A geometry change that drops a path from the check fails here."""
    p = self_check.DROPOUT if dropout else 0.0
    taken, possible = {}, {}
    for case in self_check.CASES:
        m, k, n = case.shape
        caps = case.caps or (geometry.MAX_GROUPS, geometry.MAX_SPLITS)
        for plan in self_check.plans(r, dropout, mixed):
            for launch in record_op_launches(dtype, m, k, n, r, p, plan, case.caps, mixed):
                if launch.name not in ("down_proj", "low_rank_grad", "down_grad"):
                    continue
                template = dict(launch.template[1:])
                rows, cols = launch.inputs[0][1]
                length = (
                    geometry.row_tile("down_proj", template)
                    if launch.name == "down_proj"
                    else geometry.split_rows(launch.name, rows, cols, r, dtype.size, *caps)
                )
                aligned = case.offset % 4 == 0
                paths = geometry.paths(launch.name, template, launch.grid, rows, cols, aligned, mixed_counts(m), length)
                taken.setdefault(launch.name, set()).update(paths)
                possible.setdefault(launch.name, set()).update(geometry.possible_paths(launch.name, template))
    expected = {"h": "down_proj", "ds_db": "low_rank_grad", "da_e": "down_grad"}
    assert set(taken) == {expected[k] for k, v in self_check.plans(r, dropout, mixed)[0].items() if v == "kernel"}
    for name in taken:
        assert taken[name] == possible[name], (name, possible[name] - taken[name])


HAS_GPU = mx.default_device() == mx.gpu and (mx.cuda.is_available() or mx.metal.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="MLX has no Metal or CUDA device here")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 16, 64, 128])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("mixed", [False, True], ids=["single", "mixed"])
def test_on_a_gpu_the_kernels_pass_their_self_check(dtype, r, dropout, mixed):
    """Where MLX has a GPU: the MLX-launched kernels, forward and every gradient, against
    reference.py, and the masks against the CPU's (what the op checks at first use), for
    the single-adapter op and the mixed one."""
    from mlx_fused_lora.ops.backends import gpu

    backend = gpu.backend(gpu.available_backend() or ("cuda" if mx.cuda.is_available() else "metal"))
    assert self_check.self_check(backend.kernels, backend.run, dtype, r, dropout, backend.tf32, mixed=mixed) is None
