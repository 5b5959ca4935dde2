"""Preference losses: each formula on hand-made log-probs, TRL's own code on the same numbers, B = 0 gives ln 2."""

import math
from collections import defaultdict
from types import SimpleNamespace

import mlx.core as mx
import pytest
from mlx_fused_lora.train.preference import ORPO_METRICS, REWARD_METRICS, dpo_loss, orpo_loss
from mlx_fused_lora.train.preference.losses import log1mexp

# Two pairs. β = 0.5. Log-ratios (policy − reference): chosen [0.5, −1.0], rejected
# [−0.5, −0.5], so Δ = [1.0, −0.5] and β·Δ = [0.5, −0.25].
POLICY_CHOSEN = [-3.0, -5.0]
POLICY_REJECTED = [-4.0, -4.5]
REFERENCE_CHOSEN = [-3.5, -4.0]
REFERENCE_REJECTED = [-3.5, -4.0]
CHOSEN_TOKENS = [2.0, 4.0]
REJECTED_TOKENS = [5.0, 1.0]
BETA = 0.5


def dpo(**kw):
    arrays = (mx.array(a) for a in (POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED))
    counts = dict(chosen_tokens=mx.array(CHOSEN_TOKENS), rejected_tokens=mx.array(REJECTED_TOKENS))
    loss, metrics = dpo_loss(*arrays, beta=BETA, **{**counts, **kw})
    return loss.item(), {k: v.item() for k, v in metrics.items()}


def test_sigmoid_is_the_dpo_paper_loss():
    # −log σ(0.5) = log(1 + e^−0.5) = 0.474077, −log σ(−0.25) = log(1 + e^0.25) = 0.825939
    loss, _ = dpo(loss_type="sigmoid")
    assert loss == pytest.approx((0.4740770 + 0.8259394) / 2, abs=1e-6)


def test_label_smoothing_is_cdpo():
    # (1−ε)·softplus(−βΔ) + ε·softplus(βΔ) = softplus(−βΔ) + ε·βΔ (softplus(x) − softplus(−x) = x):
    # with ε = 0.2 the loss rises by 0.2 · mean(0.5, −0.25) = 0.025.
    loss, _ = dpo(loss_type="sigmoid", label_smoothing=0.2)
    assert loss == pytest.approx(0.6500082 + 0.025, abs=1e-6)


def test_ipo_length_normalizes_and_targets_one_over_two_beta():
    # Δ̄ = 0.5/2 − (−0.5)/5 = 0.35 and −1.0/4 − (−0.5)/1 = 0.25; target 1/(2β) = 1:
    # ((0.35 − 1)² + (0.25 − 1)²) / 2 = (0.4225 + 0.5625) / 2
    loss, _ = dpo(loss_type="ipo")
    assert loss == pytest.approx(0.4925, abs=1e-6)


def test_hinge():
    # max(0, 1 − 0.5) = 0.5 and max(0, 1 + 0.25) = 1.25
    loss, _ = dpo(loss_type="hinge")
    assert loss == pytest.approx(0.875, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_rewards_are_trls(loss_type):
    # rewards β·log-ratio: chosen [0.25, −0.5], rejected [−0.25, −0.25], whatever the loss
    _, m = dpo(loss_type=loss_type)
    assert tuple(m) == REWARD_METRICS
    expected = {
        "rewards/chosen": -0.125,
        "rewards/rejected": -0.25,
        "rewards/accuracies": 0.5,  # 0.25 > −0.25 yes, −0.5 > −0.25 no
        "rewards/margins": 0.125,
        "logps/chosen": -4.0,
        "logps/rejected": -4.25,
    }
    assert m == pytest.approx(expected, abs=1e-6)


def test_at_b_zero_the_loss_is_ln2_and_the_rewards_zero():
    same = mx.array([-7.25, -3.5, -11.0])
    for smoothing in (0.0, 0.1):
        loss, m = dpo_loss(same, same + 1.0, same, same + 1.0, beta=0.1, label_smoothing=smoothing)
        assert abs(loss.item() - math.log(2)) < 1e-5
        assert m["rewards/chosen"].item() == m["rewards/rejected"].item() == m["rewards/margins"].item() == 0
        assert m["rewards/accuracies"].item() == 0  # a tie is no win, as TRL counts


def test_orpo_by_hand():
    # Mean log-probs: chosen −2/4 = −0.5 and −3/2 = −1.5, rejected −6/3 = −2 and −2/4 = −0.5.
    # log odds(p̄) = p̄ − log(1 − e^p̄): −0.5 + 0.932752 = 0.432752, −2 + 0.145413 = −1.854587,
    # so pair 1's difference is 2.287339; pair 2's is (−1.5 + 0.251929) − (−0.5 + 0.932752) = −1.680270.
    # NLL = (2 + 3) / (4 + 2) per chosen response token.
    loss, m = orpo_loss(mx.array([-2.0, -3.0]), mx.array([-6.0, -2.0]), mx.array([4, 2]), mx.array([3, 4]), beta=0.25)
    m = {k: v.item() for k, v in m.items()}
    log_sig = [-math.log1p(math.exp(-2.287339)), -math.log1p(math.exp(1.680270))]
    assert tuple(m) == ORPO_METRICS
    assert m["log_odds_chosen"] == pytest.approx((2.287339 - 1.680270) / 2, abs=1e-5)
    assert m["log_odds_ratio"] == pytest.approx(sum(log_sig) / 2, abs=1e-5)
    assert m["nll_loss"] == pytest.approx(5 / 6, abs=1e-6)
    assert loss.item() == pytest.approx(5 / 6 - 0.25 * sum(log_sig) / 2, abs=1e-5)
    assert m["rewards/chosen"] == pytest.approx(0.25 * (-0.5 - 1.5) / 2)
    assert m["rewards/accuracies"] == 0.5  # −0.5 > −2 yes, −1.5 > −0.5 no
    assert m["logps/rejected"] == pytest.approx(-1.25)


def test_log1mexp_is_accurate_on_both_branches_and_finite_at_zero():
    x = mx.array([-1e-6, -0.1, -0.69, -0.7, -5.0, -40.0, 0.0])
    got = log1mexp(x).tolist()
    for xi, gi in zip(x.tolist()[:-1], got[:-1], strict=True):
        assert gi == pytest.approx(math.log(-math.expm1(xi)), rel=1e-5)
    assert math.isfinite(got[-1])
    grad = mx.grad(lambda v: log1mexp(v).sum())(x)
    assert all(math.isfinite(g) for g in grad.tolist())


def test_gradients_raise_the_chosen_and_lower_the_rejected_log_probs():
    # d loss / d policy_chosen < 0 (raising the chosen log-prob lowers the loss), > 0 for rejected
    pc, pr = mx.array(POLICY_CHOSEN), mx.array(POLICY_REJECTED)
    rc, rr = mx.array(REFERENCE_CHOSEN), mx.array(REFERENCE_REJECTED)
    for loss_type in ("sigmoid", "ipo", "hinge"):
        kw = dict(
            beta=BETA,
            loss_type=loss_type,
            chosen_tokens=mx.array(CHOSEN_TOKENS),
            rejected_tokens=mx.array(REJECTED_TOKENS),
        )
        gc, gr = mx.grad(lambda a, b, kw=kw: dpo_loss(a, b, rc, rr, **kw)[0], argnums=(0, 1))(pc, pr)
        assert (gc < 0).all().item() and (gr > 0).all().item(), loss_type
    gc, gr = mx.grad(lambda a, b: orpo_loss(a, b, mx.array([4, 2]), mx.array([3, 4]))[0], argnums=(0, 1))(pc, pr)
    assert (gc < 0).all().item() and (gr > 0).all().item()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "orpo"])
def test_each_loss_compiles_with_its_metrics_as_the_training_step_does(loss_type):
    # the loop compiles value_and_grad of (loss, metrics): every output must survive it
    rc, rr = mx.array(REFERENCE_CHOSEN), mx.array(REFERENCE_REJECTED)
    nc, nr = mx.array(CHOSEN_TOKENS), mx.array(REJECTED_TOKENS)

    def loss_fn(pc, pr):
        if loss_type == "orpo":
            loss, metrics = orpo_loss(pc, pr, nc, nr)
        else:
            loss, metrics = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, chosen_tokens=nc, rejected_tokens=nr)
        return loss, tuple(metrics.values())

    step = mx.compile(mx.value_and_grad(loss_fn, argnums=(0, 1)))
    (loss, metrics), grads = step(mx.array(POLICY_CHOSEN), mx.array(POLICY_REJECTED))
    eager, eager_metrics = loss_fn(mx.array(POLICY_CHOSEN), mx.array(POLICY_REJECTED))
    assert loss.item() == pytest.approx(eager.item(), rel=1e-6)
    assert [m.item() for m in metrics] == pytest.approx([m.item() for m in eager_metrics], rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta=0.0), "beta must be a finite number > 0, got 0.0"),
        (dict(beta=float("nan")), "beta must be a finite number > 0"),
        (dict(loss_type="kto"), "loss_type must be one of sigmoid, ipo, hinge, got 'kto'"),
        (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\), got 0.5"),
        (dict(loss_type="hinge", label_smoothing=0.1), "applies to the sigmoid loss only, not to 'hinge'"),
        (dict(loss_type="ipo"), "the ipo loss length-normalizes: pass chosen_tokens and rejected_tokens"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    a = mx.array([-1.0, -2.0])
    with pytest.raises(ValueError, match=message):
        dpo_loss(a, a, a, a, **kwargs)


def test_mismatched_or_non_vector_inputs_are_refused():
    a, b = mx.array([-1.0, -2.0]), mx.array([-1.0, -2.0, -3.0])
    with pytest.raises(ValueError, match=r"reference_rejected has shape \(3,\), policy_chosen has \(2,\)"):
        dpo_loss(a, a, a, b)
    with pytest.raises(ValueError, match=r"policy_chosen must be a non-empty 1-D array .* got shape \(2, 1\)"):
        dpo_loss(a[:, None], a, a, a)
    with pytest.raises(ValueError, match="rejected_tokens has shape"):
        orpo_loss(a, a, a, b)


# --------------------------------------------------------------------------- TRL's own code


def _trl():
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    return torch


def trl_dpo(loss_type, label_smoothing=0.0, pairs=None):
    """TRL's ``DPOTrainer._compute_loss`` run on our numbers: a stand-in model returns the
    per-token log-probs (each response's sum spread over its tokens after a one-token
    prompt), and the reference log-probs come in precomputed, as TRL's
    ``precompute_ref_log_probs`` feeds them."""
    torch = _trl()
    from trl.trainer.dpo_trainer import DPOTrainer

    pairs = range(len(POLICY_CHOSEN)) if pairs is None else pairs
    sums = [POLICY_CHOSEN[i] for i in pairs] + [POLICY_REJECTED[i] for i in pairs]
    counts = [int(CHOSEN_TOKENS[i]) for i in pairs] + [int(REJECTED_TOKENS[i]) for i in pairs]
    rows, length = len(sums), max(counts) + 1
    completion_mask = torch.zeros(rows, length, dtype=torch.long)
    per_token = torch.zeros(rows, length - 1, dtype=torch.float64)
    for r, (s, n) in enumerate(zip(sums, counts, strict=True)):
        completion_mask[r, 1 : 1 + n] = 1
        per_token[r, :n] = s / n  # logits at t predict token t + 1

    class StandIn(torch.nn.Module):
        def forward(self, **_):
            zeros = torch.zeros_like(per_token)
            return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=BETA,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(rows, length, dtype=torch.long),
        "attention_mask": torch.ones(rows, length, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor([REFERENCE_CHOSEN[i] for i in pairs], dtype=torch.float64),
        "ref_rejected_logps": torch.tensor([REFERENCE_REJECTED[i] for i in pairs], dtype=torch.float64),
    }
    loss = DPOTrainer._compute_loss(trainer, StandIn(), inputs, False)
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["eval"].items() if k in REWARD_METRICS}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_matches_trls_dpo_trainer(loss_type):
    trl_loss, trl_metrics = trl_dpo(loss_type)
    loss, metrics = dpo(loss_type=loss_type)
    assert loss == pytest.approx(trl_loss, rel=1e-6, abs=1e-7)
    assert metrics == pytest.approx(trl_metrics, rel=1e-6, abs=1e-7)


def test_cdpo_matches_trls_label_smoothed_form():
    # TRL 1.x's sigmoid ignores label_smoothing; its "aot" loss keeps the cDPO expression and,
    # for one pair at a time (nothing to sort), is exactly cDPO. Our batch mean = the mean of those.
    trl_losses = [trl_dpo("aot", label_smoothing=0.2, pairs=[i])[0] for i in range(len(POLICY_CHOSEN))]
    loss, _ = dpo(loss_type="sigmoid", label_smoothing=0.2)
    assert loss == pytest.approx(sum(trl_losses) / len(trl_losses), rel=1e-6)


def test_orpo_matches_trls_odds_ratio_loss():
    torch = _trl()
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    sums_c, sums_r, n_c, n_r = [-2.0, -3.0, -0.3], [-6.0, -2.0, -9.0], [4, 2, 3], [3, 4, 2]
    trainer = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    mean_c = torch.tensor([s / n for s, n in zip(sums_c, n_c, strict=True)], dtype=torch.float64)
    mean_r = torch.tensor([s / n for s, n in zip(sums_r, n_r, strict=True)], dtype=torch.float64)
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        trainer, mean_c, mean_r
    )
    loss, m = orpo_loss(*(mx.array(a) for a in (sums_c, sums_r, n_c, n_r)), beta=0.25)
    # TRL: loss = NLL − mean(β · log σ(log odds)); its NLL covers the prompt too, ours not: compare the rest
    assert (loss - m["nll_loss"]).item() == pytest.approx(-losses.mean().item(), rel=1e-5)
    assert m["log_odds_ratio"].item() == pytest.approx(log_odds_ratio.item(), rel=1e-5)
    assert m["log_odds_chosen"].item() == pytest.approx(log_odds_chosen.item(), rel=1e-5)
    assert m["rewards/chosen"].item() == pytest.approx(chosen_rewards.mean().item(), rel=1e-6)
    assert m["rewards/rejected"].item() == pytest.approx(rejected_rewards.mean().item(), rel=1e-6)
    accuracy = (chosen_rewards > rejected_rewards).double().mean().item()
    assert m["rewards/accuracies"].item() == pytest.approx(accuracy)
