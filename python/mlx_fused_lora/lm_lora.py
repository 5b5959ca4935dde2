"""mlx-lm's LoRA trainer and CLI on fused layers.

``python -m mlx_fused_lora.lm_lora --model ... --train --data ...`` takes exactly
``mlx_lm.lora``'s arguments; every linear layer mlx-lm would wrap in its
``LoRALinear`` becomes a ``FusedLoRALinear`` instead, and with ``--fine-tune-type dora``
every ``DoRALinear`` a ``FusedDoRALinear`` (same parameter names, so adapters are
interchangeable with plain mlx-lm's). It needs mlx-lm: ``pip install "mlx-fused-lora[lm]"``.
"""

import sys

if __name__ == "__main__":  # `python -m`: MLX's matmuls on OpenBLAS, before .layers loads mlx.core
    from .fast_blas import enable_for_cli

    sys.argv[1:] = enable_for_cli(sys.argv[1:])

from .layers import FusedLoRALinear  # noqa: E402
from .layers.fused_dora_linear import FusedDoRALinear  # noqa: E402
from .layers.tree import lora_layers  # noqa: E402

INSTALL_HINT = 'pip install "mlx-fused-lora[lm]"'

# Every name mlx-lm 0.32 builds or checks its LoRA layers by (its tuner sources): the
# classes linear_to_lora_layers builds and remove_lora_layers checks (looked up in
# mlx_lm.tuner.utils), and the modules they are defined in, whose from_base builds by
# that module's own name and which mlx-lm's tests and many scripts import.
PATCHED_NAMES = (
    ("mlx_lm.tuner.utils", "LoRALinear"),
    ("mlx_lm.tuner.utils", "DoRALinear"),
    ("mlx_lm.tuner.lora", "LoRALinear"),
    ("mlx_lm.tuner.dora", "DoRALinear"),
)


class _StandIn(type):
    """The class a patched name holds: calling it (or its ``from_base``) builds our layer,
    and ``isinstance`` accepts ours and mlx-lm's own, so code that checks for mlx-lm's
    class (``remove_lora_layers``) still finds layers built before the patch."""

    def __instancecheck__(cls, obj):
        return isinstance(obj, cls.accepts)

    def __subclasscheck__(cls, sub):
        return issubclass(sub, cls.accepts)


def _stand_in(ours, theirs):
    def new(cls, *args, **kwargs):
        return ours(*args, **kwargs)

    namespace = {
        "__new__": new,
        "from_base": staticmethod(ours.from_base),
        "accepts": (ours, theirs),
        "original": theirs,
        "__doc__": f"mlx-lm's {theirs.__name__} name, building {ours.__name__} (mlx_fused_lora.patch_mlx_lm).",
        "__module__": theirs.__module__,
    }
    # A subclass of ours for its attributes (dir, MagicMock(spec=...)), never instantiated.
    return _StandIn(theirs.__name__, (ours,), namespace)


def _import_mlx_lm_tuner():
    try:
        import mlx_lm.tuner.dora
        import mlx_lm.tuner.lora
        import mlx_lm.tuner.utils  # noqa: F401  (sys.modules holds them)
    except ImportError as e:
        raise ImportError(f"this needs mlx-lm (not importable: {e}): {INSTALL_HINT}") from None
    return sys.modules


def patch_mlx_lm():
    """Make mlx-lm build FusedLoRALinear (FusedDoRALinear) wherever it would build its
    LoRALinear (DoRALinear).

    Replaces each name of `PATCHED_NAMES` (``mlx_lm.tuner.utils.LoRALinear``,
    ``mlx_lm.tuner.lora.LoRALinear``, the DoRA pair) with a stand-in whose constructor and
    ``from_base`` build ours and which ``isinstance`` matches against ours and mlx-lm's
    own: mlx-lm's ``linear_to_lora_layers`` (used by its trainer, ``load_adapters`` and
    ``fuse``) builds fused layers, its ``remove_lora_layers`` unwraps both kinds. A
    script that imported the class itself before the patch keeps mlx-lm's. Idempotent;
    returns ``mlx_lm.tuner.utils``.
    """
    modules = _import_mlx_lm_tuner()
    for module, name in PATCHED_NAMES:
        current = getattr(modules[module], name)
        if isinstance(current, _StandIn):
            continue
        ours = FusedDoRALinear if name == "DoRALinear" else FusedLoRALinear
        setattr(modules[module], name, _stand_in(ours, current))
    return modules["mlx_lm.tuner.utils"]


def unpatch_mlx_lm():
    """Undo `patch_mlx_lm`: mlx-lm's own classes under every patched name again."""
    for module, name in PATCHED_NAMES:
        current = getattr(sys.modules.get(module), name, None)
        if isinstance(current, _StandIn):
            setattr(sys.modules[module], name, current.original)


def _report_fused_layers(lora_module):
    """Wrap mlx_lm.lora's linear_to_lora_layers to say, once per call, which fused layers it built."""
    convert = lora_module.linear_to_lora_layers
    if getattr(convert, "reports_fused_layers", False):
        return

    def linear_to_lora_layers(model, *args, **kwargs):
        result = convert(model, *args, **kwargs)
        counts = {}
        for _, layer in lora_layers(model):
            counts[type(layer).__name__] = counts.get(type(layer).__name__, 0) + 1
        fused = {k: v for k, v in counts.items() if k.startswith("Fused")}
        kinds = ", ".join(f"{n} {k} in place of mlx-lm's {k[len('Fused') :]}" for k, n in fused.items())
        print(f"fused LoRA layers: {kinds or 'none'}", flush=True)
        return result

    linear_to_lora_layers.reports_fused_layers = True
    lora_module.linear_to_lora_layers = linear_to_lora_layers


def main(argv=None):
    """Run mlx_lm.lora's CLI on fused layers; ``argv`` defaults to ``sys.argv[1:]``."""
    patch_mlx_lm()
    from mlx_lm import lora

    _report_fused_layers(lora)
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
    try:
        main()
    except ImportError as e:  # no mlx-lm: one line saying what to install
        print(f"python -m mlx_fused_lora.lm_lora: {e}", file=sys.stderr)
        sys.exit(1)
