"""``--precompute-reference``: the reference's log-probs of every pair, computed once before training and kept per example.

For when memory is tightest: the training step then runs the policy alone (no reference
forward, and with a reference model the second copy is freed before training). The values
are computed in eval mode (no dropout), in the data's order, ``batch_size`` pairs at a time,
and kept in the output folder as ``reference_logps.safetensors``: for each split,
``{split}.chosen`` and ``{split}.rejected`` (float32, one per pair) and ``{split}.done``
(which pairs have them). The file is rewritten whole (write, fsync, rename) every few
seconds, at the end and on Ctrl-C, so an interrupted precompute resumes where it stopped.

The file records what its values depend on (`identity`: the base model's fingerprint, the
reference, and a digest of every pair's tokens and masks, which covers the data, the
tokenizer, the chat template and ``max_seq_len``); a file recording anything else is
computed again from the start. A resumed training run reads the same values, so resume
stays exact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..checkpoint import atomic_write_dir
from .data import EncodedPair, collate_pairs

__all__ = ["REFERENCE_CACHE", "pairs_digest", "precompute_reference"]

log = logging.getLogger(__name__)

REFERENCE_CACHE = "reference_logps.safetensors"
WRITE_EVERY_S = 5.0


def pairs_digest(pairs: Sequence[EncodedPair]) -> str:
    """sha256 of every pair's token ids and response masks, in order."""
    h = hashlib.sha256()
    for p in pairs:
        for a in (p.chosen, p.chosen_mask, p.rejected, p.rejected_mask):
            a = np.ascontiguousarray(a)
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
    return h.hexdigest()


def _read(path: Path, identity: str, splits: dict) -> dict[str, dict[str, np.ndarray]]:
    """The values on file for ``identity`` (fresh arrays where there are none)."""
    fresh = {s: {"chosen": np.zeros(len(p), np.float32), "rejected": np.zeros(len(p), np.float32),
                 "done": np.zeros(len(p), np.uint8)} for s, p in splits.items()}  # fmt: skip
    if not path.is_file():
        return fresh
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except (OSError, RuntimeError, ValueError) as e:
        log.warning("%s is unreadable (%s): computing the reference log-probs again", path, e)
        return fresh
    if metadata.get("identity") != identity:
        log.info("%s is for another model, reference or data: computing the reference log-probs again", path)
        return fresh
    for split, values in fresh.items():
        for key in values:
            stored = arrays.get(f"{split}.{key}")
            if stored is not None and stored.shape == values[key].shape:
                values[key] = np.array(stored).astype(values[key].dtype)
    return fresh


def _write(path: Path, values: dict, identity: str) -> None:
    arrays = {f"{s}.{k}": mx.array(v) for s, kv in values.items() for k, v in kv.items()}
    atomic_write_dir(path.parent, lambda tmp: mx.save_safetensors(str(tmp / path.name), arrays, {"identity": identity}))


def precompute_reference(
    path: str | Path,
    splits: dict[str, Sequence[EncodedPair]],
    score: Callable[[mx.array, mx.array], mx.array],
    identity: dict,
    batch_size: int,
    max_seq_len: int | None = None,
    *,
    write: bool = True,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (chosen, rejected)}``: the reference log-probs of every pair, read from ``path``
    where it holds them for ``identity`` and computed (``score(tokens, response_mask) -> [2B]``,
    chosen rows then rejected) for the rest. ``write``: keep them in ``path`` (the main rank);
    ``on_progress(done, total)`` hears of each batch."""
    path = Path(path)
    key = json.dumps({**identity, "data": {s: pairs_digest(p) for s, p in splits.items()}}, sort_keys=True)
    values = _read(path, key, splits)
    total = sum(len(p) for p in splits.values())
    done = sum(int(v["done"].sum()) for v in values.values())
    if done:
        log.info("reference log-probs: %d of %d pairs already in %s", done, total, path)
    bar = tqdm(total=total, initial=done, unit="pair", desc="reference log-probs", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)  # fmt: skip
    last_write, dirty = time.monotonic(), False
    try:
        for split, pairs in splits.items():
            v = values[split]
            todo = np.flatnonzero(v["done"] == 0)
            for start in range(0, len(todo), batch_size):
                rows = todo[start : start + batch_size]
                b = collate_pairs([pairs[i] for i in rows], max_seq_len=max_seq_len)
                logps = np.array(score(mx.array(b["tokens"]), mx.array(b["response_mask"])))
                v["chosen"][rows], v["rejected"][rows], v["done"][rows] = logps[: len(rows)], logps[len(rows) :], 1
                done, dirty = done + len(rows), True
                bar.update(len(rows))
                if on_progress is not None:
                    on_progress(done, total)
                if write and time.monotonic() - last_write > WRITE_EVERY_S:
                    _write(path, values, key)
                    last_write, dirty = time.monotonic(), False
    finally:  # Ctrl-C or an error included: what was computed is kept
        bar.close()
        if write and dirty:
            _write(path, values, key)
    return {s: (v["chosen"], v["rejected"]) for s, v in values.items()}
