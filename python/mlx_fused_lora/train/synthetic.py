"""A synthetic voice dataset written as real files, for the demo and the tests.

`write_synthetic_dataset` writes ``audio/<stem>.npy`` (Mimi-shaped codes
``[codebooks, frames]``), ``transcripts/<stem>.txt`` and ``alignments/<stem>.json`` (word
timings at Mimi's 12.5 frames/s), which the trainer then reads back through the same
data path as real recordings. The codes follow a per-file arithmetic pattern (codebook
``k`` at frame ``t`` is ``(offset + k * stride_k + t * stride_t) mod (V - 1) + 1``), so a
model can learn them and the loss visibly falls.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .audio import FRAME_RATE

__all__ = ["write_synthetic_dataset", "write_random_csm"]

_WORDS = (
    "hello there general voice model speech tiny random frames learn codes fast "
    "sound audio sample tone pitch river stone cloud green quiet bright"
).split()


def write_synthetic_dataset(
    root: str | Path,
    num_files: int = 8,
    num_codebooks: int = 32,
    audio_vocab_size: int = 2051,
    frames: tuple[int, int] = (24, 40),
    words_per_file: tuple[int, int] = (3, 6),
    alignments: bool = True,
    seed: int = 0,
) -> Path:
    """Write the dataset under ``root``; returns ``root / "audio"``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for d in ("audio", "transcripts", "alignments") if alignments else ("audio", "transcripts"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(num_files):
        n = int(rng.integers(frames[0], frames[1] + 1))
        offset, stride_k, stride_t = (int(v) for v in rng.integers(0, 50, size=3))
        k = np.arange(num_codebooks)[:, None]
        t = np.arange(n)[None, :]
        codes = (offset + k * (stride_k + 1) + t * (stride_t % 7 + 1)) % (audio_vocab_size - 1) + 1
        stem = f"clip_{i:03d}"
        np.save(root / "audio" / f"{stem}.npy", codes.astype(np.int32))
        n_words = int(rng.integers(words_per_file[0], words_per_file[1] + 1))
        words = [str(w) for w in rng.choice(_WORDS, size=n_words)]
        (root / "transcripts" / f"{stem}.txt").write_text(" ".join(words) + "\n")
        if alignments:
            seconds = n / FRAME_RATE
            # two halves separated by a pause, so the file becomes two turns
            edges = np.linspace(0.0, max(seconds - 1.0, 0.5), n_words + 1)
            timing = []
            for j, w in enumerate(words):
                start, end = float(edges[j]), float(edges[j + 1]) - 0.02
                if j >= n_words // 2:
                    start = min(start + 1.0, seconds)
                    end = min(end + 1.0, seconds)
                timing.append({"word": w, "start": round(start, 3), "end": round(max(end, start), 3)})
            (root / "alignments" / f"{stem}.json").write_text(json.dumps({"words": timing}))
    return root / "audio"


def write_random_csm(path: str | Path, config=None, seed: int = 0) -> Path:
    """Save a CSM with random weights (`save_csm`'s layout) to directory ``path``."""
    import mlx.core as mx

    from ..csm import CSM, CSMConfig, save_csm

    mx.random.seed(seed)
    model = CSM(config or CSMConfig.tiny(text_vocab_size=260))
    mx.eval(model.parameters())
    save_csm(model, path)
    return Path(path)
