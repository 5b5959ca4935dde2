"""Load and save CSM checkpoints in the three key layouts found in the wild.

Per-layer names (``{s}`` is the stack, ``{i}`` the layer index):

==========================================  ==================================  ===================================================
this package ("mlx", MLX ports)              official torchtune ("torchtune")    Transformers ``CsmForConditionalGeneration`` ("hf")
==========================================  ==================================  ===================================================
``{s}.layers.{i}.self_attn.q_proj.weight``  ``{s}.layers.{i}.attn.q_proj.weight``    ``{S}.layers.{i}.self_attn.q_proj.weight`` (permuted)
``... .self_attn.k_proj.weight``            ``... .attn.k_proj.weight``              ``... .self_attn.k_proj.weight`` (permuted)
``... .self_attn.v_proj.weight``            ``... .attn.v_proj.weight``              same as mlx
``... .self_attn.o_proj.weight``            ``... .attn.output_proj.weight``         same as mlx
``... .mlp.gate_proj.weight``               ``... .mlp.w1.weight``                   same as mlx
``... .mlp.up_proj.weight``                 ``... .mlp.w3.weight``                   same as mlx
``... .mlp.down_proj.weight``               ``... .mlp.w2.weight``                   same as mlx
``... .input_layernorm.weight``             ``... .sa_norm.scale``                   same as mlx
``... .post_attention_layernorm.weight``    ``... .mlp_norm.scale``                  same as mlx
``{s}.norm.weight``                         ``{s}.norm.scale``                       ``{S}.norm.weight``
==========================================  ==================================  ===================================================

with ``{s}`` = ``backbone`` / ``decoder`` and, for hf, ``{S}`` = ``backbone_model`` /
``depth_decoder.model``. Top-level tensors: ``text_embeddings.weight`` (hf:
``embed_text_tokens.weight``), ``audio_embeddings.weight`` (hf:
``backbone_model.embed_tokens.embed_audio_tokens.weight``, tied to and possibly stored only
as ``depth_decoder.model.embed_tokens.weight``), ``projection.weight`` (hf:
``depth_decoder.model.inputs_embeds_projector.weight``), ``codebook0_head.weight`` (hf:
``lm_head.weight``), ``audio_head`` (hf: ``depth_decoder.codebooks_head.weight``).

The hf q/k permutation: Transformers applies RoPE in rotate-half form, so its conversion
reorders each head's q/k output rows from interleaved pairs ``(0,1),(2,3),...`` to
``(0, d/2), (1, d/2+1), ...``: per head, hf row ``j * d/2 + i`` is original row ``2i + j``
(``W.reshape(H, d/2, 2, in).swapaxes(1, 2)``). Loading undoes it, saving redoes it.

Keys that carry no weights are skipped: hf ``codec_model.*`` (the Mimi codec) and
``*.rotary_emb.inv_freq``; torchtune ``*_causal_mask`` and KV-cache/RoPE buffers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..layers.tree import lora_layers
from .config import FLAVORS, CSMConfig, LlamaFlavor
from .model import CSM

__all__ = [
    "LAYOUTS",
    "CheckpointError",
    "detect_layout",
    "to_native",
    "from_native",
    "permute_rows_to_hf",
    "permute_rows_from_hf",
    "load_csm",
    "save_csm",
]

LAYOUTS = ("torchtune", "mlx", "hf")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Files in a checkpoint directory that are adapters, not model weights.
_ADAPTER_FILES = {"adapters.safetensors", "adapter_model.safetensors", "fine_tuned_model.safetensors"}


class CheckpointError(ValueError):
    """A checkpoint does not match the model: names the unknown/missing/mis-shaped keys."""


# native layer suffix -> torchtune layer suffix (hf layer suffixes equal the native ones)
_TORCHTUNE_LAYER = {
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.output_proj.weight",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
    "input_layernorm.weight": "sa_norm.scale",
    "post_attention_layernorm.weight": "mlp_norm.scale",
}
_TORCHTUNE_LAYER_INV = {v: k for k, v in _TORCHTUNE_LAYER.items()}
_NATIVE_LAYER = set(_TORCHTUNE_LAYER)

_HF_STACK = {"backbone": "backbone_model", "decoder": "depth_decoder.model"}
_HF_STACK_INV = {v: k for k, v in _HF_STACK.items()}
_HF_TOP = {
    "text_embeddings.weight": "embed_text_tokens.weight",
    "audio_embeddings.weight": "backbone_model.embed_tokens.embed_audio_tokens.weight",
    "projection.weight": "depth_decoder.model.inputs_embeds_projector.weight",
    "codebook0_head.weight": "lm_head.weight",
    "audio_head": "depth_decoder.codebooks_head.weight",
}
_HF_TOP_INV = {v: k for k, v in _HF_TOP.items()}
_HF_TIED_AUDIO = "depth_decoder.model.embed_tokens.weight"
_NATIVE_TOP = set(_HF_TOP)

_LAYER_RE = re.compile(r"^(backbone|decoder)\.layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^(backbone_model|depth_decoder\.model)\.layers\.(\d+)\.(.+)$")

_IGNORED = {
    "hf": re.compile(r"^codec_model\.|\.rotary_emb\.inv_freq$"),
    "torchtune": re.compile(r"_causal_mask$|\.kv_cache\.|\.pos_embeddings\."),
    "mlx": re.compile(r"$^"),  # nothing
}


# -- key renaming --


def to_native(key: str, layout: str) -> str | None:
    """This package's name for ``key`` of ``layout``; None if the key has no counterpart."""
    if layout == "mlx":
        m = _LAYER_RE.match(key)
        if m:
            return key if m.group(3) in _NATIVE_LAYER else None
        if key in ("backbone.norm.weight", "decoder.norm.weight") or key in _NATIVE_TOP:
            return key
        return None
    if layout == "torchtune":
        m = _LAYER_RE.match(key)
        if m:
            suffix = _TORCHTUNE_LAYER_INV.get(m.group(3))
            return None if suffix is None else f"{m.group(1)}.layers.{m.group(2)}.{suffix}"
        if key in ("backbone.norm.scale", "decoder.norm.scale"):
            return key[: -len("scale")] + "weight"
        return key if key in _NATIVE_TOP else None
    if layout == "hf":
        m = _HF_LAYER_RE.match(key)
        if m:
            if m.group(3) not in _NATIVE_LAYER:
                return None
            return f"{_HF_STACK_INV[m.group(1)]}.layers.{m.group(2)}.{m.group(3)}"
        for stack, hf_stack in _HF_STACK.items():
            if key == f"{hf_stack}.norm.weight":
                return f"{stack}.norm.weight"
        return _HF_TOP_INV.get(key)
    raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")


def from_native(key: str, layout: str) -> str:
    """``layout``'s name for this package's ``key`` (inverse of `to_native`)."""
    m = _LAYER_RE.match(key)
    if layout == "mlx":
        return key
    if layout == "torchtune":
        if m:
            return f"{m.group(1)}.layers.{m.group(2)}.{_TORCHTUNE_LAYER[m.group(3)]}"
        if key.endswith(".norm.weight"):
            return key[: -len("weight")] + "scale"
        return key
    if layout == "hf":
        if m:
            return f"{_HF_STACK[m.group(1)]}.layers.{m.group(2)}.{m.group(3)}"
        if key.endswith(".norm.weight"):
            return f"{_HF_STACK[key.split('.')[0]]}.norm.weight"
        return _HF_TOP[key]
    raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")


def detect_layout(keys) -> str:
    """Tell the layout from the tensor names (see the module docstring)."""
    keys = list(keys)
    if any(k.startswith(("backbone_model.", "depth_decoder.", "embed_text_tokens.", "lm_head.")) for k in keys):
        return "hf"
    if any(".attn." in k or k.endswith("norm.scale") for k in keys):
        return "torchtune"
    if any(".self_attn." in k or k.endswith("layernorm.weight") for k in keys):
        return "mlx"
    raise CheckpointError(
        f"cannot tell the checkpoint layout (torchtune, mlx or hf) from its keys; first keys: {sorted(keys)[:8]}"
    )


# -- the hf q/k row permutation --


def permute_rows_to_hf(w, num_heads: int):
    """Interleaved-pair rows -> rotate-half rows, per head (the hf conversion)."""
    out, rest = w.shape[0], w.shape[1:]
    hd = out // num_heads
    return w.reshape(num_heads, hd // 2, 2, *rest).swapaxes(1, 2).reshape(out, *rest)


def permute_rows_from_hf(w, num_heads: int):
    """Rotate-half rows -> interleaved-pair rows, per head (undoes `permute_rows_to_hf`)."""
    out, rest = w.shape[0], w.shape[1:]
    hd = out // num_heads
    return w.reshape(num_heads, 2, hd // 2, *rest).swapaxes(1, 2).reshape(out, *rest)


_QK_RE = re.compile(r"^(backbone|decoder)\.layers\.\d+\.self_attn\.(q|k)_proj\.weight$")


def qk_heads(native_key: str, config: CSMConfig) -> int | None:
    """Heads that the rows of a q/k weight are split into; None for other keys."""
    m = _QK_RE.match(native_key)
    if not m:
        return None
    flavor = config.backbone if m.group(1) == "backbone" else config.decoder
    return flavor.num_heads if m.group(2) == "q" else flavor.num_kv_heads


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
        part = mx.load(str(f))
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
        idx = {int(m.group(2)) for k in native if (m := _LAYER_RE.match(k)) and m.group(1) == stack}
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
    ignored = _IGNORED[layout]
    native: dict[str, mx.array] = {}
    unknown: list[str] = []
    source: dict[str, str] = {}
    for key, value in weights.items():
        if layout == "hf" and key == _HF_TIED_AUDIO:
            continue
        if ignored.search(key):
            continue
        name = to_native(key, layout)
        if name is None:
            unknown.append(key)
        else:
            native[name] = value
            source[name] = key
    if layout == "hf" and _HF_TIED_AUDIO in weights:
        tied = weights[_HF_TIED_AUDIO]
        own = native.get("audio_embeddings.weight")
        if own is None:
            native["audio_embeddings.weight"] = tied
        elif own.shape != tied.shape or not mx.array_equal(own, tied).item():
            raise CheckpointError(
                f"{_HF_TOP['audio_embeddings.weight']} and {_HF_TIED_AUDIO} differ; CSM ties "
                "them (one audio embedding table), so this checkpoint cannot be loaded exactly"
            )
    return native, unknown


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
    checkpoint's own layout) or shape mismatch (key, expected, actual).
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
            key = _HF_TIED_AUDIO
        out[key] = v
    path = Path(path)
    if path.suffix == ".safetensors":
        weights_path, cfg_path = path, path.parent / CONFIG_FILE
    else:
        weights_path, cfg_path = path / WEIGHTS_FILE, path / CONFIG_FILE
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(weights_path), out, metadata={"format": "mlx" if layout == "mlx" else "pt"})
    cfg = config.to_hf_dict() if layout == "hf" else config.to_dict()
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return weights_path
