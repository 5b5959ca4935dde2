"""The data path: files -> segments -> CSM frames -> padded batches.

Layout (the original tool's): ``audio/<stem>.wav`` (or pre-encoded Mimi codes
``<stem>.npy`` / ``<stem>.safetensors``, ``[codebooks, frames]``), ``transcripts/<stem>.txt``
and optionally ``alignments/<stem>.json`` with word timings, either a list or
``{"words": [...]}`` of ``{"word": str, "start": seconds, "end": seconds}``.

A transcript that begins with a speaker tag, ``[3]`` (as CSM's text rows carry it), names
its file's speaker (the tag is not part of the text); others speak as ``DataSpec.speaker_id``
(``--speaker-id``). A sample's ``speaker`` is its last (trained) turn's, the adapter
``--adapter-per-speaker`` trains it on.

A file becomes one segment (its transcript and all its audio), or, with word timings,
several: a new segment starts at a pause longer than ``max_pause`` seconds or when a
segment would exceed ``max_segment_seconds``. The segments of one file are consecutive
turns; each becomes a training sample with up to ``context_turns`` preceding turns.

A sample's frames (``[T, K + 1]`` tokens and mask, K audio codebooks then the text
column), as Sesame's generator lays them out, for each turn in order: one text row per
token of ``[speaker]text`` (BOS/EOS included; only the text column present), then one
audio row per Mimi frame (only the audio columns present) and an all-zero end frame
(audio columns present, codes 0). ``target`` marks the rows the loss trains on: the audio
rows and the end frame of the last turn (the context turns only condition). Too long a
sample loses its oldest context turns first, then the end of its audio (to
``max_seq_len`` rows).

Broken files never stop a run: a missing transcript, an unreadable or malformed file and
empty segments are skipped and counted by reason in the `DataReport`. Data that does not
fit the model (other than its number of codebooks, or codes outside its audio
vocabulary) means the wrong model or the wrong data, and is refused (`DataMismatchError`,
naming the file and both numbers) unless ``DataSpec.drop_mismatched`` says to train on
the model's first codebooks of data that has more and to skip the files that cannot fit
(``--drop-mismatched-data``).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..batching import padded_length
from .audio import (
    AUDIO_SUFFIXES,
    CODE_SUFFIXES,
    FRAME_RATE,
    SAMPLE_RATE,
    CodeRangeError,
    load_codes,
    read_wav,
    resample,
)

__all__ = [
    "Segment",
    "Sample",
    "DataReport",
    "DataSpec",
    "DataMismatchError",
    "find_files",
    "load_segments",
    "frame_turn",
    "build_sample",
    "build_dataset",
    "split_train_val",
    "collate",
]

log = logging.getLogger(__name__)


@dataclass
class Segment:
    """One turn: transcript text, speaker id and Mimi codes ``[K, frames]``."""

    text: str
    speaker: int
    codes: np.ndarray


@dataclass
class Sample:
    tokens: np.ndarray  # [T, K + 1] int32
    mask: np.ndarray  # [T, K + 1] bool
    target: np.ndarray  # [T] bool: rows the loss is computed on
    source: str
    speaker: int = 0  # the speaker of the trained (last) turn

    def __len__(self) -> int:
        return self.tokens.shape[0]


@dataclass
class DataReport:
    files: int = 0
    segments: int = 0
    samples: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"data: {self.files} files -> {self.segments} segments -> {self.samples} samples "
            f"({self.truncated} truncated); skipped: {skipped}"
        )


@dataclass
class DataSpec:
    """What the model fixes about the frames."""

    num_codebooks: int
    audio_vocab_size: int
    text_vocab_size: int
    max_seq_len: int = 2048
    context_turns: int = 2
    speaker_id: int = 0
    max_segment_seconds: float = 15.0
    max_pause: float = 0.8
    drop_mismatched: bool = False  # train on the first K codebooks / skip out-of-range files


class DataMismatchError(ValueError):
    """A data file does not fit the model (codebook count or code range)."""


_DROP_HINT = (
    "; pass --drop-mismatched-data to train on the model's first codebooks of files that have more "
    "and skip files that cannot fit"
)


def _mismatch(spec: DataSpec, report: DataReport, reason: str, message: str) -> list:
    """Refuse mismatched data, or (``drop_mismatched``) count the file as skipped."""
    if not spec.drop_mismatched:
        raise DataMismatchError(message + _DROP_HINT)
    log.warning("skipping %s", message)
    report.skipped[reason] += 1
    return []


@dataclass
class SourceFile:
    stem: str
    audio: Path
    transcript: Path | None
    alignment: Path | None


def _default_dir(audio_dir: Path, name: str) -> Path | None:
    sibling = audio_dir.parent / name
    return sibling if sibling.is_dir() else None


def find_files(
    audio_dir: str | Path,
    transcript_dir: None | str | Path = None,
    alignment_dir: None | str | Path = None,
) -> list[SourceFile]:
    """Audio/code files of ``audio_dir`` (sorted by name) with their transcript/alignment.

    ``transcript_dir`` defaults to a ``transcripts`` folder beside ``audio_dir`` if there is
    one, else ``audio_dir`` itself; ``alignment_dir`` to an ``alignments`` folder beside it.
    A file whose transcript is missing is returned with ``transcript=None``.
    """
    audio_dir = Path(audio_dir)
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"audio directory {audio_dir} does not exist")
    tdir = Path(transcript_dir) if transcript_dir else (_default_dir(audio_dir, "transcripts") or audio_dir)
    adir = Path(alignment_dir) if alignment_dir else _default_dir(audio_dir, "alignments")
    out = []
    for p in sorted(audio_dir.iterdir()):
        if p.suffix.lower() not in AUDIO_SUFFIXES + CODE_SUFFIXES or not p.is_file():
            continue
        t = tdir / f"{p.stem}.txt"
        a = adir / f"{p.stem}.json" if adir is not None else None
        out.append(SourceFile(p.stem, p, t if t.is_file() else None, a if a is not None and a.is_file() else None))
    return out


def _read_words(path: Path) -> list[tuple[str, float, float]]:
    with open(path) as f:
        data = json.load(f)
    words = data["words"] if isinstance(data, dict) else data
    out = []
    for w in words:
        word = str(w.get("word", w.get("text", ""))).strip()
        start, end = float(w["start"]), float(w["end"])
        if not end >= start >= 0:
            raise ValueError(f"bad word timing {w}")
        if word:
            out.append((word, start, end))
    return out


SPEAKER_TAG = re.compile(r"^\[(\d+)\]\s*")


def speaker_and_text(transcript: str, default: int) -> tuple[int, str]:
    """A transcript's speaker (its ``[N]`` tag, else ``default``) and its text without the tag."""
    m = SPEAKER_TAG.match(transcript)
    return (int(m.group(1)), transcript[m.end() :]) if m else (default, transcript)


def _segments_from_words(words, codes, spec: DataSpec, speaker: int) -> tuple[list[Segment], int]:
    """Cut at pauses and at the length limit; returns (segments, empty ones dropped)."""
    groups: list[list[tuple[str, float, float]]] = []
    for w in words:
        if groups:
            cur = groups[-1]
            pause = w[1] - cur[-1][2]
            if pause <= spec.max_pause and w[2] - cur[0][1] <= spec.max_segment_seconds:
                cur.append(w)
                continue
        groups.append([w])
    segments, empty = [], 0
    for g in groups:
        lo = int(np.floor(g[0][1] * FRAME_RATE))
        hi = min(int(np.ceil(g[-1][2] * FRAME_RATE)), codes.shape[1])
        if hi <= lo:
            empty += 1
            continue
        segments.append(Segment(" ".join(w[0] for w in g), speaker, codes[:, lo:hi]))
    return segments, empty


def load_segments(src: SourceFile, spec: DataSpec, codec=None, report: DataReport | None = None) -> list[Segment]:
    """The turns of one file; problems are counted in ``report`` and give ``[]``."""
    report = report if report is not None else DataReport()
    if src.transcript is None:
        report.skipped["missing transcript"] += 1
        return []
    is_codes = src.audio.suffix.lower() in CODE_SUFFIXES
    if not is_codes and codec is None:
        raise RuntimeError(f"{src.audio}: WAV input needs the Mimi codec (--codec-path)")
    K, V = spec.num_codebooks, spec.audio_vocab_size
    try:
        speaker, text = speaker_and_text(src.transcript.read_text(encoding="utf-8").strip(), spec.speaker_id)
        if is_codes:
            codes = load_codes(src.audio, V)  # range-checked before the cast to int32
        else:
            samples, rate = read_wav(src.audio)
            codes = codec.encode(resample(samples, rate, SAMPLE_RATE))
        words = _read_words(src.alignment) if src.alignment is not None else None
    except CodeRangeError as e:
        return _mismatch(
            spec,
            report,
            "codes out of range",
            f"{src.audio}: codes span [{e.low}, {e.high}], the model's audio vocabulary has {V} entries ([0, {V}))",
        )
    except Exception as e:  # unreadable / malformed: skip the file, keep the run going
        log.warning("skipping %s: %s: %s", src.audio.name, type(e).__name__, e)
        report.skipped["unreadable file"] += 1
        return []
    if codes.shape[0] != K:
        few = codes.shape[0] < K
        message = f"{src.audio}: {codes.shape[0]} codebooks, the model has {K}"
        if few or not spec.drop_mismatched:
            return _mismatch(spec, report, "too few codebooks" if few else "too many codebooks", message)
        log.info("%s: training on the first %d of its %d codebooks", src.audio.name, K, codes.shape[0])
        codes = codes[:K]
    if not is_codes and codes.size and (codes.min() < 0 or codes.max() >= V):  # the codec's codes
        message = (
            f"{src.audio}: Mimi gave codes in [{codes.min()}, {codes.max()}], the model's audio vocabulary has {V}"
        )
        return _mismatch(spec, report, "codes out of range", message)
    if words is not None:
        segments, empty = _segments_from_words(words, codes, spec, speaker)
        report.skipped["empty segment"] += empty
    else:
        segments = [Segment(text, speaker, codes)]
    kept = [s for s in segments if s.text and s.codes.shape[1] > 0]
    report.skipped["empty segment"] += len(segments) - len(kept)
    if not report.skipped["empty segment"]:
        del report.skipped["empty segment"]
    return kept


def frame_turn(segment: Segment, tokenizer, spec: DataSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of one turn: ``(tokens [n, K+1], mask [n, K+1], is_audio [n])``."""
    K = spec.num_codebooks
    ids = tokenizer.encode(f"[{segment.speaker}]{segment.text}")
    if max(ids) >= spec.text_vocab_size:
        raise ValueError(
            f"the tokenizer gave id {max(ids)} but the model's text vocabulary has "
            f"{spec.text_vocab_size} entries: wrong --tokenizer for this model"
        )
    n_text, n_audio = len(ids), segment.codes.shape[1] + 1  # + the all-zero end frame
    tokens = np.zeros((n_text + n_audio, K + 1), np.int32)
    mask = np.zeros((n_text + n_audio, K + 1), bool)
    tokens[:n_text, K] = ids
    mask[:n_text, K] = True
    tokens[n_text : n_text + n_audio - 1, :K] = segment.codes.T
    mask[n_text:, :K] = True
    is_audio = np.zeros(n_text + n_audio, bool)
    is_audio[n_text:] = True
    return tokens, mask, is_audio


def build_sample(turns: Sequence[Segment], tokenizer, spec: DataSpec, source: str = "") -> tuple[Sample | None, bool]:
    """Sample of ``turns`` (context..., target); returns (sample or None, truncated)."""
    framed = [frame_turn(t, tokenizer, spec) for t in turns]
    truncated = False
    while len(framed) > 1 and sum(f[0].shape[0] for f in framed) > spec.max_seq_len:
        framed = framed[1:]
        truncated = True
    tokens = np.concatenate([f[0] for f in framed])
    mask = np.concatenate([f[1] for f in framed])
    target = np.zeros(tokens.shape[0], bool)
    target[-framed[-1][0].shape[0] :] = framed[-1][2]
    if tokens.shape[0] > spec.max_seq_len:
        tokens, mask, target = (a[: spec.max_seq_len] for a in (tokens, mask, target))
        truncated = True
    if not target.any():
        return None, truncated
    return Sample(tokens, mask, target, source, turns[-1].speaker), truncated


def build_dataset(
    audio_dir: str | Path,
    tokenizer,
    spec: DataSpec,
    transcript_dir: None | str | Path = None,
    alignment_dir: None | str | Path = None,
    codec=None,
) -> tuple[list[Sample], DataReport]:
    """Every sample of a dataset directory, with the report of what was skipped."""
    files = find_files(audio_dir, transcript_dir, alignment_dir)
    wavs = [f for f in files if f.audio.suffix.lower() in AUDIO_SUFFIXES]
    if wavs and codec is None:
        raise RuntimeError(
            f"{len(wavs)} WAV files in {audio_dir} need the Mimi codec: pass --codec-path with "
            "local Mimi weights (and install the [audio] extra), or give pre-encoded codes "
            "(.npy / .safetensors, [32, frames])"
        )
    report = DataReport(files=len(files))
    samples = []
    for src in files:
        segments = load_segments(src, spec, codec, report)
        report.segments += len(segments)
        for i in range(len(segments)):
            turns = segments[max(0, i - spec.context_turns) : i + 1]
            sample, truncated = build_sample(turns, tokenizer, spec, f"{src.stem}#{i}")
            report.truncated += truncated
            if sample is None:
                report.skipped["empty segment"] += 1
                continue
            samples.append(sample)
    report.samples = len(samples)
    log.debug("%s", report)  # the trainer says it once, with the train/validation split
    return samples, report


def split_train_val(samples: list[Sample], val_split: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded split; at least one validation sample when ``val_split > 0`` and n >= 2."""
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    n = len(samples)
    n_val = int(round(n * val_split))
    if val_split > 0 and n >= 2:
        n_val = max(n_val, 1)
    order = np.random.default_rng(seed).permutation(n)
    val = [samples[i] for i in sorted(order[:n_val])]
    train = [samples[i] for i in sorted(order[n_val:])]
    return train, val


def collate(samples: Sequence[Sample], max_seq_len: int, pad_multiple: int = 16) -> dict[str, np.ndarray]:
    """Right-padded ``tokens``/``mask`` ``[B, L, K+1]`` and ``target`` ``[B, L]``.

    ``L`` is the longest sample rounded up to ``pad_multiple`` (capped at ``max_seq_len``),
    so a compiled step sees few distinct shapes. Padding rows have an all-zero mask.
    """
    L = padded_length(max(len(s) for s in samples), pad_multiple, max_seq_len)
    W = samples[0].tokens.shape[1]
    tokens = np.zeros((len(samples), L, W), np.int32)
    mask = np.zeros((len(samples), L, W), bool)
    target = np.zeros((len(samples), L), bool)
    for i, s in enumerate(samples):
        n = len(s)
        tokens[i, :n], mask[i, :n], target[i, :n] = s.tokens, s.mask, s.target
    return {"tokens": tokens, "mask": mask, "target": target}
