"""Installing against MLX's CUDA build: the import error says what to run for the MLX
build found (tests/test_gpu_op_opencl.py covers the kernels; nothing here needs a GPU)."""

import importlib
import re
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_fused_lora import _extension

README = Path(__file__).parents[1] / "README.md"


def test_the_fix_names_the_mlx_build_found():
    cpu = _extension._fix("0.32.4", ["mlx-cpu"])
    assert "'mlx[cpu]==0.32.4'" in cpu and "--no-deps" not in cpu
    cuda = _extension._fix("0.32.4", ["mlx-cuda-13"])
    assert "'mlx-cuda-13==0.32.4'" in cuda and "--no-build-isolation --no-deps" in cuda and "mlx[cpu]" not in cuda
    both = _extension._fix("0.32.4", ["mlx-cpu", "mlx-cuda-12"])
    assert both.startswith("mlx-cpu and mlx-cuda-12 are all installed") and "pip uninstall -y mlx-cpu" in both
    assert "mlx-cuda-13==0.32.4" in _extension._requirement("0.32.4", ["mlx-cuda-13"])


def test_a_version_mismatch_fails_at_import_saying_what_to_install(monkeypatch):
    from importlib import metadata

    def version(dist):  # pip sees MLX's CUDA build only
        if dist in ("mlx-cpu", "mlx-cuda-12"):
            raise metadata.PackageNotFoundError(dist)
        return "0.32.4"

    monkeypatch.setattr(mx, "__version__", "0.99.0")
    monkeypatch.setattr(metadata, "version", version)
    with pytest.raises(ImportError, match="built against mlx==0.32.4 but mlx==0.99.0") as error:
        importlib.reload(_extension)
    assert "'mlx-cuda-13==0.32.4'" in str(error.value) and "--no-build-isolation --no-deps" in str(error.value)
    monkeypatch.undo()
    importlib.reload(_extension)  # the real MLX loads again


def test_readme_documents_one_cuda_install_command():
    section = README.read_text().split("## On a GPU", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"pip install [^\n]*", section)
    assert any("mlx[cuda13]==0.32.4" in c for c in commands)
    assert any("--no-build-isolation --no-deps" in c for c in commands)
    assert not any("mlx[cpu]" in c for c in commands)
