"""Preference losses on per-sequence log-probs: DPO (sigmoid with cDPO label smoothing, IPO, hinge) and ORPO.

Every loss takes the summed log-probs of each pair's responses (prompt excluded, see
`sequence_logps`) and returns ``(loss, metrics)``, the loss a mean over the batch's pairs
and ``metrics`` a dict of scalars named as TRL logs them (`REWARD_METRICS`, `ORPO_METRICS`).

DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7), with ``π`` the policy, ``ref`` the
reference, ``w`` the chosen and ``l`` the rejected response:

    Δ = (log π(w) − log ref(w)) − (log π(l) − log ref(l))

- ``sigmoid``: ``−(1 − ε)·log σ(β·Δ) − ε·log σ(−β·Δ)``. With ``ε = label_smoothing = 0``
  this is the paper's loss; with ``ε > 0`` it is conservative DPO (cDPO, Mitchell 2023,
  "A note on DPO with noisy preferences", Eq. 3: the label is flipped with probability ε),
  as TRL's ``DPOTrainer.dpo_loss`` wrote its ``sigmoid`` loss up to its 0.x releases (TRL
  1.x's ``sigmoid`` no longer reads ``label_smoothing``; the same expression lives on in its
  ``aot`` loss). ``ε ∈ [0, 0.5)``.
- ``ipo``: ``(Δ̄ − 1/(2β))²`` (Azar et al. 2023, arXiv:2310.12036, Eq. 17, β being the
  paper's τ), where ``Δ̄`` is Δ with each response's log-ratio divided by its number of
  response tokens: TRL (its comment says the IPO authors confirmed the normalized form is
  the one their results used) and mlx-lm-lora both normalize so.
- ``hinge``: ``max(0, 1 − β·Δ)`` (the RSO paper's hinge on the normalized likelihood, Liu
  et al. 2023, arXiv:2309.06657; TRL's ``hinge``).

Rewards as TRL logs them: ``rewards/chosen = β·(log π(w) − log ref(w))`` per pair (the
unnormalized log-ratio, for IPO too), ``rewards/rejected`` likewise, ``rewards/accuracies``
the fraction of pairs whose chosen reward is strictly greater, ``rewards/margins`` the mean
difference, ``logps/chosen`` / ``logps/rejected`` the mean summed policy log-probs.

ORPO (Hong et al. 2024, arXiv:2403.07691, Eqs. 4-7) is reference-free and works on
length-normalized log-probs ``p̄ = log P(y|x) / |y|`` (TRL's ``ORPOTrainer`` and mlx-lm-lora
average over the response tokens):

    log odds(y) = p̄ − log(1 − exp(p̄))
    loss = NLL(w) − λ·mean(log σ(log odds(w) − log odds(l)))

with ``λ = beta`` (TRL's name; 0.1 by default in TRL, mlx-lm-lora and the paper). ``NLL(w)``
is the mean negative log-prob per chosen response token over the batch (the prompt is not
trained on: the official ORPO code's ``disable_prompt_loss``, mlx-lm-lora; TRL's includes the
prompt). Metrics: the six above with ``rewards = β·p̄`` and ``logps = p̄`` (TRL's), plus TRL's
``nll_loss``, ``log_odds_ratio`` (the mean ``log σ(·)``) and ``log_odds_chosen`` (the mean
log-odds difference).

Everything is computed in float32. ``value_and_grad`` differentiates the loss only; the
metrics ride along as auxiliary outputs.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

__all__ = ["DPO_LOSS_TYPES", "REWARD_METRICS", "ORPO_METRICS", "dpo_loss", "orpo_loss", "log1mexp"]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
REWARD_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
ORPO_METRICS = REWARD_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")

# log(1 - exp(x)) is -inf at x = 0 (a response of probability 1); ORPO's mean log-probs are
# kept at or below this, as mlx-lm-lora does, so the loss and its gradient stay finite.
_LOG1MEXP_MAX_X = -1e-7


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    return float(beta)


def _per_pair(names_and_arrays) -> list[mx.array]:
    """The inputs as float32 ``[B]`` arrays, refusing any other shape or a shape mismatch."""
    arrays = []
    first_name, first_shape = None, None
    for name, a in names_and_arrays:
        a = mx.array(a) if not isinstance(a, mx.array) else a
        if a.ndim != 1 or a.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty 1-D array (one value per pair), got shape {tuple(a.shape)}")
        if first_shape is None:
            first_name, first_shape = name, a.shape
        elif a.shape != first_shape:
            raise ValueError(f"{name} has shape {tuple(a.shape)}, {first_name} has {tuple(first_shape)}: one per pair")
        arrays.append(a.astype(mx.float32))
    return arrays


def _reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, mx.array]:
    """TRL's six reward metrics, each a mean over the batch's pairs."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(mx.float32).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.mean(),
        "logps/rejected": rejected_logps.mean(),
    }


def dpo_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    reference_chosen: mx.array,
    reference_rejected: mx.array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: mx.array | None = None,
    rejected_tokens: mx.array | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """DPO's loss and TRL's metrics from summed response log-probs, each ``[B]``.

    ``chosen_tokens`` / ``rejected_tokens`` (``[B]``, the response token counts that
    `sequence_logps` returns) are needed by ``ipo`` only, which length-normalizes.
    """
    beta = _check_beta(beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing (cDPO) applies to the sigmoid loss only, not to {loss_type!r}")
    named = [
        ("policy_chosen", policy_chosen),
        ("policy_rejected", policy_rejected),
        ("reference_chosen", reference_chosen),
        ("reference_rejected", reference_rejected),
    ]
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss length-normalizes: pass chosen_tokens and rejected_tokens")
        named += [("chosen_tokens", chosen_tokens), ("rejected_tokens", rejected_tokens)]
    pc, pr, rc, rr, *counts = _per_pair(named)

    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    if loss_type == "ipo":
        n_chosen, n_rejected = (mx.maximum(n, 1.0) for n in counts)
        delta = chosen_ratio / n_chosen - rejected_ratio / n_rejected
        losses = mx.square(delta - 1.0 / (2.0 * beta))
    elif loss_type == "hinge":
        losses = nn.relu(1.0 - beta * (chosen_ratio - rejected_ratio))
    else:
        logits = beta * (chosen_ratio - rejected_ratio)
        losses = -(1.0 - label_smoothing) * nn.log_sigmoid(logits)
        if label_smoothing:
            losses = losses - label_smoothing * nn.log_sigmoid(-logits)
    metrics = _reward_metrics(beta * chosen_ratio, beta * rejected_ratio, pc, pr)
    return losses.mean(), metrics


def log1mexp(x: mx.array) -> mx.array:
    """``log(1 − exp(x))`` for ``x < 0``, accurate on both sides of ``−ln 2`` (Mächler 2012,
    "Accurately computing log(1 − exp(−|a|))": ``log(−expm1(x))`` near 0, ``log1p(−exp(x))``
    below); ``x`` is capped at −1e-7 so the value stays finite."""
    x = mx.minimum(x, _LOG1MEXP_MAX_X)
    return mx.where(x > -math.log(2.0), mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def orpo_loss(
    chosen: mx.array,
    rejected: mx.array,
    chosen_tokens: mx.array,
    rejected_tokens: mx.array,
    *,
    beta: float = 0.1,
) -> tuple[mx.array, dict[str, mx.array]]:
    """ORPO's loss and metrics from the policy's summed response log-probs and token counts, each ``[B]``."""
    beta = _check_beta(beta)
    sc, sr, nc, nr = _per_pair(
        [
            ("chosen", chosen),
            ("rejected", rejected),
            ("chosen_tokens", chosen_tokens),
            ("rejected_tokens", rejected_tokens),
        ]
    )
    mean_chosen, mean_rejected = sc / mx.maximum(nc, 1.0), sr / mx.maximum(nr, 1.0)
    nll = -sc.sum() / mx.maximum(nc.sum(), 1.0)
    log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))
    # one array for the loss and its metric: under mx.compile, MLX 0.32.4's value_and_grad fails
    # (IndexError `_Map_base::at`) when an auxiliary output recomputes an expression of the loss
    log_odds_ratio = nn.log_sigmoid(log_odds).mean()
    loss = nll - beta * log_odds_ratio
    metrics = _reward_metrics(beta * mean_chosen, beta * mean_rejected, mean_chosen, mean_rejected)
    metrics.update(nll_loss=nll, log_odds_ratio=log_odds_ratio, log_odds_chosen=log_odds.mean())
    return loss, metrics
