"""Per-sequence log-probs of the response tokens of a padded ``[2B, T]`` batch, from any mlx-lm model.

A preference batch holds each pair's chosen sequence in rows ``0..B-1`` and its rejected
sequence in rows ``B..2B-1`` (`split_pairs`), so one forward scores both. ``response_mask``
marks the tokens the loss scores: a response's tokens (its end-of-turn tokens included),
never the prompt's, never padding.

The shift is done here and only here: the logits at position ``t`` predict the token at
``t + 1``, so the model sees ``tokens[:, :-1]`` and is scored on ``tokens[:, 1:]`` where
``response_mask[:, 1:]`` holds (a token at position 0 is never scored: nothing predicts
it). Masked positions are selected out with ``mx.where``, not multiplied by zero, so
whatever the model gives there (a huge or non-finite logit included) reaches neither the
sums nor the gradients.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

__all__ = ["sequence_logps", "split_pairs"]


def _check_batch(tokens, response_mask) -> None:
    if not isinstance(tokens, mx.array) or tokens.ndim != 2:
        raise ValueError(f"tokens must be a 2-D mx.array [sequences, T], got {getattr(tokens, 'shape', type(tokens))}")
    if not mx.issubdtype(tokens.dtype, mx.integer):
        raise ValueError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens need at least 2 positions (one predicts the next), got T = {tokens.shape[1]}")
    if not isinstance(response_mask, mx.array) or response_mask.shape != tokens.shape:
        shape = getattr(response_mask, "shape", type(response_mask))
        raise ValueError(f"response_mask must be an mx.array of the tokens' shape {tuple(tokens.shape)}, got {shape}")


def sequence_logps(model, tokens: mx.array, response_mask: mx.array) -> tuple[mx.array, mx.array]:
    """``(sum_logps, n_tokens)``, each ``[N]`` float32: each row's summed log-probability of
    its response tokens under ``model`` and how many tokens that sum covers.

    ``model(tokens[:, :-1])`` must return logits ``[N, T - 1, vocab]`` (any mlx-lm model
    does); ``response_mask`` is ``[N, T]``, bool or 0/1.
    """
    _check_batch(tokens, response_mask)
    logits = model(tokens[:, :-1]).astype(mx.float32)
    scored = response_mask[:, 1:].astype(mx.bool_)
    token_logps = -nn.losses.cross_entropy(logits, tokens[:, 1:])
    sum_logps = mx.where(scored, token_logps, 0.0).sum(axis=1)
    return sum_logps, scored.astype(mx.float32).sum(axis=1)


def split_pairs(per_sequence: mx.array) -> tuple[mx.array, mx.array]:
    """``(chosen, rejected)`` halves of a per-sequence ``[2B, ...]`` array laid out as the batches are."""
    n = per_sequence.shape[0]
    if n % 2:
        raise ValueError(f"a preference batch has an even number of rows (chosen then rejected), got {n}")
    return per_sequence[: n // 2], per_sequence[n // 2 :]
