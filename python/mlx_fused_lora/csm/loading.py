"""Load and save CSM checkpoints (safetensors + config.json) in any of the three layouts.

The layouts and their key names are in `layouts`. ``load_csm`` reads every weights file,
detects the layout, renames to this package's names, checks every tensor (known key,
shape, floating dtype, finite values) before building the model, and undoes the hf q/k
permutation; ``save_csm`` writes one layout. Keys that carry no weights are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..layers.tree import lora_layers
from .config import FLAVORS, CSMConfig, LlamaFlavor
from .layouts import (
    HF_TIED_AUDIO,
    HF_TOP,
    IGNORED_KEYS,
    LAYER_RE,
    LAYOUTS,
    CheckpointError,
    detect_layout,
    from_native,
    permute_rows_from_hf,
    permute_rows_to_hf,
    qk_heads,
    to_native,
)
from .model import CSM

__all__ = [
    "infer_config",
    "load_csm",
    "save_csm",
]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Files in a checkpoint directory that are adapters, not model weights.
_ADAPTER_FILES = {"adapters.safetensors", "adapter_model.safetensors", "fine_tuned_model.safetensors"}


# -- reading --


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    files = sorted(p for p in path.glob("*.safetensors") if p.name not in _ADAPTER_FILES)
    if not files:
        raise FileNotFoundError(f"no *.safetensors model weights in {path}")
    return files


def _read_weights(path: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in _weight_files(path):
        try:
            part = mx.load(str(f))
        except (RuntimeError, ValueError) as e:  # MLX's parse errors are RuntimeErrors
            raise CheckpointError(f"cannot read {f}: {e}") from None
        clash = set(part) & set(weights)
        if clash:
            raise CheckpointError(f"keys {sorted(clash)[:5]} appear in more than one file ({f})")
        weights.update(part)
    return weights


def _read_config(path: Path) -> CSMConfig | None:
    cfg_path = (path if path.is_dir() else path.parent) / CONFIG_FILE
    if not cfg_path.exists():
        return None
    with open(cfg_path) as f:
        return CSMConfig.from_dict(json.load(f))


def infer_config(native: dict[str, mx.array]) -> CSMConfig:
    """Config from tensor shapes, matching each stack to a registered flavour.

    Shapes fix layers, width, MLP width and kv width but not the head count, hence the
    lookup in `FLAVORS`; a checkpoint of another shape needs its config.json.
    """

    def stack_flavor(stack: str) -> LlamaFlavor:
        idx = {int(m.group(2)) for k in native if (m := LAYER_RE.match(k)) and m.group(1) == stack}
        try:
            q = native[f"{stack}.layers.0.self_attn.q_proj.weight"]
            kv = native[f"{stack}.layers.0.self_attn.k_proj.weight"]
            mlp = native[f"{stack}.layers.0.mlp.gate_proj.weight"]
        except KeyError as e:
            raise CheckpointError(f"cannot infer the {stack} shape: missing {e.args[0]}") from None
        for _name, flavor in FLAVORS.items():
            head_dim = flavor.head_dim
            if (
                flavor.num_layers == len(idx)
                and flavor.embed_dim == q.shape[1]
                and flavor.intermediate_dim == mlp.shape[0]
                and flavor.num_kv_heads * head_dim == kv.shape[0]
            ):
                return flavor
        raise CheckpointError(
            f"{stack}: {len(idx)} layers, width {q.shape[1]}, MLP {mlp.shape[0]}, kv width "
            f"{kv.shape[0]} matches no known flavour ({sorted(FLAVORS)}); pass config= or put "
            "a config.json next to the weights"
        )

    backbone, decoder = stack_flavor("backbone"), stack_flavor("decoder")

    def name_of(f):
        return next((n for n, v in FLAVORS.items() if v == f), f)

    try:
        return CSMConfig(
            backbone_flavor=name_of(backbone),
            decoder_flavor=name_of(decoder),
            text_vocab_size=native["text_embeddings.weight"].shape[0],
            audio_vocab_size=native["codebook0_head.weight"].shape[0],
            audio_num_codebooks=native["audio_head"].shape[0] + 1,
        )
    except KeyError as e:
        raise CheckpointError(f"cannot infer the config: missing {e.args[0]}") from None


def _to_native_weights(weights: dict[str, mx.array], layout: str) -> tuple[dict, list[str]]:
    """Rename to native keys; returns (native weights, unknown layout keys)."""
    ignored = IGNORED_KEYS[layout]
    native: dict[str, mx.array] = {}
    unknown: list[str] = []
    source: dict[str, str] = {}
    for key, value in weights.items():
        if layout == "hf" and key == HF_TIED_AUDIO:
            continue
        if ignored.search(key):
            continue
        name = to_native(key, layout)
        if name is None:
            unknown.append(key)
        else:
            native[name] = value
            source[name] = key
    if layout == "hf" and HF_TIED_AUDIO in weights:
        tied = weights[HF_TIED_AUDIO]
        own = native.get("audio_embeddings.weight")
        if own is None:
            native["audio_embeddings.weight"] = tied
        elif own.shape != tied.shape or not mx.array_equal(own, tied).item():
            raise CheckpointError(
                f"{HF_TOP['audio_embeddings.weight']} and {HF_TIED_AUDIO} differ; CSM ties "
                "them (one audio embedding table), so this checkpoint cannot be loaded exactly"
            )
    return native, unknown


def _value_problems(native: dict[str, mx.array], layout: str) -> list[str]:
    """Tensors that are not floating point, or hold NaN/inf, named in ``layout``'s keys."""
    problems = [
        f"dtype of {from_native(k, layout)} is {str(v.dtype).rsplit('.', 1)[-1]}; expected a floating-point dtype"
        for k, v in native.items()
        if not mx.issubdtype(v.dtype, mx.floating)
    ]
    floating = {k: v for k, v in native.items() if mx.issubdtype(v.dtype, mx.floating)}
    finite = {k: mx.all(mx.isfinite(v)) for k, v in floating.items()}
    mx.eval(list(finite.values()))
    problems += [
        f"non-finite values (NaN or inf) in {from_native(k, layout)}" for k, f in finite.items() if not f.item()
    ]
    return problems


def load_csm(
    path: str | Path,
    dtype: mx.Dtype | None = None,
    config: CSMConfig | None = None,
    layout: str | None = None,
) -> CSM:
    """Load a CSM from a safetensors file or a directory of them (plus ``config.json``).

    The layout (torchtune / mlx / hf) is detected from the keys unless given; the config
    comes from ``config`` if given, else ``config.json`` beside the weights (the original
    five arguments, or a Transformers ``CsmConfig``), else is inferred from the shapes.
    ``dtype`` casts floating-point weights (None keeps the checkpoint's dtypes).

    Raises `CheckpointError` (a ValueError) naming any unknown key, missing key (in the
    checkpoint's own layout), shape mismatch (key, expected, actual), tensor that is not
    floating point (an int32 table would be silently cast), or tensor holding NaN/inf —
    all checked before the model is built.
    """
    path = Path(path)
    weights = _read_weights(path)
    layout = layout or detect_layout(weights)
    native, unknown = _to_native_weights(weights, layout)
    if config is None:
        config = _read_config(path) or infer_config(native)
    model = CSM(config)
    expected = dict(tree_flatten(model.parameters()))

    problems = []
    unknown += [from_native(k, layout) for k in native if k not in expected]
    if unknown:
        problems.append(f"unknown keys ({layout} layout): {sorted(unknown)}")
    missing = [from_native(k, layout) for k in expected if k not in native]
    if missing:
        problems.append(f"missing keys ({layout} layout): {missing}")
    for k, v in native.items():
        if k in expected and v.shape != expected[k].shape:
            problems.append(
                f"shape mismatch for {from_native(k, layout)}: expected "
                f"{tuple(expected[k].shape)}, got {tuple(v.shape)}"
            )
    problems += _value_problems({k: v for k, v in native.items() if k in expected}, layout)
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit the model:\n  " + "\n  ".join(problems))

    loaded = []
    for k, v in native.items():
        if layout == "hf" and (heads := qk_heads(k, config)) is not None:
            v = permute_rows_from_hf(v, heads)
        if dtype is not None and mx.issubdtype(v.dtype, mx.floating):
            v = v.astype(dtype)
        loaded.append((k, v))
    model.update(tree_unflatten(loaded))
    mx.eval(model.parameters())
    model.checkpoint_layout = layout
    return model


# -- writing --


def save_csm(model: CSM, path: str | Path, layout: str | None = None) -> Path:
    """Write ``model`` as safetensors + ``config.json`` in ``layout``.

    ``layout`` defaults to ``model.checkpoint_layout``: the layout it was loaded from, or
    torchtune for a new model. ``path`` is a directory (``model.safetensors`` is written
    in it) or a ``.safetensors`` file (``config.json`` goes beside it). A model with LoRA
    layers is refused: merge (`merge_lora`) or save the adapters (`save_adapters`).
    Returns the weights file's path.
    """
    layout = layout or getattr(model, "checkpoint_layout", "torchtune")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
    adapted = [name for name, _ in lora_layers(model)]
    if adapted:
        raise ValueError(
            f"model has LoRA layers ({adapted[0]}, ...): merge them with merge_lora(model) "
            "or save them with save_adapters; save_csm writes base weights only"
        )
    config = model.config
    out: dict[str, mx.array] = {}
    for k, v in tree_flatten(model.parameters()):
        if to_native(k, "mlx") is None:
            raise ValueError(f"parameter {k} has no name in the {layout} layout")
        if layout == "hf" and (heads := qk_heads(k, config)) is not None:
            v = permute_rows_to_hf(v, heads)
        key = from_native(k, layout)
        if layout == "hf" and k == "audio_embeddings.weight":
            # Transformers ties this table to the depth decoder's and stores it there.
            key = HF_TIED_AUDIO
        out[key] = v
    path = Path(path)
    if path.suffix == ".safetensors":
        weights_path, cfg_path = path, path.parent / CONFIG_FILE
    else:
        weights_path, cfg_path = path / WEIGHTS_FILE, path / CONFIG_FILE
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mx.save_safetensors(str(weights_path), out, metadata={"format": "mlx" if layout == "mlx" else "pt"})
    except RuntimeError as e:  # MLX reports an unwritable file as a RuntimeError
        raise OSError(f"cannot write {weights_path}: {e}") from None
    cfg = config.to_hf_dict() if layout == "hf" else config.to_dict()
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return weights_path
