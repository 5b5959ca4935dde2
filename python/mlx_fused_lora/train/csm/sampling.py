"""A speech sample from a (fine-tuned) CSM: a WAV through Mimi, or the Mimi codes as .npy."""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx
import numpy as np

from .data import DataSpec, Segment, frame_turn

__all__ = ["write_sample"]

log = logging.getLogger(__name__)


def write_sample(
    model,
    tokenizer,
    spec: DataSpec,
    text: str,
    output_path: str | Path,
    *,
    codec=None,
    max_frames: int = 125,
    temperature: float = 0.9,
    top_k: int = 50,
    seed: int = 0,
    adapters=None,
) -> Path:
    """Generate speech for ``text`` as speaker ``spec.speaker_id``; returns the file written.

    With a ``codec`` (`audio.MimiCodec`) the codes are decoded to a 24 kHz WAV at
    ``output_path``; without one the codes ``[codebooks, frames]`` go to ``.npy`` beside it.
    ``adapters``: the named adapters to speak with (`csm.generate`); None: the model's.
    """
    from ...csm import generate

    speaker = spec.speaker_id
    tokens, mask, _ = frame_turn(Segment(text, speaker, np.zeros((spec.num_codebooks, 0), np.int32)), tokenizer, spec)
    # frame_turn appends an end-of-audio frame; a prompt ends with its text rows
    n_text = int(mask[:, -1].sum())
    tokens, mask = tokens[:n_text], mask[:n_text]
    limit = model.config.backbone.max_seq_len - n_text
    codes = generate(
        model,
        mx.array(tokens)[None],
        mx.array(mask)[None],
        min(max_frames, limit),
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        adapters=adapters,
    )
    codes = np.array(codes[0]).T  # [codebooks, frames]
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    if codec is not None:
        from .audio import SAMPLE_RATE, write_wav

        return write_wav(output_path, codec.decode(codes), SAMPLE_RATE)
    codes_path = output_path.with_suffix(".npy")
    np.save(codes_path, codes)
    log.info("no codec (--codec-path): wrote the sample's Mimi codes to %s", codes_path)
    return codes_path
