"""The GPU kernels, checked on a machine without a GPU, and run where there is one.

- Metal: the source MLX would build is compiled as C++ against tests/metal_shim.h.
- CUDA: the source NVRTC would see is compiled by nvcc, where nvcc is installed.
- Logic: the CUDA template is compiled for the CPU with an emulated thread grid and
  must reproduce the CPU extension's mask bit for bit.
- On a GPU (marker `gpu`): the kernel itself against the CPU.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from kernel_sources import cuda_source, metal_source
from mlx_fused_lora import dropout_mask
from mlx_fused_lora.ops import gpu_kernels

HERE = Path(__file__).parent
CXX = shutil.which("g++") or shutil.which("clang++")
NVCC = shutil.which("nvcc")

# Inputs as the kernels receive them: (name, type, size, ndim); outputs (name, type).
KERNEL_IO = {
    "dropout_mask": (
        [("key", "uint32_t", 2, 1), ("dropout", "float", 1, 0), ("size", "uint64_t", 1, 0)],
        [("mask", "float")],
    ),
}
assert KERNEL_IO.keys() == gpu_kernels.KERNELS.keys(), "every kernel needs its IO spec here"


def metal_syntax_check(source, tmp_path):
    path = tmp_path / "kernel.metal.cpp"
    path.write_text(source)
    return subprocess.run(
        [CXX, "-std=c++17", "-fsyntax-only", "-Wno-attributes", "-include", str(HERE / "metal_shim.h"),
         "-x", "c++", str(path)],
        capture_output=True, text=True,
    )


def full_metal_source(name, body=None):
    inputs, outputs, header, prelude_and_body = gpu_kernels.kernel_parts("metal", name)
    if body is not None:
        prelude_and_body = gpu_kernels.BODY_PRELUDE["metal"] + body
    return metal_source(f"mfl_{name}", *KERNEL_IO[name], header, prelude_and_body)


needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


@needs_cxx
@pytest.mark.parametrize("name", sorted(gpu_kernels.KERNELS))
def test_metal_source_compiles(name, tmp_path):
    result = metal_syntax_check(full_metal_source(name), tmp_path)
    assert result.returncode == 0, result.stderr


@needs_cxx
def test_metal_check_catches_a_typo_and_an_undeclared_name(tmp_path):
    body = gpu_kernels.DROPOUT_MASK_BODY
    for broken in (body.replace("mfl_dropout_bits", "mfl_dropout_bitz"), body.replace("key[1]", "keys[1]")):
        assert broken != body
        result = metal_syntax_check(full_metal_source("dropout_mask", broken), tmp_path)
        assert result.returncode != 0
        assert "was not declared" in result.stderr or "undeclared" in result.stderr, result.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("name", sorted(gpu_kernels.KERNELS))
def test_cuda_source_compiles(name, tmp_path):
    inputs, outputs, header, body = gpu_kernels.kernel_parts("cuda", name)
    path = tmp_path / "kernel.cu"
    path.write_text(cuda_source(f"mfl_{name}", *KERNEL_IO[name], header, body))
    result = subprocess.run([NVCC, "-std=c++17", "-c", str(path), "-o", str(tmp_path / "kernel.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


EMULATION = r"""
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>
#define __device__
struct Dim3 {{ unsigned x = 1, y = 1, z = 1; }};
static Dim3 blockIdx, blockDim, threadIdx;
{header}
static void kernel(const uint32_t* key, const float* dropout, const uint64_t* size, float* mask) {{
{body}
}}
int main(int argc, char** argv) {{
  const uint32_t key[2] = {{uint32_t(strtoul(argv[1], 0, 10)), uint32_t(strtoul(argv[2], 0, 10))}};
  const float p = strtof(argv[3], 0);
  const uint64_t n = strtoull(argv[4], 0, 10);
  std::vector<float> mask(n, -1.0f);
  blockDim.x = {group};
  for (unsigned b = 0; b < (n + blockDim.x - 1) / blockDim.x; ++b)
    for (unsigned t = 0; t < blockDim.x; ++t) {{
      blockIdx.x = b;
      threadIdx.x = t;
      kernel(key, &p, &n, mask.data());
    }}
  fwrite(mask.data(), sizeof(float), n, stdout);
}}
"""


@needs_cxx
def test_cuda_template_emulated_on_the_cpu_matches_the_cpu_mask(tmp_path):
    """The template's logic, thread by thread (with the grid's extra threads), is the CPU mask."""
    _, _, header, body = gpu_kernels.kernel_parts("cuda", "dropout_mask")
    source = tmp_path / "emulate.cpp"
    source.write_text(EMULATION.format(header=header, body=body, group=gpu_kernels.ELEMENTWISE_GROUP))
    binary = tmp_path / "emulate"
    build = subprocess.run([CXX, "-std=c++17", "-O1", str(source), "-o", str(binary)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    key = mx.array([123456789, 987654321], dtype=mx.uint32)
    n, p = 3 * 256 + 77, 0.3
    run = subprocess.run([str(binary), "123456789", "987654321", str(p), str(n)], capture_output=True)
    assert run.returncode == 0
    emulated = np.frombuffer(run.stdout, dtype=np.float32)
    expected = np.array(dropout_mask(key, (n,), p))
    assert emulated.shape == expected.shape
    assert np.array_equal(emulated.view(np.uint32), expected.view(np.uint32))


@pytest.mark.gpu
@pytest.mark.skipif(gpu_kernels.gpu_backend() is None, reason="MLX has no GPU here")
def test_gpu_mask_equals_cpu_mask_bit_for_bit():
    key = mx.random.key(31)
    shape = (37, 1029)
    gpu = np.array(dropout_mask(key, shape, 0.1))
    with mx.stream(mx.cpu):
        cpu = np.array(dropout_mask(key, shape, 0.1))
    assert np.array_equal(gpu.view(np.uint32), cpu.view(np.uint32))
