"""Loads the C++ extension and refuses, at import time, an MLX it was not built for.

A nanobind or MLX mismatch otherwise imports fine and fails at the first call with
an opaque ``TypeError: incompatible function arguments``; here it fails at once and
says what to install.
"""

import mlx.core as mx  # first: the extension's array type lives in MLX's nanobind domain

from .fast_blas import prepare_openblas_environment

# OpenBLAS reads its settings when it loads: here, with the extension below, unless
# fast_blas loaded it earlier (it prepares the same environment first).
prepare_openblas_environment()

_FIX = "pip install --force-reinstall --no-cache-dir mlx-fused-lora with mlx=={v} installed ('mlx[cpu]=={v}' on Linux)"
# MLX's CUDA build: mlx-cuda-* and mlx-cpu write the same mlx/lib/libmlx.so, so this
# package is built without build isolation and without deps (README, "On a GPU").
_CUDA_FIX = (
    "pip install '{dist}=={v}' and rebuild this package against it: pip install --force-reinstall "
    "--no-cache-dir --no-build-isolation --no-deps mlx-fused-lora (README, 'On a GPU')"
)


def _mlx_builds():
    """The MLX builds installed on Linux (mlx-cpu, mlx-cuda-12, mlx-cuda-13), by pip."""
    from importlib import metadata

    return [d for d in ("mlx-cpu", "mlx-cuda-12", "mlx-cuda-13") if _installed(metadata, d)]


def _installed(metadata, dist):
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def _requirement(version, builds=None):
    """The pip requirement of MLX `version` in the build found (CUDA, CPU or macOS)."""
    cuda = [b for b in (_mlx_builds() if builds is None else builds) if b.startswith("mlx-cuda")]
    if cuda:
        return f"'mlx=={version}' '{cuda[-1]}=={version}' (MLX's CUDA build, without mlx-cpu)"
    return f"'mlx[cpu]=={version}' (Linux) or 'mlx=={version}' (macOS)"


def _fix(version, builds=None):
    """What to run so the extension loads with the MLX found, for the MLX build found."""
    builds = _mlx_builds() if builds is None else builds
    cuda = [b for b in builds if b.startswith("mlx-cuda")]
    if cuda and "mlx-cpu" in builds:
        return (
            f"{' and '.join(builds)} are all installed and overwrite each other's libmlx.so: "
            f"pip uninstall -y mlx-cpu, then {_CUDA_FIX.format(dist=cuda[-1], v=version)}"
        )
    if cuda:
        return _CUDA_FIX.format(dist=cuda[-1], v=version)
    return _FIX.format(v=version)


try:
    from . import _ext
except ImportError as e:  # pragma: no cover - depends on a broken install
    raise ImportError(
        f"mlx_fused_lora's C++ extension failed to load ({e}). It must be built against "
        f"the installed mlx ({mx.__version__}): {_fix(mx.__version__)}"
    ) from e

if mx.__version__ != _ext.mlx_version:
    raise ImportError(
        f"mlx_fused_lora was built against mlx=={_ext.mlx_version} but mlx=={mx.__version__} "
        f"is installed: pip install {_requirement(_ext.mlx_version)}, or rebuild: {_fix(mx.__version__)}"
    )

try:  # builds a graph node, evaluates nothing: proves the bindings accept MLX arrays
    _ext.dropout_mask(mx.zeros((2,), dtype=mx.uint32), [1], 0.0, mx.float32, stream=mx.cpu)
except TypeError as e:  # pragma: no cover - depends on a broken install
    raise ImportError(
        f"mlx_fused_lora's extension does not accept this mlx's arrays ({e}); it was built "
        f"with a different nanobind than mlx {mx.__version__} embeds: {_fix(mx.__version__)}"
    ) from e
