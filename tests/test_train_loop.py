"""The generic loop trains a model that is not CSM: it learns, accumulates, validates, checkpoints and resumes exactly."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_fused_lora.layers import FusedLoRALinear
from mlx_fused_lora.train.checkpoint import load_checkpoint, save_checkpoint
from mlx_fused_lora.train.loop import LoopSettings, make_schedule, train
from mlx_fused_lora.train.metrics import MetricsLog
from mlx_fused_lora.train.resume import restore

RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, 16)).astype(np.float32)
Y = (X @ RNG.standard_normal((16, 4)).astype(np.float32)).astype(np.float32)


def _model():
    mx.random.seed(1)
    model = nn.Sequential(FusedLoRALinear(16, 4, r=4, dropout=0.1, scale=2.0))
    model.freeze()
    model.layers[0].unfreeze(keys=["lora_a", "lora_b"])
    return model


def _loss(model, x, y):
    err = ((model(x) - y) ** 2).mean()
    return err, (mx.abs(model(x) - y).mean(),)


def _batches(i):
    rows = np.random.default_rng([7, i]).permutation(64)[:8]  # a pure function of the micro-batch index
    return (mx.array(X[rows]), mx.array(Y[rows])), 8.0


def _run(tmp_path, steps, start=0, resume=None):
    model = _model()
    schedule = make_schedule(0.1, 20, 2, "cosine")
    optimizer = optim.Adam(learning_rate=schedule)
    optimizer.init(model.trainable_parameters())
    if resume is not None:
        adapters, opt_state, state = load_checkpoint(resume)
        restore(model, optimizer, adapters, opt_state, state["checkpoint_dir"])

    def save(step):
        params = dict(tree_flatten(model.trainable_parameters()))
        return save_checkpoint(tmp_path / "ckpt", step, params, dict(tree_flatten(optimizer.state)), {"step": step})

    settings = LoopSettings(steps=steps, start_step=start, grad_accumulation_steps=2, max_grad_norm=5.0, seed=3)
    metrics = MetricsLog(tmp_path / "metrics.jsonl", start)
    result = train(
        model,
        optimizer,
        _loss,
        _batches,
        settings,
        schedule=schedule,
        aux_names=("mae",),
        evaluate=lambda: _loss(model, mx.array(X), mx.array(Y))[0].item(),
        save=save,
        metrics=metrics,
        progress=False,
    )
    return model, result, metrics


def test_the_loop_trains_a_plain_model_and_resumes_bit_for_bit(tmp_path):
    ref, result, metrics = _run(tmp_path / "ref", 20)
    losses = [loss for _, loss in result.losses]
    assert result.steps == 20 and sum(losses[-3:]) < 0.5 * sum(losses[:3]), losses
    assert result.val_loss is not None and metrics.val_loss_at(20) == result.val_loss
    assert result.checkpoint.name == "step_00000020" and result.steps_per_s > 0 and result.tokens_per_s > 0

    _, first, _ = _run(tmp_path / "split", 10)  # a run of 10 steps, then 10 more from its checkpoint
    assert first.checkpoint.name == "step_00000010"
    resumed, second, metrics = _run(tmp_path / "split", 20, start=10, resume=tmp_path / "split" / "ckpt")
    assert [s for s, _ in metrics.train] == list(range(1, 21))
    a, b = dict(tree_flatten(ref.trainable_parameters())), dict(tree_flatten(resumed.trainable_parameters()))
    assert sorted(a) == ["layers.0.lora_a", "layers.0.lora_b"]
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k
    assert second.losses == result.losses[10:]


def test_a_report_line_every_n_steps(tmp_path, caplog):
    """``report_every``: a log line of the step's metrics every N steps (mlx-lm's
    --steps-per-report); no grad_norm in it when nothing is clipped (it would read 0)."""
    model = _model()
    optimizer = optim.Adam(learning_rate=0.01)
    optimizer.init(model.trainable_parameters())
    caplog.set_level("INFO", logger="mlx_fused_lora.train.loop")
    settings = LoopSettings(steps=5, report_every=2)
    train(model, optimizer, _loss, _batches, settings, aux_names=("mae",), progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "mlx_fused_lora.train.loop"]
    reports = [line for line in lines if line.startswith("step ") and "mae" in line]
    assert [line.split(":")[0] for line in reports] == ["step 2", "step 4"]
    assert reports[0].split(": ")[1].startswith("loss ") and "grad_norm" not in reports[0]
