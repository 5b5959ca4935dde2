"""``--precompute-reference``: every pair's reference log-probs computed once, kept per example, resumed after Ctrl-C."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_fused_lora.train.preference.data import EncodedPair
from mlx_fused_lora.train.preference.precompute import precompute_reference


def pair(i: int) -> EncodedPair:
    prompt, chosen, rejected = [1, 2 + i % 3], [4 + i % 5] * (1 + i % 3), [9, 10 + i % 2]
    seq = lambda r: np.array(prompt + r, np.int32)  # noqa: E731
    mask = lambda r: np.array([False] * len(prompt) + [True] * len(r))  # noqa: E731
    return EncodedPair(seq(chosen), mask(chosen), seq(rejected), mask(rejected), f"f:{i}")


SPLITS = {"train": [pair(i) for i in range(11)], "valid": [pair(100 + i) for i in range(3)]}


class Scorer:
    """A stand-in reference: each row's score is a function of its tokens alone (so batching
    does not change it); counts the rows it scored and can stop like Ctrl-C after ``stop_after`` calls."""

    def __init__(self, stop_after=None):
        self.rows, self.calls, self.stop_after = 0, 0, stop_after

    def __call__(self, tokens, mask):
        if self.stop_after is not None and self.calls == self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.rows += tokens.shape[0] // 2
        weights = mx.arange(tokens.shape[1], dtype=mx.float32) + 1.0
        return -(tokens.astype(mx.float32) * mask * weights).sum(axis=1) / 7.0


IDENTITY = {"model": "m", "reference": ["base", None]}


def test_values_are_kept_per_example_and_an_interrupted_precompute_resumes(tmp_path):
    path = tmp_path / "reference_logps.safetensors"
    whole = precompute_reference(tmp_path / "fresh.safetensors", SPLITS, Scorer(), IDENTITY, 4, progress=False)
    # chosen and rejected of pair i are its own: scored alone, they are the same numbers
    alone = Scorer()
    for split, pairs in SPLITS.items():
        for i in (0, len(pairs) - 1):
            single = precompute_reference(
                tmp_path / f"one-{split}{i}", {"x": [pairs[i]]}, alone, IDENTITY, 1, progress=False
            )
            assert single["x"][0][0] == whole[split][0][i] and single["x"][1][0] == whole[split][1][i]

    stopped = Scorer(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        precompute_reference(path, SPLITS, stopped, IDENTITY, 4, progress=False)
    assert path.is_file()  # what was computed before Ctrl-C is kept
    done = np.array(mx.load(str(path))["train.done"])
    assert done.sum() == 8 and done[:8].all()
    again = Scorer()
    values = precompute_reference(path, SPLITS, again, IDENTITY, 4, progress=False)
    assert again.rows == 11 - 8 + 3  # only the pairs left
    for split in SPLITS:
        for a, b in zip(values[split], whole[split], strict=True):
            assert np.array_equal(a, b)
    assert precompute_reference(path, SPLITS, (idle := Scorer()), IDENTITY, 4, progress=False) and idle.rows == 0


def test_another_model_reference_or_data_computes_again(tmp_path):
    path = tmp_path / "reference_logps.safetensors"
    precompute_reference(path, SPLITS, Scorer(), IDENTITY, 4, progress=False)
    for identity, splits in (
        ({**IDENTITY, "model": "other"}, SPLITS),
        ({**IDENTITY, "reference": ["adapter", "sft/"]}, SPLITS),
        (IDENTITY, {**SPLITS, "valid": [pair(7), pair(8), pair(9)]}),  # other pairs (or tokenizer, or max_seq_len)
    ):
        scorer = Scorer()
        precompute_reference(path, splits, scorer, identity, 4, progress=False)
        assert scorer.rows == 14, identity
