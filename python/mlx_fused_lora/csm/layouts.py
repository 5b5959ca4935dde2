"""CSM checkpoint key layouts: tensor names in each layout, renaming, the hf q/k permutation.

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

import re

from .config import CSMConfig

__all__ = [
    "LAYOUTS",
    "CheckpointError",
    "detect_layout",
    "to_native",
    "from_native",
    "permute_rows_to_hf",
    "permute_rows_from_hf",
    "qk_heads",
]

LAYOUTS = ("torchtune", "mlx", "hf")


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
HF_TOP = {
    "text_embeddings.weight": "embed_text_tokens.weight",
    "audio_embeddings.weight": "backbone_model.embed_tokens.embed_audio_tokens.weight",
    "projection.weight": "depth_decoder.model.inputs_embeds_projector.weight",
    "codebook0_head.weight": "lm_head.weight",
    "audio_head": "depth_decoder.codebooks_head.weight",
}
_HF_TOP_INV = {v: k for k, v in HF_TOP.items()}
HF_TIED_AUDIO = "depth_decoder.model.embed_tokens.weight"
_NATIVE_TOP = set(HF_TOP)

LAYER_RE = re.compile(r"^(backbone|decoder)\.layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^(backbone_model|depth_decoder\.model)\.layers\.(\d+)\.(.+)$")

IGNORED_KEYS = {
    "hf": re.compile(r"^codec_model\.|\.rotary_emb\.inv_freq$"),
    "torchtune": re.compile(r"_causal_mask$|\.kv_cache\.|\.pos_embeddings\."),
    "mlx": re.compile(r"$^"),  # nothing
}


# -- key renaming --


def to_native(key: str, layout: str) -> str | None:
    """This package's name for ``key`` of ``layout``; None if the key has no counterpart."""
    if layout == "mlx":
        m = LAYER_RE.match(key)
        if m:
            return key if m.group(3) in _NATIVE_LAYER else None
        if key in ("backbone.norm.weight", "decoder.norm.weight") or key in _NATIVE_TOP:
            return key
        return None
    if layout == "torchtune":
        m = LAYER_RE.match(key)
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
    m = LAYER_RE.match(key)
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
        return HF_TOP[key]
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
