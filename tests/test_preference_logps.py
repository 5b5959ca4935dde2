"""Response log-probs: the shift by one, prompt and padding out of sums and gradients, a padded [2B, T] batch, B = 0."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_fused_lora import FusedLoRALinear
from mlx_fused_lora.layers.convert import linear_to_lora_layers
from mlx_fused_lora.train.preference import EncodedPair, collate_pairs, dpo_loss, sequence_logps, split_pairs

V = 11
# Two sequences of T = 6: a 2-token prompt then 3 response tokens and a pad; a 3-token prompt then 3.
TOKENS = mx.array([[1, 4, 7, 2, 9, 0], [3, 3, 5, 8, 10, 6]])
MASK = mx.array([[False, False, True, True, True, False], [False, False, False, True, True, True]])


class TableModel(nn.Module):
    """Logits that ignore the tokens: a trainable ``[N, T - 1, V]`` table."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def __call__(self, inputs):
        assert inputs.shape == (TOKENS.shape[0], TOKENS.shape[1] - 1)  # the model sees tokens[:, :-1]
        return self.table


def random_table(seed=0):
    return mx.array(np.random.default_rng(seed).normal(size=(2, 5, V)).astype(np.float32))


def test_sum_of_response_log_softmax_by_hand():
    table = random_table()
    sums, counts = sequence_logps(TableModel(table), TOKENS, MASK)
    t = np.array(table, dtype=np.float64)
    log_softmax = t - np.log(np.exp(t).sum(-1, keepdims=True))
    tokens, mask = np.array(TOKENS), np.array(MASK)
    # position t of the logits scores token t + 1, where that token is a response token
    expected = [sum(log_softmax[r, t, tokens[r, t + 1]] for t in range(5) if mask[r, t + 1]) for r in range(2)]
    assert np.allclose(np.array(sums), expected, atol=1e-5)
    assert counts.tolist() == [3.0, 3.0] and counts.dtype == mx.float32


def test_prompt_and_padding_logits_change_nothing_and_the_shift_is_by_one():
    table = random_table()
    sums, _ = sequence_logps(TableModel(table), TOKENS, MASK)
    unscored = ~np.array(MASK)[:, 1:]  # logits at t are unscored when token t + 1 is prompt or padding
    wild = np.array(table)
    wild[unscored] = np.random.default_rng(1).normal(scale=1e4, size=(unscored.sum(), V))
    wild[0, 0, 0] = np.nan  # not even a NaN there leaks
    wild[1, 1, 3] = np.inf
    wild_sums, _ = sequence_logps(TableModel(mx.array(wild)), TOKENS, MASK)
    assert np.array_equal(np.array(wild_sums), np.array(sums))
    # the last prompt position predicts the first response token: it must count
    moved = np.array(table)
    moved[0, 1] += np.linspace(-3, 3, V, dtype=np.float32)
    moved_sums, _ = sequence_logps(TableModel(mx.array(moved)), TOKENS, MASK)
    assert abs(moved_sums[0].item() - sums[0].item()) > 1e-3 and moved_sums[1].item() == sums[1].item()


def test_prompt_positions_get_no_gradient():
    model = TableModel(random_table())

    def loss(model):
        sums, _ = sequence_logps(model, TOKENS, MASK)
        return -sums.sum()

    grad = np.array(nn.value_and_grad(model, loss)(model)[1]["table"])
    scored = np.array(MASK)[:, 1:]
    assert np.all(grad[~scored] == 0)
    assert np.all(np.abs(grad[scored]).sum(-1) > 0)


def test_bad_batches_are_refused():
    model = TableModel(random_table())
    with pytest.raises(ValueError, match=r"tokens must be a 2-D mx.array"):
        sequence_logps(model, TOKENS[0], MASK[0])
    with pytest.raises(ValueError, match="integer token ids, got dtype mlx.core.float32"):
        sequence_logps(model, TOKENS.astype(mx.float32), MASK)
    with pytest.raises(ValueError, match=r"at least 2 positions .* T = 1"):
        sequence_logps(model, TOKENS[:, :1], MASK[:, :1])
    with pytest.raises(
        ValueError, match=r"response_mask must be an mx.array of the tokens' shape \(2, 6\), got \(2, 5\)"
    ):
        sequence_logps(model, TOKENS, MASK[:, :5])
    with pytest.raises(ValueError, match="even number of rows"):
        split_pairs(mx.zeros((3,)))


def tiny_llama():
    from test_mlx_lm_integration import make_llama

    return make_llama(num_hidden_layers=2, vocab_size=V)


def pair(prompt, chosen, rejected):
    def seq(response):
        ids = np.array(prompt + response, np.int32)
        mask = np.zeros(len(ids), bool)
        mask[len(prompt) :] = True
        return ids, mask

    return EncodedPair(*seq(chosen), *seq(rejected))


PAIRS = [pair([1, 2], [3, 4, 5], [6]), pair([1, 7, 8, 9], [10, 2], [3, 3, 3, 3, 4]), pair([2], [5], [9, 8])]


def test_a_padded_pair_batch_scores_each_sequence_as_alone():
    model = tiny_llama()
    batch = collate_pairs(PAIRS, pad_multiple=8)
    sums, counts = sequence_logps(model, mx.array(batch["tokens"]), mx.array(batch["response_mask"]))
    chosen, rejected = split_pairs(sums)
    for i, p in enumerate(PAIRS):
        for got, ids, mask in ((chosen[i], p.chosen, p.chosen_mask), (rejected[i], p.rejected, p.rejected_mask)):
            alone, n = sequence_logps(model, mx.array(ids[None]), mx.array(mask[None]))
            assert got.item() == pytest.approx(alone.item(), abs=1e-5)
    assert counts.tolist() == [3, 2, 1, 1, 5, 2]


def test_at_step_zero_the_fused_lora_policy_is_the_reference_and_the_loss_is_ln2():
    model = tiny_llama()
    batch = collate_pairs(PAIRS)
    tokens, mask = mx.array(batch["tokens"]), mx.array(batch["response_mask"])
    reference, _ = sequence_logps(model, tokens, mask)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 20.0, "dropout": 0.0})  # lora_b starts at zero
    assert any(isinstance(m, FusedLoRALinear) for m in model.modules())
    policy, n = sequence_logps(model, tokens, mask)
    loss, metrics = dpo_loss(*split_pairs(policy), *split_pairs(reference), beta=0.1)
    assert abs(loss.item() - math.log(2)) < 1e-5
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(metrics[key].item()) < 1e-6, key
    # the loss has a gradient there: on lora_b (lora_a's is zero while lora_b is)

    def loss_fn(m):
        return dpo_loss(*split_pairs(sequence_logps(m, tokens, mask)[0]), *split_pairs(reference))[0]

    grads = dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model)[1]))
    assert grads and all(k.endswith(("lora_a", "lora_b")) for k in grads)  # the base is frozen
    assert all(float(mx.abs(v).max()) > 0 for k, v in grads.items() if k.endswith("lora_b"))
