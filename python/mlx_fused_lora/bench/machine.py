"""What a run ran on: the machine, the package versions, the load average."""

import os
import platform
from importlib import metadata

import mlx.core as mx


def machine_info():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = dict(platform=platform.platform(), cpu=cpu, cpu_count=os.cpu_count(), device=str(mx.default_device()))
    try:
        info["device_info"] = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    except Exception:  # older MLX or no device query: the device name is enough
        pass
    return info


def versions():
    found = {"python": platform.python_version()}
    for package in ("mlx", "mlx-fused-lora", "mlx-lm", "numpy", "scipy-openblas32", "matplotlib"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def extension_blas():
    """The BLAS the fused op's GEMMs (and the limit) run on: the one the extension links."""
    import sys

    if sys.platform == "darwin":
        return "accelerate (macOS)"
    try:
        return f"openblas (scipy-openblas32 {metadata.version('scipy-openblas32')})"
    except metadata.PackageNotFoundError:
        return "unknown"


def torch_blas():
    """The BLAS torch's CPU matmuls run on, from its build settings (e.g. "mkl")."""
    import re

    from .peft_peer import import_torch

    match = re.search(r"BLAS_INFO=([^,\s]+)", import_torch().__config__.show())
    return match.group(1) if match else "unknown"


def blas_report(limit_path, with_peft):
    """Which BLAS each kind ran on, measured where it can be (MLX's matmul: fast_blas.active_blas()).

    limit_path: "extension" when the limit runs through the extension's BLAS hook,
    "mlx" when it is MLX's own matmul.
    """
    from .. import fast_blas

    mlx_blas = fast_blas.active_blas() if mx.default_device() == mx.cpu else f"MLX's {mx.default_device()} GEMMs"
    ext_blas = extension_blas() if mx.default_device() == mx.cpu else mlx_blas
    report = dict(
        fused=ext_blas,
        plain_peers=mlx_blas,
        limit=ext_blas if limit_path == "extension" else mlx_blas,
        same_blas=mlx_blas.split(" ")[0] == ext_blas.split(" ")[0],
    )
    if with_peft:
        report["peft"] = f"torch {torch_blas()}"
    return report
