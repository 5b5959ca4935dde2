"""Flag plumbing for the training commands: one-line errors, each default shown once, a YAML config file, range checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from .plan import finite_float32

__all__ = [
    "OneLineErrorParser",
    "DefaultsOnceFormatter",
    "pattern_entry",
    "add_start_and_growth_flags",
    "apply_config_file",
    "need",
    "check_at_least",
    "check_number",
]


class OneLineErrorParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (no usage block) with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


class DefaultsOnceFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help unless the help already states its default
    or there is none to state (None; False for a switch). 0 is a default worth stating."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if not action.option_strings or "default" in text or default in (None, argparse.SUPPRESS) or default is False:
            return text
        if isinstance(default, (list, tuple)):
            shown = " ".join(str(v) for v in default).replace("%", "%%")
            return f"{text} (default: {shown})"
        return text + " (default: %(default)s)"


def pattern_entry(kind):
    """An argparse ``type`` for ``PATTERN=VALUE`` (``v_proj=4``): a (pattern, ``kind``) pair."""

    def parse(text: str):
        key, sep, value = str(text).rpartition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected PATTERN=VALUE (e.g. v_proj=4), got {text!r}")
        try:
            return key, kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{value!r} in {text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None

    parse.__name__ = "PATTERN=VALUE"
    return parse


def add_start_and_growth_flags(group, *, config_defaults: bool = False) -> None:
    """``--init-lora-weights``, ``--rank-pattern``, ``--alpha-pattern``, ``--rank-schedule`` and
    ``--convert-to-lora``: how an adapter starts and grows, for ``finetune`` and ``lm_lora``
    (``config_defaults``: every default None, so mlx-lm's config file can give them)."""
    group.add_argument(
        "--init-lora-weights",
        default=None if config_defaults else "default",
        help="how the adapter starts, PEFT's init_lora_weights: default (mlx-lm's), gaussian, pissa, pissa_niter_N "
        "(randomized SVD, N iterations), olora, loftq (4-bit base); pissa, olora and loftq replace the adapted "
        "layers' base weights",
    )
    for flag, kind, what in (("--rank-pattern", int, "RANK"), ("--alpha-pattern", float, "ALPHA")):
        group.add_argument(
            flag,
            nargs="+",
            type=pattern_entry(kind),
            default=None,
            metavar=f"PATTERN={what}",
            help=f"other {what.lower()}s for the modules a pattern names (PEFT's {flag[2:].replace('-', '_')}: "
            "v_proj=4 decoder.layers.0.mlp.up_proj=16); a module's scale is its alpha over its rank",
        )
    group.add_argument(
        "--rank-schedule",
        default=None,
        metavar="RANK:STEP,...",
        help="grow the adapter's rank during training, e.g. 16:500,32:2000 (from the adapter's rank at step 0); "
        "the optimizer keeps its state, the new columns start at zero in lora_b, the saved adapter has the final rank",
    )
    group.add_argument(
        "--convert-to-lora",
        action="store_true",
        default=None if config_defaults else False,
        help="with --init-lora-weights pissa or olora: write the adapter as plain LoRA (rank 2r) of the original "
        "weights, which loads anywhere (PEFT's path_initial_model_for_weight_conversion)",
    )


def _convert(parser, action, key: str, value, path: Path):
    def bad(why: str):
        parser.error(f"config file {path}: {key}: {why}")

    if value is None:
        return None
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            bad(f"expected true or false, got {value!r}")
        return value
    if isinstance(value, dict) and getattr(action.type, "accepts_mapping", False):
        try:
            return action.type(value)  # a flag whose value is a mapping in YAML (mlx-lm's lora_parameters)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            bad(str(e))
    if isinstance(value, (dict, list)) or isinstance(value, bool):
        bad(f"expected a single {getattr(action.type, '__name__', 'string')}, got {value!r}")
    kind = action.type or str
    if kind is int and isinstance(value, float) and not value.is_integer():
        bad(f"expected an integer, got {value!r}")
    try:
        out = kind(value) if kind is not str else str(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        bad(f"expected {getattr(kind, '__name__', 'a value')}, got {value!r}")
    if action.choices is not None and out not in action.choices:
        bad(f"expected one of {', '.join(map(str, action.choices))}, got {value!r}")
    return out


def _unique_keys_loader(yaml):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it keeps the last silently)."""

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def apply_config_file(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse ``argv`` with the values of ``-c/--config FILE`` as defaults (flags win).

    Keys are the flags' names, with ``_`` or ``-`` (``lora_r``, ``learning-rate``; a flag's
    other spellings too, e.g. mlx-lm-lora's ``train_type`` for ``--fine-tune-type``); an
    unknown key or a value of the wrong type is an error naming the file and the key.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return parser.parse_args(argv)
    import yaml

    path = Path(known.config)
    try:
        with open(path) as f:  # a stream, so YAML's errors name the file
            data = yaml.load(f, Loader=_unique_keys_loader(yaml))
    except OSError as e:
        parser.error(f"argument -c/--config: cannot read {path}: {e.strerror}")
    except yaml.YAMLError as e:
        parser.error(f"config file {path} is not valid YAML: {e}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        parser.error(f"config file {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    actions = {
        name.lstrip("-").replace("-", "_"): a
        for a in parser._actions
        if a.option_strings and a.dest not in ("help", "config")
        for name in a.option_strings
    }
    defaults, keys = {}, {}
    for key, value in data.items():
        action = actions.get(str(key).replace("-", "_"))
        dest = action.dest if action is not None else None
        if action is None:
            example = next((k for k in actions if "_" in k), next(iter(actions)))
            parser.error(f"config file {path}: unknown key {key!r} (keys are the flags' names, e.g. {example})")
        if dest in keys:  # lora_r and lora-r: which one was meant is not for us to guess
            parser.error(f"config file {path}: keys {keys[dest]!r} and {key!r} both give {action.option_strings[0]}")
        keys[dest] = key
        if action.nargs in ("+", "*"):
            if isinstance(value, dict):  # a pattern map ({v_proj: 4}) as its PATTERN=VALUE flags
                value = [f"{k}={v}" for k, v in value.items()]
            items = value if isinstance(value, list) else [value]
            defaults[dest] = [_convert(parser, action, f"{key}[{i}]", v, path) for i, v in enumerate(items)]
        else:
            defaults[dest] = _convert(parser, action, str(key), value, path)
        action.required = False  # given by the file; the command line may still override it
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def need(parser: argparse.ArgumentParser, ok: bool, flag: str, rule: str, value) -> None:
    """``parser.error`` (one line, exit status 2) naming ``flag``, the ``rule`` and the value, unless ``ok``."""
    if not ok:
        parser.error(f"argument {flag}: must be {rule}, got {value!r}")


def _value(args: argparse.Namespace, flag: str):
    return getattr(args, flag.lstrip("-").replace("-", "_"))


def check_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, low: int, *flags: str) -> None:
    """Each of ``flags`` (unless left None) at least ``low``."""
    for flag in flags:
        v = _value(args, flag)
        if v is not None:
            need(parser, v >= low, flag, f">= {low}", v)


def check_number(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    flag: str,
    low: float,
    *,
    open_low: bool = False,
    high: float | None = None,
    open_high: bool = True,
) -> None:
    """``flag``'s value a finite float32 number in the range the bounds give."""
    v = _value(args, flag)
    ok = finite_float32(v) and (v > low if open_low else v >= low)
    if high is not None:
        ok = ok and (v < high if open_high else v <= high)
    rule = f"a finite (float32) number {'>' if open_low else '>='} {low}"
    if high is not None:
        rule += f" and {'<' if open_high else '<='} {high}"
    need(parser, ok, flag, rule, v)
