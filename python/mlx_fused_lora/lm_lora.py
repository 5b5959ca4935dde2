"""mlx-lm's LoRA trainer and CLI on fused layers, and preference training (DPO, ORPO) beside it.

``python -m mlx_fused_lora.lm_lora --model ... --train --data ...`` takes exactly
``mlx_lm.lora``'s arguments; every linear layer mlx-lm would wrap in its
``LoRALinear`` becomes a ``FusedLoRALinear`` instead, every mixture-of-experts
``LoRASwitchLinear`` a ``FusedLoRASwitchLinear``, and with ``--fine-tune-type dora`` every
``DoRALinear`` a ``FusedDoRALinear`` (same parameter names, so adapters are interchangeable
with plain mlx-lm's). It needs mlx-lm: ``pip install "mlx-fused-lora[lm]"``.

Beyond mlx-lm's arguments it takes PEFT's ``--init-lora-weights``, ``--rank-pattern`` and
``--alpha-pattern`` (or those keys in the config file's ``lora_parameters``, where mlx-lm keeps
its LoRA settings and where they are saved), ``--rank-schedule`` (a rank that grows during
training, `layers.growth`) and ``--convert-to-lora`` (a PiSSA / OLoRA adapter written as plain
LoRA of the original weights). While the command runs, mlx-lm's ``linear_to_lora_layers`` is
ours (`layers.convert`, which reads those keys), also for ``--test``'s ``load_adapters``.

``--train-mode`` (mlx-lm-lora's flag, on the command line or as ``train_mode`` in the ``-c``
file) picks the trainer: ``sft`` (the default) is mlx-lm's, exactly as without the flag;
``dpo`` and ``orpo`` are `train.preference` on the generic loop (`train.preference.cli`).
"""

import contextlib
import json
import sys
from functools import partial
from pathlib import Path

if __name__ == "__main__":  # `python -m`: MLX's matmuls on OpenBLAS, before .layers loads mlx.core
    from .fast_blas import enable_for_cli

    sys.argv[1:] = enable_for_cli(sys.argv[1:])

from .layers import FusedLoRALinear, linear_to_lora_layers  # noqa: E402
from .layers.fused_dora_linear import FusedDoRALinear  # noqa: E402
from .layers.fused_lora_switch_linear import FusedLoRASwitchLinear  # noqa: E402
from .layers.growth import RankSchedule, adapter_rank, growing, rank_schedule  # noqa: E402
from .layers.init import check_init  # noqa: E402
from .layers.patterns import check_patterns  # noqa: E402
from .layers.tree import lora_layers  # noqa: E402

INSTALL_HINT = 'pip install "mlx-fused-lora[lm]"'

# Every name mlx-lm 0.32 builds or checks its LoRA layers by (its tuner sources): the
# classes linear_to_lora_layers builds and remove_lora_layers checks (looked up in
# mlx_lm.tuner.utils), and the modules they are defined in, whose from_base builds by
# that module's own name and which mlx-lm's tests and many scripts import.
PATCHED_NAMES = (
    ("mlx_lm.tuner.utils", "LoRALinear"),
    ("mlx_lm.tuner.utils", "DoRALinear"),
    ("mlx_lm.tuner.utils", "LoRASwitchLinear"),
    ("mlx_lm.tuner.lora", "LoRALinear"),
    ("mlx_lm.tuner.lora", "LoRASwitchLinear"),
    ("mlx_lm.tuner.dora", "DoRALinear"),
)
FUSED = {"LoRALinear": FusedLoRALinear, "DoRALinear": FusedDoRALinear, "LoRASwitchLinear": FusedLoRASwitchLinear}


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
    """Make mlx-lm build FusedLoRALinear (FusedDoRALinear, FusedLoRASwitchLinear) wherever it
    would build its LoRALinear (DoRALinear, LoRASwitchLinear).

    Replaces each name of `PATCHED_NAMES` (``mlx_lm.tuner.utils.LoRALinear``,
    ``mlx_lm.tuner.lora.LoRALinear``, the DoRA and mixture-of-experts pairs) with a
    stand-in whose constructor and ``from_base`` build ours and which ``isinstance`` matches against ours and mlx-lm's
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
        setattr(modules[module], name, _stand_in(FUSED[name], current))
    return modules["mlx_lm.tuner.utils"]


def unpatch_mlx_lm():
    """Undo `patch_mlx_lm`: mlx-lm's own classes under every patched name again."""
    for module, name in PATCHED_NAMES:
        current = getattr(sys.modules.get(module), name, None)
        if isinstance(current, _StandIn):
            setattr(sys.modules[module], name, current.original)


def _reporting(convert):
    """``convert`` (a ``linear_to_lora_layers``) saying, once per call, which fused layers it built."""

    def linear_to_lora_layers(model, *args, **kwargs):
        result = convert(model, *args, **kwargs)
        counts = {}
        for _, layer in lora_layers(model):
            counts[type(layer).__name__] = counts.get(type(layer).__name__, 0) + 1
        fused = {k: v for k, v in counts.items() if k.startswith("Fused")}
        kinds = ", ".join(f"{n} {k} in place of mlx-lm's {k[len('Fused') :]}" for k, n in fused.items())
        print(f"fused LoRA layers: {kinds or 'none'}", flush=True)
        return result

    return linear_to_lora_layers


OPTIONS = ("init_lora_weights", "rank_pattern", "alpha_pattern")  # kept in lora_parameters, as mlx-lm keeps its own


def _add_options(build_parser):
    """mlx-lm's ``build_parser`` with this package's options added (defaults None, as mlx-lm's
    own, so a config file can give them)."""

    def build():
        from .train.cli_args import add_start_and_growth_flags

        parser = build_parser()
        add_start_and_growth_flags(
            parser.add_argument_group("mlx-fused-lora: how the adapters start and grow"), config_defaults=True
        )
        return parser

    return build


def _lora_parameters(args) -> dict:
    """mlx-lm's ``lora_parameters`` (a copy: its default dict is shared) with this package's
    options moved in from the command line, checked; returns it."""
    params = dict(args.lora_parameters or {})
    for key in OPTIONS:
        value = getattr(args, key, None)
        if value is not None:
            params[key] = value if key == "init_lora_weights" else dict(value)
        if hasattr(args, key):
            delattr(args, key)  # saved once, in lora_parameters
    init = check_init(params.pop("init_lora_weights", True), "--init-lora-weights")
    if init is not True:
        params["init_lora_weights"] = init
    check_patterns(params.get("rank_pattern"), params.get("alpha_pattern"), "--rank-pattern / --alpha-pattern")
    return params


def _schedule(args, params) -> RankSchedule | None:
    if getattr(args, "rank_schedule", None) is None:
        return None
    init = params.get("init_lora_weights", True)
    return rank_schedule(args.rank_schedule, params.get("rank", 8), init, params.get("rank_pattern"))


def _growing(iterate_batches, grow, accumulation: int):
    """mlx-lm's ``iterate_batches`` that runs ``grow(step)`` (`layers.growth.growing`) before the
    first training batch of each optimizer step: a growth changes shapes, so mlx-lm's compiled
    step traces again then, and only then."""

    def batches(*args, **kwargs):
        if not kwargs.get("loop", False):  # validation and test batches
            yield from iterate_batches(*args, **kwargs)
            return
        for i, batch in enumerate(iterate_batches(*args, **kwargs)):
            if i % accumulation == 0:
                grow(i // accumulation)
            yield batch

    return batches


def _train_growing(train, schedule, seed, *args, model, optimizer, iterate_batches=None, **kwargs):
    from mlx_lm.tuner import trainer

    grow = growing(model, schedule, optimizer, seed=seed, say=partial(print, flush=True))
    batches = _growing(iterate_batches or trainer.iterate_batches, grow, kwargs["args"].grad_accumulation_steps)
    return train(*args, model=model, optimizer=optimizer, iterate_batches=batches, **kwargs)


def _train_model(lora_module, train_model):
    """mlx-lm's ``train_model`` with this package's options: into ``lora_parameters`` before the
    layers are built; a rank schedule around mlx-lm's ``train``; afterwards the saved config's
    rank made the grown one, and ``--convert-to-lora``."""

    def run(args, model, *rest, **kwargs):
        args.lora_parameters = params = _lora_parameters(args)
        schedule = _schedule(args, params)
        train = lora_module.train
        if schedule is not None:
            lora_module.train = partial(_train_growing, train, schedule, args.seed)
        try:
            result = train_model(args, model, *rest, **kwargs)
        finally:
            lora_module.train = train
        adapter_path = Path(args.adapter_path)
        if schedule is not None:
            config = json.loads((adapter_path / "adapter_config.json").read_text())
            config["lora_parameters"]["rank"] = adapter_rank(model)  # the file's tensors have the grown rank
            (adapter_path / "adapter_config.json").write_text(json.dumps(config, indent=4))
        if getattr(args, "convert_to_lora", None):
            from .adapters import save_adapters

            save_adapters(model, adapter_path, "mlx-lm", convert_to_lora=True)
            init = params.get("init_lora_weights")  # save_adapters refused any init it cannot convert
            print(f"wrote {adapter_path}: the {init} adapter as plain LoRA of the original weights", flush=True)
        return result

    return run


@contextlib.contextmanager
def _our_lora_options(lora_module):
    """While the command runs: mlx-lm's parser with our options, its ``linear_to_lora_layers``
    ours (in ``mlx_lm.lora`` and in ``mlx_lm.tuner.utils``, which its ``load_adapters`` uses),
    its ``train_model`` taking our options."""
    utils = sys.modules["mlx_lm.tuner.utils"]
    saved = [
        (lora_module, n, getattr(lora_module, n)) for n in ("build_parser", "linear_to_lora_layers", "train_model")
    ]
    saved.append((utils, "linear_to_lora_layers", utils.linear_to_lora_layers))
    lora_module.build_parser = _add_options(lora_module.build_parser)
    lora_module.linear_to_lora_layers = _reporting(linear_to_lora_layers)
    utils.linear_to_lora_layers = linear_to_lora_layers
    lora_module.train_model = _train_model(lora_module, lora_module.train_model)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


PREFERENCE_MODES = ("dpo", "orpo")


def train_mode(argv) -> tuple[str, list[str]]:
    """``(mode, argv for its trainer)``: ``--train-mode`` from the command line, else the ``-c``
    file's ``train_mode``, else ``sft``; the flag is taken out of what mlx-lm's parser gets."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --train is mlx-lm's own flag
    pre.add_argument("--train-mode", default=None)
    pre.add_argument("-c", "--config", default=None)
    known, rest = pre.parse_known_args(argv)
    mode = known.train_mode
    if mode is None and known.config is not None:
        try:
            import yaml

            with open(known.config) as f:
                config = yaml.safe_load(f)
            mode = config.get("train_mode") if isinstance(config, dict) else None
        except (OSError, ValueError):  # the trainer's own parser says what is wrong with the file
            mode = None
    mode = str(mode or "sft")
    if mode in PREFERENCE_MODES:
        return mode, list(argv)
    if mode != "sft":
        choices = ", ".join(("sft", *PREFERENCE_MODES))
        raise SystemExit(
            f"python -m mlx_fused_lora.lm_lora: error: argument --train-mode: expected one of {choices}, got {mode!r}"
        )
    config = ["-c", known.config] if known.config is not None else []
    return mode, config + rest


def main(argv=None):
    """Run mlx_lm.lora's CLI on fused layers (or, with ``--train-mode dpo|orpo``, preference
    training); ``argv`` defaults to ``sys.argv[1:]``."""
    mode, argv = train_mode(list(sys.argv[1:] if argv is None else argv))
    if mode in PREFERENCE_MODES:
        from .train.preference.cli import main as preference_main

        return preference_main(argv)
    patch_mlx_lm()
    from mlx_lm import lora

    with _our_lora_options(lora):
        # mlx_lm.lora.main() parses sys.argv; lend it argv and give the caller's back.
        saved = sys.argv
        sys.argv = [saved[0] if saved else "mlx_fused_lora.lm_lora", *argv]
        try:
            return lora.main()
        finally:
            sys.argv = saved


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ImportError as e:  # no mlx-lm: one line saying what to install
        print(f"python -m mlx_fused_lora.lm_lora: {e}", file=sys.stderr)
        sys.exit(1)
