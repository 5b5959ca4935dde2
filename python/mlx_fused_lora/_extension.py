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

try:
    from . import _ext
except ImportError as e:  # pragma: no cover - depends on a broken install
    raise ImportError(
        f"mlx_fused_lora's C++ extension failed to load ({e}). It must be built against "
        f"the installed mlx ({mx.__version__}): {_FIX.format(v=mx.__version__)}"
    ) from e

if mx.__version__ != _ext.mlx_version:
    raise ImportError(
        f"mlx_fused_lora was built against mlx=={_ext.mlx_version} but mlx=={mx.__version__} "
        f"is installed: pip install 'mlx[cpu]=={_ext.mlx_version}' (Linux) or "
        f"'mlx=={_ext.mlx_version}' (macOS), or rebuild: {_FIX.format(v=mx.__version__)}"
    )

try:  # builds a graph node, evaluates nothing: proves the bindings accept MLX arrays
    _ext.dropout_mask(mx.zeros((2,), dtype=mx.uint32), [1], 0.0, mx.float32, stream=mx.cpu)
except TypeError as e:  # pragma: no cover - depends on a broken install
    raise ImportError(
        f"mlx_fused_lora's extension does not accept this mlx's arrays ({e}); it was built "
        f"with a different nanobind than mlx {mx.__version__} embeds: {_FIX.format(v=mx.__version__)}"
    ) from e
