"""CSM configuration: the original model's five arguments plus the Llama flavours.

`CSMConfig(backbone_flavor, decoder_flavor, text_vocab_size, audio_vocab_size,
audio_num_codebooks)` mirrors the `ModelArgs` of Sesame's reference implementation; a
flavour names one of the `FLAVORS` below (or is a `LlamaFlavor` given inline, which is how
configs read from a Hugging Face `config.json`, and the tiny test configs, are carried).

The two real flavours (torchtune's `llama3_2` builder as Sesame calls it):

=============  ======  =====  ========  =====  ========  =========================
flavour        layers  dim    heads/kv  MLP    norm eps  RoPE
=============  ======  =====  ========  =====  ========  =========================
``llama-1B``   16      2048   32 / 8    8192   1e-5      base 500000, llama3 x32
``llama-100M`` 4       1024   8 / 2     8192   1e-5      base 500000, llama3 x32
=============  ======  =====  ========  =====  ========  =========================

llama3 RoPE scaling as torchtune applies it: factor 32, low_freq_factor 1,
high_freq_factor 4, original context 8192. (Hugging Face's CSM config writes the same
scaling as factor 32, low 0.125, high 0.5, original 1024: both give wavelength thresholds
8192 and 2048 and the same smoothing ramp, so the frequencies are identical.)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RopeScaling", "LlamaFlavor", "CSMConfig", "FLAVORS", "LLAMA3_SCALING"]


@dataclass(frozen=True)
class RopeScaling:
    """llama3 frequency scaling (see `model.llama3_rope_frequencies`)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


LLAMA3_SCALING = RopeScaling()


@dataclass(frozen=True)
class LlamaFlavor:
    """Shape of one Llama stack (no token embedding, no output head: CSM owns those)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    rope_scaling: RopeScaling | None = LLAMA3_SCALING

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if (self.embed_dim // self.num_heads) % 2:
            raise ValueError(f"head_dim {self.embed_dim // self.num_heads} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaFlavor:
        d = dict(d)
        scaling = d.get("rope_scaling")
        if isinstance(scaling, Mapping):
            d["rope_scaling"] = RopeScaling(**scaling)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown LlamaFlavor fields {sorted(unknown)}")
        return cls(**d)


FLAVORS: dict[str, LlamaFlavor] = {
    "llama-1B": LlamaFlavor(num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192),
    "llama-100M": LlamaFlavor(num_layers=4, num_heads=8, num_kv_heads=2, embed_dim=1024, intermediate_dim=8192),
    # Test-sized stacks; the head dims (16 and 8) still cover every llama3 scaling branch.
    "tiny-backbone": LlamaFlavor(
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        intermediate_dim=128,
        max_seq_len=256,
    ),
    "tiny-decoder": LlamaFlavor(
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=32,
        intermediate_dim=64,
        max_seq_len=64,
    ),
}


FlavorLike = str | LlamaFlavor


def _resolve_flavor(flavor: FlavorLike, role: str) -> LlamaFlavor:
    if isinstance(flavor, LlamaFlavor):
        return flavor
    if isinstance(flavor, Mapping):
        return LlamaFlavor.from_dict(flavor)
    try:
        return FLAVORS[flavor]
    except KeyError:
        raise ValueError(f"unknown {role} flavour {flavor!r}; known: {sorted(FLAVORS)}") from None


@dataclass
class CSMConfig:
    """The original `ModelArgs`: flavours by name (or inline `LlamaFlavor`), vocab sizes.

    Frames fed to the model have ``audio_num_codebooks + 1`` columns (33 for CSM-1B):
    columns ``0..audio_num_codebooks-1`` are audio codebooks, the last is the text token.
    """

    backbone_flavor: FlavorLike = "llama-1B"
    decoder_flavor: FlavorLike = "llama-100M"
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051
    audio_num_codebooks: int = 32
    backbone: LlamaFlavor = field(init=False, repr=False)
    decoder: LlamaFlavor = field(init=False, repr=False)

    def __post_init__(self):
        self.backbone = _resolve_flavor(self.backbone_flavor, "backbone")
        self.decoder = _resolve_flavor(self.decoder_flavor, "decoder")
        if self.audio_num_codebooks < 2:
            raise ValueError(f"audio_num_codebooks must be >= 2, got {self.audio_num_codebooks}")
        if self.audio_num_codebooks > self.decoder.max_seq_len - 1:
            raise ValueError(
                f"decoder max_seq_len {self.decoder.max_seq_len} is too short for {self.audio_num_codebooks} codebooks"
            )

    @classmethod
    def csm_1b(cls) -> CSMConfig:
        return cls("llama-1B", "llama-100M", 128_256, 2051, 32)

    @classmethod
    def tiny(cls, text_vocab_size: int = 64, audio_vocab_size: int = 24, audio_num_codebooks: int = 8) -> CSMConfig:
        """A few-hundred-thousand-parameter config for tests (same structure as CSM-1B)."""
        return cls("tiny-backbone", "tiny-decoder", text_vocab_size, audio_vocab_size, audio_num_codebooks)

    @property
    def frame_width(self) -> int:
        return self.audio_num_codebooks + 1

    # -- the original CLI's config.json (PyTorchModelHubMixin writes the five arguments) --

    def to_dict(self) -> dict:
        def flavor_value(flavor: FlavorLike, resolved: LlamaFlavor):
            if isinstance(flavor, str) and FLAVORS.get(flavor) == resolved:
                return flavor
            return resolved.to_dict()

        return {
            "backbone_flavor": flavor_value(self.backbone_flavor, self.backbone),
            "decoder_flavor": flavor_value(self.decoder_flavor, self.decoder),
            "text_vocab_size": self.text_vocab_size,
            "audio_vocab_size": self.audio_vocab_size,
            "audio_num_codebooks": self.audio_num_codebooks,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CSMConfig:
        """Read the original five-argument dict or a Hugging Face `CsmConfig` dict."""
        if "backbone_flavor" in d:
            keys = ("backbone_flavor", "decoder_flavor", "text_vocab_size", "audio_vocab_size", "audio_num_codebooks")
            missing = [k for k in keys if k not in d]
            if missing:
                raise KeyError(f"config is missing {missing}")
            return cls(**{k: d[k] for k in keys})
        if "depth_decoder_config" in d:
            return cls.from_hf_dict(d)
        raise ValueError(
            "config.json is neither the original CSM ModelArgs (backbone_flavor, ...) nor a "
            f"Hugging Face CsmConfig (depth_decoder_config, ...); keys: {sorted(d)}"
        )

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> CSMConfig:
        """Build from Transformers' `CsmConfig` dict (backbone fields at top level)."""
        dec = d["depth_decoder_config"]
        return cls(
            backbone_flavor=_flavor_from_hf(d, default_max_seq_len=2048),
            decoder_flavor=_flavor_from_hf(dec, default_max_seq_len=33),
            text_vocab_size=int(d.get("text_vocab_size", 128_256)),
            audio_vocab_size=int(d.get("vocab_size", 2051)),
            audio_num_codebooks=int(d.get("num_codebooks", 32)),
        )

    def to_hf_dict(self) -> dict:
        backbone = _flavor_to_hf(self.backbone)
        decoder = _flavor_to_hf(self.decoder)
        decoder.update(
            model_type="csm_depth_decoder_model",
            num_codebooks=self.audio_num_codebooks,
            backbone_hidden_size=self.backbone.embed_dim,
            vocab_size=self.audio_vocab_size,
        )
        return {
            "architectures": ["CsmForConditionalGeneration"],
            "model_type": "csm",
            **backbone,
            "num_codebooks": self.audio_num_codebooks,
            "vocab_size": self.audio_vocab_size,
            "text_vocab_size": self.text_vocab_size,
            "depth_decoder_config": decoder,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _flavor_from_hf(d: Mapping[str, Any], default_max_seq_len: int) -> LlamaFlavor:
    # transformers >= 5 writes `rope_parameters` (theta inside); older writes
    # `rope_theta` + `rope_scaling`.
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = rope.get("rope_theta", d.get("rope_theta", 500_000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type == "default":
        scaling = None
    else:
        raise ValueError(f"unsupported rope_type {rope_type!r} (expected 'llama3' or 'default')")
    num_heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    head_dim = d.get("head_dim")
    if head_dim is not None and int(head_dim) * num_heads != hidden:
        raise ValueError(f"head_dim {head_dim} x heads {num_heads} != hidden_size {hidden}")
    return LlamaFlavor(
        num_layers=int(d["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(d.get("num_key_value_heads", num_heads)),
        embed_dim=hidden,
        intermediate_dim=int(d["intermediate_size"]),
        max_seq_len=int(d.get("max_position_embeddings", default_max_seq_len)),
        norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        rope_base=float(theta),
        rope_scaling=scaling,
    )


def _flavor_to_hf(f: LlamaFlavor) -> dict:
    rope: dict[str, Any] = {"rope_theta": f.rope_base}
    if f.rope_scaling is None:
        rope["rope_type"] = "default"
    else:
        rope.update(rope_type="llama3", **dataclasses.asdict(f.rope_scaling))
    return {
        "hidden_size": f.embed_dim,
        "intermediate_size": f.intermediate_dim,
        "num_hidden_layers": f.num_layers,
        "num_attention_heads": f.num_heads,
        "num_key_value_heads": f.num_kv_heads,
        "head_dim": f.head_dim,
        "max_position_embeddings": f.max_seq_len,
        "rms_norm_eps": f.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_parameters": rope,
    }
