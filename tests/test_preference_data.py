"""Preference data: rows refused with file, line and field; the chat template's response mask; plain concatenation; batches."""

import json

import numpy as np
import pytest
from mlx_fused_lora.train.preference import (
    PreferenceDataError,
    PreferenceRow,
    collate_pairs,
    encode_pair,
    load_pairs,
    pair_batch,
    read_rows,
)

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

WORDS = "the quick brown fox jumps over a lazy dog and cat runs to sleep now be kind".split()
SPECIAL = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# A chat template in the common shape: BOS, then each turn as role marker, content, end marker.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer(tmp_path, chat_template=True):
    """A word-level tokenizer, loaded the way mlx-lm loads a model's tokenizer."""
    from mlx_lm.tokenizer_utils import load
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    folder = tmp_path / ("chat" if chat_template else "plain")
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    if chat_template:
        config["chat_template"] = TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return load(folder)


def ids(tokenizer, text):
    return [tokenizer.convert_tokens_to_ids(t) for t in text.split()]


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ROW = PreferenceRow("the quick fox", "a lazy dog", "cat runs", source="train.jsonl:1")


def test_chat_template_masks_exactly_the_assistant_turn(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    pair, truncated = encode_pair(ROW, tok)
    prompt = "<s> <|user|> the quick fox <|end|> <|assistant|>"
    assert pair.chosen.tolist() == ids(tok, f"{prompt} a lazy dog <|end|>")
    assert pair.rejected.tolist() == ids(tok, f"{prompt} cat runs <|end|>")
    assert pair.chosen[pair.chosen_mask].tolist() == ids(tok, "a lazy dog <|end|>")
    assert pair.rejected[pair.rejected_mask].tolist() == ids(tok, "cat runs <|end|>")
    assert not truncated and pair.source == "train.jsonl:1"


def test_the_system_turn_comes_first_and_stays_prompt(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    row = PreferenceRow("the fox", "now", "sleep", system="be kind")
    pair, _ = encode_pair(row, tok)
    assert pair.chosen.tolist() == ids(
        tok, "<s> <|system|> be kind <|end|> <|user|> the fox <|end|> <|assistant|> now <|end|>"
    )
    assert pair.chosen[pair.chosen_mask].tolist() == ids(tok, "now <|end|>")


def test_without_a_template_prompt_then_response_then_eos(tmp_path):
    tok = tiny_tokenizer(tmp_path, chat_template=False)
    pair, _ = encode_pair(PreferenceRow("the quick fox", "a lazy dog", "cat runs", system="be kind"), tok)
    eos = tok.eos_token_id
    prompt = tok.encode("be kind\n\nthe quick fox")
    assert pair.chosen.tolist() == prompt + ids(tok, "a lazy dog") + [eos]
    assert pair.chosen[pair.chosen_mask].tolist() == ids(tok, "a lazy dog") + [eos]
    assert pair.rejected[pair.rejected_mask].tolist() == ids(tok, "cat runs") + [eos]
    assert not pair.chosen_mask[: len(prompt)].any()


class PrefixBreakingTokenizer:
    """A template that renders the user turn differently when an answer follows."""

    has_chat_template = True
    eos_token_id = 2

    def apply_chat_template(self, messages, add_generation_prompt=False, **_):
        user = [5, 6] if add_generation_prompt else [5, 7]
        return user + ([9] if add_generation_prompt else [8, 8])


def test_a_template_that_moves_the_prompt_is_refused():
    with pytest.raises(
        PreferenceDataError, match='^train.jsonl:1: field "chosen": the chat template renders the prompt'
    ):
        encode_pair(ROW, PrefixBreakingTokenizer())


def test_long_responses_are_cut_and_counted_a_long_prompt_refused(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    path = write_rows(
        tmp_path / "train.jsonl",
        [
            {"prompt": "the", "chosen": "a lazy dog and cat runs to sleep", "rejected": "now"},
            {"prompt": "fox", "chosen": "be", "rejected": "kind"},
        ],
    )
    pairs, report = load_pairs(path, tok, max_seq_len=8)
    assert report.pairs == 2 and report.truncated == 1 and report.chat_template
    assert len(pairs[0].chosen) == 8 and pairs[0].chosen_mask.sum() == 3  # 5 prompt tokens, then 3 of the answer
    with pytest.raises(PreferenceDataError, match=rf'^{path}:1: field "prompt" takes 5 tokens and max_seq_len is 5'):
        load_pairs(path, tok, max_seq_len=5)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "chosen": "b"', "not valid JSON"),
        ('["a", "b", "c"]', 'a row needs string fields "prompt", "chosen" and "rejected" .*this line is a JSON array'),
        ('{"prompt": "a", "chosen": "b"}', 'field "rejected" is missing'),
        ('{"prompt": "a", "chosen": 3, "rejected": "c"}', 'field "chosen" must be a string, got a JSON number'),
        ('{"prompt": "a", "chosen": "b", "rejected": "  "}', 'field "rejected" is empty'),
        (
            '{"prompt": "a", "chosen": "b", "rejected": "c", "system": ["x"]}',
            'field "system" must be a string, got a JSON array',
        ),
        ('{"prompt": null, "chosen": "b", "rejected": "c"}', 'field "prompt" must be a string, got a JSON null'),
    ],
)
def test_a_bad_row_is_refused_in_one_line_naming_file_line_and_field(tmp_path, line, message):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_rows(tmp_path / "valid.jsonl", [good, "", line])  # a blank line still counts as a line
    with pytest.raises(PreferenceDataError, match=f"^{path}:3: {message}") as e:
        read_rows(path)
    assert "\n" not in str(e.value)


def test_missing_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.jsonl: no such file"):
        read_rows(tmp_path / "train.jsonl")
    with pytest.raises(PreferenceDataError, match="empty.jsonl: no rows"):
        read_rows(write_rows(tmp_path / "empty.jsonl", ["", "  "]))
    bad = tmp_path / "bytes.jsonl"
    bad.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff"}\n')
    with pytest.raises(PreferenceDataError, match="bytes.jsonl:2: not UTF-8 text"):
        read_rows(bad)


def test_rows_keep_optional_system_and_ignore_other_fields(tmp_path):
    path = write_rows(
        tmp_path / "train.jsonl",
        [
            {"prompt": "p", "chosen": "c", "rejected": "r", "system": "s", "score": 0.5},
            {"prompt": "", "chosen": "c", "rejected": "r"},
        ],
    )
    rows = read_rows(path)
    assert rows[0] == PreferenceRow("p", "c", "r", "s", f"{path}:1")
    assert rows[1].system is None and rows[1].prompt == ""


def encoded(tmp_path, n=5):
    tok = tiny_tokenizer(tmp_path)
    rows = [PreferenceRow(" ".join(WORDS[: 1 + i % 3]), " ".join(WORDS[3 : 4 + i]), WORDS[-1 - i]) for i in range(n)]
    return [encode_pair(r, tok)[0] for r in rows]


def test_collate_puts_chosen_rows_first_then_rejected_right_padded(tmp_path):
    pairs = encoded(tmp_path, 3)
    batch = collate_pairs(pairs, pad_multiple=8)
    tokens, mask = batch["tokens"], batch["response_mask"]
    assert tokens.shape == mask.shape and tokens.shape[0] == 6 and tokens.shape[1] % 8 == 0
    assert tokens.dtype == np.int32 and mask.dtype == bool
    for i, p in enumerate(pairs):
        for row, ids_, m in ((i, p.chosen, p.chosen_mask), (3 + i, p.rejected, p.rejected_mask)):
            assert tokens[row, : len(ids_)].tolist() == ids_.tolist()
            assert mask[row, : len(m)].tolist() == m.tolist() and not mask[row, len(m) :].any()
    capped = collate_pairs(pairs, pad_multiple=64, max_seq_len=12)
    assert capped["tokens"].shape[1] == max(12, max(len(p.chosen) for p in pairs))


def test_batches_are_a_pure_function_of_seed_and_index(tmp_path):
    pairs = encoded(tmp_path, 5)
    run = [pair_batch(pairs, 2, seed=3, batch_index=i)["tokens"] for i in range(6)]
    resumed = [pair_batch(pairs, 2, seed=3, batch_index=i)["tokens"] for i in range(4, 6)]
    assert all(np.array_equal(a, b) for a, b in zip(run[4:], resumed, strict=True))

    # each epoch (3 batches of 5 pairs) covers every pair once
    def which(row):
        return next(
            i
            for i, p in enumerate(pairs)
            if row[: len(p.chosen)].tolist() == p.chosen.tolist() and not row[len(p.chosen) :].any()
        )

    assert sorted(which(row) for t in run[:3] for row in t[: len(t) // 2]) == [0, 1, 2, 3, 4]
    other_seed = [pair_batch(pairs, 2, seed=4, batch_index=i)["tokens"] for i in range(3)]
    assert any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(run[:3], other_seed, strict=True))
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        pair_batch(pairs, 0, seed=0, batch_index=0)
