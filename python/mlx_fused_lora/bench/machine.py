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
