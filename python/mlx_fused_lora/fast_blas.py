"""Switches all of MLX's CPU matmuls on Linux from its bundled reference BLAS to OpenBLAS.

MLX's Linux CPU wheel leaves ``cblas_sgemm``/``cblas_dgemm``/``cblas_cgemm`` to the netlib
reference BLAS it ships (a few GFLOP/s). The package builds a small shared library,
``libmlx_fused_lora_blas.so`` (``csrc/blas_forward/``), that exports those three names and
forwards them to the OpenBLAS of ``scipy-openblas32``, which the package already depends
on. Loaded with ``RTLD_GLOBAL`` *before* ``mlx.core`` is imported, it is what ``libmlx.so``
binds to; once ``mlx.core`` is loaded its bindings are fixed, so :func:`enable` then does
nothing and says so once. MLX's LAPACK (``mx.linalg``) is untouched: it keeps the bundled
LAPACK, which calls the bundled BLAS through other (Fortran) names.

Three ways to turn it on, all before ``mlx.core`` is imported anywhere:

- ``import mlx_fused_lora.fast_blas as fb; fb.enable()`` first thing in a script
  (``import mlx_fused_lora`` alone does not import ``mlx.core``);
- ``MLX_FUSED_LORA_FAST_BLAS=1`` in the environment: ``import mlx_fused_lora`` enables it;
- the ``mlx-fused-lora`` command and ``python -m mlx_fused_lora.lm_lora`` enable it by
  default; ``--no-fast-blas`` or ``MLX_FUSED_LORA_FAST_BLAS=0`` turns that off.

The variable takes any on/off spelling (``1/0``, ``true/false``, ``yes/no``, ``on/off``, any
case; `env_switch`); anything else keeps the default and warns once.

:func:`active_blas` says which BLAS MLX's CPU matmuls run on. On macOS MLX uses Accelerate
and all of this is a no-op; on a GPU only MLX's CPU stream is affected.
"""

import ctypes
import os
import sys
import warnings
from pathlib import Path

from .env_switch import switch

ENV_VAR = "MLX_FUSED_LORA_FAST_BLAS"
CLI_FLAG = "--no-fast-blas"
LIBRARY_NAME = "libmlx_fused_lora_blas.so"
REFERENCE_BLAS = "mlx bundled reference BLAS (netlib)"

_library = None  # the loaded forwarder (ctypes.CDLL) once enable() succeeded
_warned = False  # enable() warns at most once per process
_probed = None  # active_blas()'s answer once mlx.core is loaded (bindings cannot change then)


def prepare_openblas_environment():
    """Environment OpenBLAS reads once, when it loads; call before anything loads it.

    The fused op alternates between the BLAS's threads (the big GEMMs) and its own
    workers (the masked rank-r passes). OpenBLAS's threads busy-wait after each GEMM by
    default, taking the cores those workers need: measured here, that doubled the
    rank-r passes' time. Let them sleep at once. A value the user set is kept.
    """
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def _warn_once(message):
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _find_library():
    package = sys.modules[__package__]  # its __path__ lists the installed tree first
    for directory in package.__path__:
        candidate = Path(directory) / LIBRARY_NAME
        if candidate.is_file():
            return candidate
    return None


def enable():
    """Route MLX's CPU matmuls to OpenBLAS; call before ``mlx.core`` is imported.

    Returns True when the forwarder is loaded (also on a repeated call), False where it
    does nothing: not Linux, ``mlx.core`` already imported (warns once, saying what to
    do), or the forwarder library missing or unable to load OpenBLAS (warns once).
    """
    global _library
    if not sys.platform.startswith("linux"):
        return False  # macOS: MLX already uses Accelerate
    if _library is not None:
        return True
    if "mlx.core" in sys.modules:
        _warn_once(
            "mlx_fused_lora.fast_blas.enable() did nothing: mlx.core was imported first and "
            "MLX's matmuls stay on its reference BLAS. Call it before anything imports "
            f"mlx.core (mlx_lm, mlx.nn, ...), or set {ENV_VAR}=1 and import mlx_fused_lora first."
        )
        return False
    path = _find_library()
    if path is None:
        _warn_once(f"mlx_fused_lora.fast_blas: {LIBRARY_NAME} is not installed; reinstall mlx-fused-lora")
        return False
    prepare_openblas_environment()  # the forwarder loads OpenBLAS just below
    library = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
    for name, restype in (
        ("mfl_blas_forward_error", ctypes.c_char_p),
        ("mfl_blas_forward_config", ctypes.c_char_p),
        ("mfl_blas_forward_calls", ctypes.c_ulonglong),
    ):
        getattr(library, name).restype = restype
    error = library.mfl_blas_forward_error()
    if error is not None:
        _warn_once(f"mlx_fused_lora.fast_blas: the forwarder cannot load OpenBLAS ({error.decode()})")
        return False
    # Checked first, made global second: a forwarder without OpenBLAS never becomes visible.
    ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
    _library = library
    return True


def is_enabled():
    """Whether :func:`enable` loaded the forwarder in this process."""
    return _library is not None


def _openblas_name():
    """E.g. ``openblas (scipy-openblas32 0.3.30.0.1: DYNAMIC_ARCH NO_AFFINITY Haswell MAX_THREADS=64)``."""
    # Imported here, not at the top: importlib.metadata brings ~40 modules (email, zipfile,
    # csv, ...) that every process would otherwise load, and tear down at exit.
    from importlib.metadata import PackageNotFoundError, version

    try:
        wheel = f"scipy-openblas32 {version('scipy-openblas32')}"
    except PackageNotFoundError:  # pragma: no cover - a dependency on Linux
        wheel = "scipy-openblas32"
    config = _library.mfl_blas_forward_config().decode().split()  # "OpenBLAS <version> <build flags>"
    return f"openblas ({wheel}: {' '.join(config[2:])})"


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _preloaded_cblas():
    """The file of a ``cblas_sgemm`` in the global scope other than the forwarder, or None.

    MLX's own libraries load privately (RTLD_LOCAL), so a global ``cblas_sgemm`` is one
    loaded ahead of ``libmlx.so`` (``LD_PRELOAD`` or an RTLD_GLOBAL load) that MLX binds.
    """
    process = ctypes.CDLL(None)
    try:
        symbol = process.cblas_sgemm
    except AttributeError:
        return None
    info = _DlInfo()
    if not process.dladdr(ctypes.cast(symbol, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
        return "an unknown library"
    name = Path(info.dli_fname.decode()).name
    return None if name == LIBRARY_NAME else name


def _probe():
    """One tiny CPU matmul: did it go through the forwarder?"""
    import mlx.core as mx

    before = _library.mfl_blas_forward_calls()
    a = mx.ones((8, 8), dtype=mx.float32)
    mx.eval(mx.matmul(a, a, stream=mx.cpu))
    return _library.mfl_blas_forward_calls() > before


def active_blas():
    """Which BLAS MLX's CPU matmuls run on: ``"openblas (scipy-openblas32 ...)"``, or :data:`REFERENCE_BLAS`.

    Once ``mlx.core`` is loaded the answer is measured: a tiny CPU matmul must go through
    the forwarder. Before that it says what MLX will use, given what was enabled.
    """
    global _probed
    if sys.platform == "darwin":
        return "accelerate (macOS)"
    if not sys.platform.startswith("linux"):
        return "unknown"
    if "mlx.core" not in sys.modules:
        return _openblas_name() if _library is not None else REFERENCE_BLAS
    if _probed is None:
        preloaded = _preloaded_cblas()
        if _library is not None and _probe():
            _probed = _openblas_name()
        elif preloaded is not None:
            _probed = f"{preloaded} (loaded ahead of mlx)"
        else:
            _probed = REFERENCE_BLAS
    return _probed


def enable_from_environment():
    """``import mlx_fused_lora`` calls this: ``MLX_FUSED_LORA_FAST_BLAS=1`` (or true, yes, on) enables it."""
    if switch(ENV_VAR, default=False):
        enable()


def enable_for_cli(argv):
    """The command line's default: on unless ``--no-fast-blas`` or ``MLX_FUSED_LORA_FAST_BLAS=0`` (or false, no, off).

    Returns ``argv`` without the flag (accepted before or after the subcommand, so
    subcommands never see it).
    """
    rest = [arg for arg in argv if arg != CLI_FLAG]
    # Quietly off where a caller (a test, a notebook) already loaded mlx.core: enable()
    # could only warn there, and the commands report active_blas() themselves.
    if len(rest) == len(argv) and switch(ENV_VAR, default=True) and "mlx.core" not in sys.modules:
        enable()
    return rest
