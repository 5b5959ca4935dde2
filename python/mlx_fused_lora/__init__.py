"""mlx-fused-lora: a fused, differentiable LoRA linear op for MLX and the layers on it.

The public names load lazily (PEP 562): ``import mlx_fused_lora`` does not import
``mlx.core``, so a script or the CLI can still switch MLX's CPU matmuls to OpenBLAS
(:mod:`mlx_fused_lora.fast_blas`, which must run before ``mlx.core`` loads) after
importing the package. ``MLX_FUSED_LORA_FAST_BLAS=1`` switches it on here, at import.
The first public name used imports the extension, which fails fast on an MLX/nanobind
mismatch.
"""

from importlib import import_module

from . import fast_blas

fast_blas.enable_from_environment()

# public name -> the submodule that defines it
_LAZY = {
    "fused_lora_linear": ".ops",
    "fused_qlora_linear": ".ops",
    "fused_lora_onto": ".ops",
    "dropout_mask": ".ops",
    "FusedLoRALinear": ".layers",
    "FusedDoRALinear": ".layers",
    "FusedLoRASwitchLinear": ".layers",
    "linear_to_lora_layers": ".layers",
    "patch_mlx_lm": ".lm_lora",
    "_ext": "._extension",
}

__all__ = [
    "fused_lora_linear",
    "fused_qlora_linear",
    "fused_lora_onto",
    "dropout_mask",
    "FusedLoRALinear",
    "FusedDoRALinear",
    "FusedLoRASwitchLinear",
    "linear_to_lora_layers",
    "patch_mlx_lm",
]


def __getattr__(name):
    if name == "__version__":  # read on first use: importlib.metadata is ~40 modules to load
        from importlib.metadata import version

        globals()[name] = version("mlx-fused-lora")  # the one place it is written is pyproject.toml
        return globals()[name]
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
