"""Preference data: JSONL rows of prompt / chosen / rejected -> token pairs with response masks -> ``[2B, T]`` batches.

The format is mlx-lm-lora's (and TRL's standard preference format): ``train.jsonl`` /
``valid.jsonl``, one JSON object a line with string fields ``prompt``, ``chosen`` and
``rejected`` and an optional ``system``; other fields are ignored, blank lines skipped. A
bad row stops the load with one line naming the file, the line and the field
(`PreferenceDataError`).

A pair becomes two token sequences sharing the prompt's tokens, each with a mask of its
response tokens:

- with a chat template (``tokenizer.apply_chat_template``, as mlx-lm's and mlx-lm-lora's
  datasets call it): the messages are the optional system turn and the prompt as the user
  turn; the sequence is the conversation with the response as the assistant turn, and the
  mask covers what follows the rendered generation prompt (the assistant's tokens, its
  end-of-turn included). A template that renders the prompt differently alone than before
  the answer cannot be masked exactly and is refused. Templates that think get
  ``enable_thinking=False``, as mlx-lm-lora does, so an empty thinking block stays prompt.
- without one (TRL's non-conversational rule): the prompt's ids as the tokenizer encodes
  them (its BOS included), then the response's ids without special tokens and an EOS; a
  system text goes before the prompt with a blank line between.

Too long a sequence loses its end (the prompt is kept whole: one that leaves no room for a
response token is refused); the report counts the truncated pairs. Batches are padded on
the right to a multiple of ``pad_multiple`` (mask False) and are a pure function of
``(seed, batch index)`` through `train.batching.batch_order`, so a resumed run sees exactly
the batches the interrupted one would have.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..batching import batch_order, padded_length

__all__ = [
    "PreferenceDataError",
    "PreferenceRow",
    "EncodedPair",
    "PreferenceReport",
    "read_rows",
    "has_chat_template",
    "encode_pair",
    "load_pairs",
    "collate_pairs",
    "pair_batch",
]

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")
_ROW_SHAPE = 'a row needs string fields "prompt", "chosen" and "rejected" ("system" is optional)'


class PreferenceDataError(ValueError):
    """A preference row that cannot be trained on; the message names file, line and field."""


@dataclass(frozen=True)
class PreferenceRow:
    prompt: str
    chosen: str
    rejected: str
    system: str | None = None
    source: str = ""  # "file:line"


@dataclass
class EncodedPair:
    chosen: np.ndarray  # [n] int32 token ids: prompt then chosen response
    chosen_mask: np.ndarray  # [n] bool: the response tokens
    rejected: np.ndarray
    rejected_mask: np.ndarray
    source: str = ""


@dataclass
class PreferenceReport:
    pairs: int = 0
    truncated: int = 0  # pairs with a sequence cut to max_seq_len
    chat_template: bool = False

    def __str__(self) -> str:
        how = "chat template" if self.chat_template else "plain concatenation"
        return f"preference data: {self.pairs} pairs ({how}), {self.truncated} truncated to max_seq_len"


def _json_type(value) -> str:
    for kind, name in ((bool, "boolean"), (dict, "object"), (list, "array"), (str, "string"), ((int, float), "number")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _row(obj, where: str) -> PreferenceRow:
    if not isinstance(obj, dict):
        raise PreferenceDataError(f"{where}: {_ROW_SHAPE}; this line is a JSON {_json_type(obj)}, not an object")
    for key in REQUIRED_FIELDS:
        if key not in obj:
            raise PreferenceDataError(f'{where}: field "{key}" is missing; {_ROW_SHAPE}')
        if not isinstance(obj[key], str):
            raise PreferenceDataError(f'{where}: field "{key}" must be a string, got a JSON {_json_type(obj[key])}')
    for key in ("chosen", "rejected"):
        if not obj[key].strip():
            raise PreferenceDataError(f'{where}: field "{key}" is empty: a response needs text to be scored')
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise PreferenceDataError(f'{where}: field "system" must be a string, got a JSON {_json_type(system)}')
    return PreferenceRow(obj["prompt"], obj["chosen"], obj["rejected"], system or None, where)


def read_rows(path: str | Path) -> list[PreferenceRow]:
    """Every row of one JSONL file, or `PreferenceDataError` at the first bad one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a preference split is a JSONL file; {_ROW_SHAPE})")
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PreferenceDataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PreferenceDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            rows.append(_row(obj, where))
    if not rows:
        raise PreferenceDataError(f"{path}: no rows; {_ROW_SHAPE}")
    return rows


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` (mlx-lm's ``TokenizerWrapper`` or a Hugging Face tokenizer) has one."""
    flag = getattr(tokenizer, "has_chat_template", None)
    if isinstance(flag, bool):
        return flag
    return getattr(tokenizer, "chat_template", None) is not None


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    thinking = {"enable_thinking": False} if getattr(tokenizer, "has_thinking", False) is True else {}
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False, **thinking
    )
    return [int(i) for i in ids]


def _templated(row: PreferenceRow, tokenizer) -> tuple[list[int], list[int], list[int]]:
    messages = ([{"role": "system", "content": row.system}] if row.system is not None else []) + [
        {"role": "user", "content": row.prompt}
    ]
    prompt = _render(tokenizer, messages, generation_prompt=True)
    full = []
    for key in ("chosen", "rejected"):
        ids = _render(tokenizer, [*messages, {"role": "assistant", "content": getattr(row, key)}], False)
        if ids[: len(prompt)] != prompt:
            raise PreferenceDataError(
                f'{row.source}: field "{key}": the chat template renders the prompt differently before the answer '
                "than alone as the generation prompt, so the answer's tokens cannot be masked exactly"
            )
        if len(ids) == len(prompt):
            raise PreferenceDataError(f'{row.source}: field "{key}": the chat template gives no tokens for it')
        full.append(ids)
    return prompt, full[0], full[1]


def _concatenated(row: PreferenceRow, tokenizer) -> tuple[list[int], list[int], list[int]]:
    text = row.prompt if row.system is None else f"{row.system}\n\n{row.prompt}"
    prompt = [int(i) for i in tokenizer.encode(text)]
    eos = getattr(tokenizer, "eos_token_id", None)
    full = []
    for key in ("chosen", "rejected"):
        ids = [int(i) for i in tokenizer.encode(getattr(row, key), add_special_tokens=False)]
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(int(eos))
        full.append(prompt + ids)
    return prompt, full[0], full[1]


def encode_pair(row: PreferenceRow, tokenizer, max_seq_len: int = 2048) -> tuple[EncodedPair, bool]:
    """``(pair, truncated)``: the row's two sequences and response masks (see the module's rules)."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    templated = has_chat_template(tokenizer)
    prompt, chosen, rejected = (_templated if templated else _concatenated)(row, tokenizer)
    n_prompt = len(prompt)
    if n_prompt >= max_seq_len:
        raise PreferenceDataError(
            f'{row.source}: field "prompt" takes {n_prompt} tokens and max_seq_len is {max_seq_len}: '
            "no room for a response token (raise max_seq_len or shorten the prompt)"
        )
    truncated = max(len(chosen), len(rejected)) > max_seq_len
    arrays = []
    for ids in (chosen, rejected):
        ids = np.asarray(ids[:max_seq_len], np.int32)
        mask = np.zeros(len(ids), bool)
        mask[n_prompt:] = True
        arrays += [ids, mask]
    return EncodedPair(*arrays, source=row.source), truncated


def load_pairs(path: str | Path, tokenizer, max_seq_len: int = 2048) -> tuple[list[EncodedPair], PreferenceReport]:
    """Every pair of one split file, encoded, with the report of how."""
    report = PreferenceReport(chat_template=has_chat_template(tokenizer))
    pairs = []
    for row in read_rows(path):
        pair, truncated = encode_pair(row, tokenizer, max_seq_len)
        pairs.append(pair)
        report.truncated += truncated
    report.pairs = len(pairs)
    if report.truncated:
        log.warning("%s: %d of %d pairs cut to max_seq_len %d", path, report.truncated, report.pairs, max_seq_len)
    log.info("%s: %s", path, report)
    return pairs, report


def collate_pairs(
    pairs: Sequence[EncodedPair], pad_multiple: int = 16, max_seq_len: int | None = None
) -> dict[str, np.ndarray]:
    """``tokens`` int32 and ``response_mask`` bool, ``[2B, L]``: the B chosen sequences, then
    the B rejected ones, right-padded with id 0 (mask False) to the longest rounded up to
    ``pad_multiple`` (capped at ``max_seq_len``), so a compiled step sees few shapes."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    masks = [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs]
    length = padded_length(max(len(s) for s in seqs), pad_multiple, max_seq_len)
    tokens = np.zeros((len(seqs), length), np.int32)
    response_mask = np.zeros((len(seqs), length), bool)
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        tokens[i, : len(s)], response_mask[i, : len(m)] = s, m
    return {"tokens": tokens, "response_mask": response_mask}


def pair_batch(
    pairs: Sequence[EncodedPair],
    batch_size: int,
    seed: int,
    batch_index: int,
    pad_multiple: int = 16,
    max_seq_len: int | None = None,
) -> dict[str, np.ndarray]:
    """The ``batch_index``-th batch of a run over ``pairs`` (a pure function of its arguments)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not pairs:
        raise ValueError("no preference pairs to batch")
    chosen = batch_order(len(pairs), batch_size, seed, batch_index)
    return collate_pairs([pairs[i] for i in chosen], pad_multiple, max_seq_len)
