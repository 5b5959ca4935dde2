"""CSM's training loss: semantic (codebook 0) + acoustic (codebooks 1..K-1), weighted.

Teacher forcing over frames: the backbone state of row ``t`` predicts the codes of row
``t + 1``. Codebook 0 is scored on every target row; the decoder (codebooks 1..K-1) runs
on a random ``decoder_fraction`` of the rows only (Sesame's compute amortization, 1/16 in
the paper). Rows are drawn per sequence among its target rows, by ranking uniform noise
plus the target flag, so target rows always outrank others; a short sequence's extra
picks land on non-target rows, which are masked out of the mean.

``semantic = mean CE(codebook 0)`` over target rows,
``acoustic = mean over picked target rows of (mean CE over codebooks 1..K-1)``,
``loss = semantic_weight * semantic + acoustic_weight * acoustic``.

With ``groups`` (a group per sequence: the adapter each row trains, one per speaker) each
mean is taken within each group and the groups' means are summed: each adapter then gets
exactly the gradient of the loss of its own rows alone (a plain batch mean would scale it
by its share of the batch's rows, a share that changes from batch to batch).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

__all__ = ["decoder_rows", "csm_loss"]


def decoder_rows(num_rows: int, fraction: float) -> int:
    """How many rows per sequence the decoder runs on (at least one)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"decoder_fraction must be in (0, 1], got {fraction}")
    return max(1, min(num_rows, math.ceil(fraction * num_rows)))


def csm_loss(
    model,
    tokens: mx.array,
    mask: mx.array,
    target: mx.array,
    *,
    semantic_weight: float,
    acoustic_weight: float,
    decoder_fraction: float,
    key: mx.array | None = None,
    groups: mx.array | None = None,
    num_groups: int = 1,
):
    """``(loss, (semantic, acoustic))`` of a batch.

    ``tokens``/``mask`` ``[B, L, K+1]``, ``target`` ``[B, L]`` (bool: rows trained on).
    ``key`` fixes the decoder's row choice (validation); None draws it from ``mx.random``
    (training, with the random state threaded through ``mx.compile``). ``groups`` ``[B]``
    (ints in ``[0, num_groups)``): the means per group, summed.
    """
    K = model.config.audio_num_codebooks
    h = model(tokens[:, :-1], mask[:, :-1])  # row t predicts row t + 1
    codes = tokens[:, 1:, :K]
    weight = target[:, 1:].astype(mx.float32)

    logits0 = model.codebook0_head(h)
    ce0 = nn.losses.cross_entropy(logits0.astype(mx.float32), codes[..., 0])
    semantic = _mean(ce0, weight, groups, num_groups)

    n_dec = decoder_rows(h.shape[1], decoder_fraction)
    noise = mx.random.uniform(shape=weight.shape, key=key)
    picked = mx.argsort(-(noise + weight), axis=1)[:, :n_dec]
    h_dec = mx.take_along_axis(h, picked[..., None], axis=1)
    codes_dec = mx.take_along_axis(codes, picked[..., None], axis=1)
    weight_dec = mx.take_along_axis(weight, picked, axis=1)
    logits = model.codebook_logits(h_dec, codes_dec)[:, :, 1:]
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), codes_dec[..., 1:]).mean(axis=-1)
    acoustic = _mean(ce, weight_dec, groups, num_groups)

    loss = semantic_weight * semantic + acoustic_weight * acoustic
    # (The count of target rows is not returned: an output that depends on the inputs only
    # breaks mx.compile in MLX 0.32 (`_Map_base::at`); callers count ``target`` themselves.)
    return loss, (semantic, acoustic)


def _mean(values: mx.array, weight: mx.array, groups: mx.array | None, num_groups: int) -> mx.array:
    """The ``weight``-ed mean of ``values`` ``[B, T]``; with ``groups`` ``[B]``, the sum of each group's mean."""
    if groups is None:
        return (values * weight).sum() / mx.maximum(weight.sum(), 1.0)
    members = (groups[:, None] == mx.arange(num_groups)).astype(mx.float32)  # [B, groups]
    sums = (values * weight).sum(axis=1) @ members
    return (sums / mx.maximum(weight.sum(axis=1) @ members, 1.0)).sum()
