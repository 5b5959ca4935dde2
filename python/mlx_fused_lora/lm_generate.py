"""Batch generation on an mlx-lm model where each prompt names its adapter: many users' adapters served in one batch.

``batch_generate(model, tokenizer, prompts, adapters)`` runs every prompt in one batch,
each row on its own named adapter (`adapters.mixed_batch`: one mixed op call per layer),
and returns each prompt's generated tokens.

Decision: a loop of our own, not mlx-lm's ``batch_generate`` / ``BatchGenerator``. Those
batch continuously: prompts are grouped, rows leave the batch when they finish and new
ones join, inside the generator, and the model sees only tokens and a cache. The rows'
adapters would have to follow those moves, which no argument of theirs carries. The loop
here keeps one fixed batch: prompts left-padded into mlx-lm's ``BatchKVCache`` (its
padding-aware attention masks, as its own batch generation uses), the prompt prefilled
in one call, then one token per row per step until every row has stopped; a row that
stopped keeps a place in the batch (its further tokens are dropped). Models whose cache is
not plain ``KVCache`` layers (sliding windows, state-space layers) are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

from .adapters.mixed import mixed_batch

__all__ = ["batch_generate"]


def _tokens(prompt, tokenizer) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("batch_generate: text prompts need a tokenizer")
        return list(tokenizer.encode(prompt))
    return [int(t) for t in prompt]


def _stop_ids(tokenizer) -> set[int]:
    if tokenizer is None:
        return set()
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        ids = [] if eos is None else [eos]
    return {int(i) for i in ids}


def batch_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence,
    adapters: Sequence,
    *,
    max_tokens: int = 64,
    sampler: Callable[[mx.array], mx.array] | None = None,
) -> list[list[int]]:
    """Generate up to ``max_tokens`` tokens after each prompt, prompt ``i`` on ``adapters[i]``.

    ``prompts``: strings (encoded by ``tokenizer``) or token id lists. ``adapters``: one entry
    per prompt, an adapter name (`adapters.list_adapters`) or None for the base model.
    ``sampler``: mlx-lm's kind (``mlx_lm.sample_utils.make_sampler``: log-probabilities
    ``(B, V)`` to tokens ``(B,)``); default greedy. A row stops at the tokenizer's end of
    sequence (not returned). Returns each prompt's generated token ids.
    """
    from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

    if len(adapters) != len(prompts):
        raise ValueError(f"batch_generate: {len(prompts)} prompts but {len(adapters)} adapters: give one per prompt")
    if not prompts:
        return []
    kinds = {type(c).__name__ for c in make_prompt_cache(model)}
    if kinds != {"KVCache"}:
        raise ValueError(
            f"batch_generate: {type(model).__name__}'s cache holds {sorted(kinds)}; this loop batches plain "
            "KVCache layers only (mlx-lm's BatchKVCache)"
        )
    if max_tokens < 1:
        raise ValueError(f"batch_generate: max_tokens must be >= 1, got {max_tokens}")
    rows = [_tokens(p, tokenizer) for p in prompts]
    if not all(rows):
        raise ValueError("batch_generate: every prompt needs at least one token")
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    stop = _stop_ids(tokenizer)
    longest = max(len(r) for r in rows)
    padding = [longest - len(r) for r in rows]
    inputs = mx.array([[0] * pad + r for pad, r in zip(padding, rows, strict=True)])
    cache = [BatchKVCache(padding) for _ in model.layers]
    out, done = [[] for _ in rows], [False] * len(rows)
    was_training = model.training
    model.eval()
    try:
        with mixed_batch(model, list(adapters)):
            logits = model(inputs, cache=cache)[:, -1]
            for _ in range(max_tokens):
                tokens = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
                for i, t in enumerate(tokens.tolist()):
                    done[i] = done[i] or t in stop
                    if not done[i]:
                        out[i].append(t)
                if all(done):
                    break
                logits = model(tokens[:, None], cache=cache)[:, -1]
    finally:
        model.train(was_training)
    return out
