"""Sesame's Conversational Speech Model (CSM) in MLX.

Structure (parameter names are this module's, which are also the "mlx" checkpoint layout;
see `loading.py` for the torchtune and Hugging Face names):

- ``backbone``: a Llama stack (``layers.{i}.self_attn.{q,k,v,o}_proj``,
  ``layers.{i}.mlp.{gate,up,down}_proj``, ``layers.{i}.input_layernorm``,
  ``layers.{i}.post_attention_layernorm``, ``norm``) with no token embedding and no head.
- ``decoder``: a smaller Llama stack of the same form.
- ``text_embeddings``: ``[text_vocab, D_backbone]``.
- ``audio_embeddings``: ``[audio_vocab * codebooks, D_backbone]``; codebook ``k``'s token
  ``c`` is row ``c + k * audio_vocab``.
- ``projection``: ``D_backbone -> D_decoder`` (no bias).
- ``codebook0_head``: ``D_backbone -> audio_vocab`` (no bias).
- ``audio_head``: ``[codebooks - 1, D_decoder, audio_vocab]``; entry ``k - 1`` maps the
  decoder state to codebook ``k``'s logits, ``logits = h @ audio_head[k - 1]``.

Llama blocks: pre-norm RMSNorm (eps 1e-5), grouped-query attention with RoPE applied to
q and k, SwiGLU MLP ``down(silu(gate(x)) * up(x))``, final RMSNorm. RoPE is the
*interleaved* (GPT-J, "traditional") form torchtune uses: dimensions ``(2i, 2i+1)`` of a
head rotate together by ``pos * inv_freq[i]``, with llama3-scaled inverse frequencies.

Frames are ``[B, T, codebooks + 1]`` (33 columns for CSM-1B): columns ``0..codebooks-1``
are audio codes, the last is a text token; the mask of the same shape says which columns
are present. The backbone input of a frame is the masked sum of its column embeddings.
A frame whose mask is all zero is padding: it is excluded as an attention key (so left
or right padding leaves the other frames' hidden states unchanged).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..layers.mixed import mapped_ids
from .config import CSMConfig, LlamaFlavor, RopeScaling

__all__ = [
    "llama3_rope_frequencies",
    "RotaryEmbedding",
    "KVCache",
    "StackCache",
    "Attention",
    "MLP",
    "TransformerBlock",
    "LlamaStack",
    "CSM",
]


def llama3_rope_frequencies(head_dim: int, base: float, scaling: RopeScaling | None) -> mx.array:
    """Inverse frequencies ``[head_dim // 2]`` (radians per position), llama3-scaled.

    ``inv_freq[i] = base ** (-2i / head_dim)``; with scaling, a component whose wavelength
    ``2*pi / inv_freq`` exceeds ``original / low_freq_factor`` is divided by ``factor``, one
    below ``original / high_freq_factor`` is kept, and one in between is interpolated with
    ``s = (original / wavelength - low) / (high - low)``:
    ``(1 - s) * inv_freq / factor + s * inv_freq``. Computed in float64 then stored float32.
    """
    inv = [base ** (-(2 * i) / head_dim) for i in range(head_dim // 2)]
    if scaling is not None:
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        scaled = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                scaled.append(f)
            elif wavelen > low_wavelen:
                scaled.append(f / scaling.factor)
            else:
                s = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
                    scaling.high_freq_factor - scaling.low_freq_factor
                )
                scaled.append((1 - s) * f / scaling.factor + s * f)
        inv = scaled
    return mx.array(inv, dtype=mx.float32)


class RotaryEmbedding(nn.Module):
    """Interleaved RoPE over ``[B, H, T, head_dim]`` starting at position ``offset``."""

    def __init__(self, head_dim: int, base: float, scaling: RopeScaling | None):
        super().__init__()
        self.head_dim = head_dim
        # mx.fast.rope takes periods (1 / inv_freq); the leading underscore keeps it out
        # of the parameters.
        self._periods = 1.0 / llama3_rope_frequencies(head_dim, base, scaling)

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(
            x,
            self.head_dim,
            traditional=True,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._periods,
        )


class KVCache:
    """Keys/values ``[B, H_kv, S, head_dim]`` of one attention layer, grown by concatenation."""

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def offset(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        return self.keys, self.values


class StackCache:
    """The caches of every layer of one stack, plus which cached positions are real frames.

    ``valid`` is ``[B, S]`` bool (None: every cached position is valid).
    """

    def __init__(self, num_layers: int):
        self.layers = [KVCache() for _ in range(num_layers)]
        self.valid: mx.array | None = None

    @property
    def offset(self) -> int:
        return self.layers[0].offset


MaskLike = None | str | mx.array


class Attention(nn.Module):
    def __init__(self, flavor: LlamaFlavor):
        super().__init__()
        self.num_heads = flavor.num_heads
        self.num_kv_heads = flavor.num_kv_heads
        self.head_dim = flavor.head_dim
        self.scale = self.head_dim**-0.5
        dim = flavor.embed_dim
        self.q_proj = nn.Linear(dim, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, dim, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, flavor.rope_base, flavor.rope_scaling)

    def __call__(self, x: mx.array, mask: MaskLike = None, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        offset = 0 if cache is None else cache.offset
        q = self.rope(q, offset)
        k = self.rope(k, offset)
        if cache is not None:
            k, v = cache.update(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, flavor: LlamaFlavor):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(flavor.embed_dim, eps=flavor.norm_eps)
        self.self_attn = Attention(flavor)
        self.post_attention_layernorm = nn.RMSNorm(flavor.embed_dim, eps=flavor.norm_eps)
        self.mlp = MLP(flavor.embed_dim, flavor.intermediate_dim)

    def __call__(self, x, mask: MaskLike = None, cache: KVCache | None = None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaStack(nn.Module):
    """Llama layers + final norm over already-embedded inputs ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, flavor: LlamaFlavor):
        super().__init__()
        self.flavor = flavor
        self.layers = [TransformerBlock(flavor) for _ in range(flavor.num_layers)]
        self.norm = nn.RMSNorm(flavor.embed_dim, eps=flavor.norm_eps)

    def make_cache(self) -> StackCache:
        return StackCache(len(self.layers))

    def __call__(self, h: mx.array, mask: MaskLike = None, cache: StackCache | None = None):
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, None if cache is None else cache.layers[i])
        return self.norm(h)


def _frame_attention_mask(valid_keys: mx.array, num_queries: int) -> mx.array:
    """Causal mask ``[B, 1, Tq, S]`` over keys that are real frames (padding excluded).

    Queries are the last ``num_queries`` of the ``S`` key positions. Each query may always
    see itself, so a padding query gets a finite (ignored) output instead of NaN.
    """
    S = valid_keys.shape[1]
    q_pos = mx.arange(S - num_queries, S)[:, None]
    k_pos = mx.arange(S)[None, :]
    causal = k_pos <= q_pos
    allowed = (causal[None] & valid_keys[:, None, :]) | (k_pos == q_pos)[None]
    return allowed[:, None]


class CSM(nn.Module):
    """CSM-1B-shaped model; see the module docstring for the parameter layout."""

    def __init__(self, config: CSMConfig):
        super().__init__()
        self.config = config
        # Which checkpoint layout `save_csm` writes; `load_csm` sets it to the one it read.
        self.checkpoint_layout = "torchtune"
        bb, dec = config.backbone, config.decoder
        V, K = config.audio_vocab_size, config.audio_num_codebooks
        self.backbone = LlamaStack(bb)
        self.decoder = LlamaStack(dec)
        self.text_embeddings = nn.Embedding(config.text_vocab_size, bb.embed_dim)
        self.audio_embeddings = nn.Embedding(V * K, bb.embed_dim)
        self.projection = nn.Linear(bb.embed_dim, dec.embed_dim, bias=False)
        self.codebook0_head = nn.Linear(bb.embed_dim, V, bias=False)
        self.audio_head = 0.02 * mx.random.normal((K - 1, dec.embed_dim, V))

    # -- embeddings --

    def embed_audio(self, codebook: int, codes: mx.array) -> mx.array:
        """Embeddings ``[..., D_backbone]`` of codebook ``codebook``'s codes ``[...]``."""
        return self.audio_embeddings(codes + codebook * self.config.audio_vocab_size)

    def embed_frames(self, tokens: mx.array, mask: mx.array) -> mx.array:
        """Masked sum over the frame's columns: ``[B, T, K+1]`` -> ``[B, T, D_backbone]``."""
        K, V = self.config.audio_num_codebooks, self.config.audio_vocab_size
        _check_frames(tokens, mask, K + 1)
        audio = self.audio_embeddings(tokens[..., :K] + mx.arange(K) * V)
        text = self.text_embeddings(tokens[..., K])[..., None, :]
        embeds = mx.concatenate([audio, text], axis=-2)
        return (embeds * mask[..., None].astype(embeds.dtype)).sum(axis=-2)

    # -- forward --

    def __call__(self, tokens: mx.array, mask: mx.array, cache: StackCache | None = None) -> mx.array:
        """Backbone hidden states ``[B, T, D_backbone]`` of frames ``tokens``/``mask``.

        Causal over frames; all-zero-mask (padding) frames are not attended to. With a
        ``cache`` (from ``self.backbone.make_cache()``) the frames continue the cached ones.
        """
        h = self.embed_frames(tokens, mask)
        valid = mask.astype(mx.bool_).any(axis=-1)
        if cache is not None:
            if cache.valid is not None:
                valid = mx.concatenate([cache.valid, valid], axis=1)
            cache.valid = valid
        attn_mask = _frame_attention_mask(valid, tokens.shape[1])
        return self.backbone(h, attn_mask, cache)

    def decoder_logits(self, decoder_h: mx.array, codebook: int) -> mx.array:
        """Codebook ``codebook`` (>= 1) logits from decoder states ``[..., D_decoder]``."""
        return decoder_h @ self.audio_head[codebook - 1]

    def codebook_logits(self, h: mx.array, codes: mx.array) -> mx.array:
        """Teacher-forced logits ``[B, T, K, audio_vocab]`` for frames ``codes [B, T, K]``.

        ``h[:, t]`` is the backbone state that predicts frame ``codes[:, t]`` (the caller
        shifts: usually ``h`` of frames ``0..T-2`` against codes of frames ``1..T-1``).
        Codebook 0 is ``codebook0_head(h[:, t])``; codebook ``k >= 1`` is read at position
        ``k`` of the decoder run (causal, positions from 0) over
        ``projection([h[:, t], emb_0(codes[:, t, 0]), ..., emb_{K-2}(codes[:, t, K-2])])``.
        To train the decoder on a subset of frames, slice ``h`` and ``codes`` first.
        """
        B, T, D = h.shape
        K, V = self.config.audio_num_codebooks, self.config.audio_vocab_size
        if codes.shape != (B, T, K):
            raise ValueError(f"codes shape {tuple(codes.shape)} != expected {(B, T, K)}")
        c0 = self.codebook0_head(h)
        prev = self.audio_embeddings(codes[..., : K - 1] + mx.arange(K - 1) * V)
        seq = mx.concatenate([h[:, :, None, :], prev.astype(h.dtype)], axis=2)
        with mapped_ids([self.projection, self.decoder], lambda ids: _ids_per_frame(ids, T)):
            dec = self.decoder(self.projection(seq.reshape(B * T, K, D)), "causal")
        # position k of the decoder run predicts codebook k with audio_head[k - 1]
        rest = dec[:, 1:, :].transpose(1, 0, 2) @ self.audio_head
        rest = rest.transpose(1, 0, 2).reshape(B, T, K - 1, V)
        return mx.concatenate([c0[:, :, None, :], rest.astype(c0.dtype)], axis=2)


def _ids_per_frame(ids: mx.array, frames: int) -> mx.array:
    """A mixed batch's ids (one per sequence) for the decoder, which runs one sequence per frame."""
    if ids.ndim != 1:
        raise ValueError(
            f"CSM: a mixed batch's adapter_ids must be one per sequence, shape (B,), got {tuple(ids.shape)}: "
            "the decoder runs a sequence per frame, on a subset of the frames in training"
        )
    return mx.repeat(ids, frames)


def _check_frames(tokens: mx.array, mask: mx.array, width: int) -> None:
    if tokens.ndim != 3 or tokens.shape[-1] != width:
        raise ValueError(f"tokens must be [B, T, {width}], got {tuple(tokens.shape)}")
    if mask.shape != tokens.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != tokens shape {tuple(tokens.shape)}")
