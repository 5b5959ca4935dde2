"""mlx-lm's LoRA trainer and CLI on fused layers.

``python -m mlx_fused_lora.lm_lora --model ... --train --data ...`` takes exactly
``mlx_lm.lora``'s arguments; every linear layer mlx-lm would wrap in its
``LoRALinear`` becomes a ``FusedLoRALinear`` instead, and with ``--fine-tune-type dora``
every ``DoRALinear`` a ``FusedDoRALinear`` (same parameter names, so adapters are
interchangeable with plain mlx-lm's).
"""

import sys

if __name__ == "__main__":  # `python -m`: MLX's matmuls on OpenBLAS, before .layers loads mlx.core
    from .fast_blas import enable_for_cli

    sys.argv[1:] = enable_for_cli(sys.argv[1:])

from .layers import FusedLoRALinear  # noqa: E402
from .layers.fused_dora_linear import FusedDoRALinear  # noqa: E402


def patch_mlx_lm():
    """Make mlx-lm build FusedLoRALinear (FusedDoRALinear) wherever it would build its
    LoRALinear (DoRALinear).

    mlx-lm's ``linear_to_lora_layers`` (used by its trainer, ``load_adapters`` and
    ``fuse``) and its ``remove_lora_layers`` look the class up in
    ``mlx_lm.tuner.utils``; replacing it there covers all of them. Idempotent.
    """
    try:
        import mlx_lm.tuner.utils as tuner_utils
    except ImportError as e:
        raise ImportError("patch_mlx_lm needs mlx-lm: pip install mlx-lm") from e
    tuner_utils.LoRALinear = FusedLoRALinear
    tuner_utils.DoRALinear = FusedDoRALinear
    return tuner_utils


def main(argv=None):
    patch_mlx_lm()
    from mlx_lm import lora

    if argv is None:
        return lora.main()
    # mlx_lm.lora.main() parses sys.argv; lend it argv and give the caller's back.
    saved = sys.argv
    sys.argv = [saved[0] if saved else "mlx_fused_lora.lm_lora", *argv]
    try:
        return lora.main()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
