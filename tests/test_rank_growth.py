"""A rank that grows during training (issue 24, part 2): the schedule, a growth step (outputs
continuous, the old columns' Adam moments kept bit for bit, one new trace per rank), and
``finetune --rank-schedule`` resumed across a growth, bit for bit."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_fused_lora.adapters import add_adapter, read_adapters, set_adapter
from mlx_fused_lora.layers import FusedDoRALinear, FusedLoRALinear
from mlx_fused_lora.layers.growth import RankSchedule, adapter_rank, grow_rank
from mlx_fused_lora.train.checkpoint import load_checkpoint
from mlx_fused_lora.train.csm.cli import main as finetune
from train_helpers import finetune_args, write_tiny_run


def test_the_schedule_gives_the_rank_of_each_step_and_refuses_what_cannot_be():
    schedule = RankSchedule.parse("8:0, 16:500,32:2000", 8)
    assert [schedule.rank_at(s) for s in (0, 499, 500, 1999, 2000, 10**6)] == [8, 8, 16, 16, 32, 32]
    assert str(schedule) == "8:0,16:500,32:2000" and schedule.max_rank == 32
    assert RankSchedule.parse([(12, 3)], 4).rank_at(3) == 12
    for spec, message in [
        ("16", "each entry must be RANK:STEP"),
        ("16:x", "each entry must be RANK:STEP"),
        ("4:0,16:5", "the rank at step 0 is the adapter's own .* 8.*got 4:0"),
        ("16:5,12:9", "steps and ranks must both increase.*got 12:9 after 16:5"),
        ("16:9,32:9", "must both increase"),
        ("4:5", "must both increase from rank 8"),
    ]:
        with pytest.raises(ValueError, match=message):
            RankSchedule.parse(spec, 8)


class Stack(nn.Module):
    """Two fused layers (LoRA, DoRA) over frozen bases, and one named adapter beside the first."""

    def __init__(self):
        super().__init__()
        self.layers = [FusedLoRALinear.from_base(nn.Linear(24, 24), r=2, scale=2.0, dropout=0.1)]
        self.layers.append(FusedDoRALinear.from_base(nn.Linear(24, 16), r=2, scale=2.0))

    def __call__(self, x):
        return self.layers[1](nn.gelu(self.layers[0](x)))


def test_a_growth_keeps_outputs_and_old_moments_and_traces_once_per_rank():
    mx.random.seed(0)
    model = Stack()
    model.freeze()
    for layer in model.layers:
        layer.unfreeze(keys=["lora_a", "lora_b", "m"], recurse=False, strict=False)
    optimizer = optim.AdamW(learning_rate=1e-2, weight_decay=0.1)
    optimizer.init(model.trainable_parameters())  # as the trainers do: the state's structure fixed before tracing
    traces = []

    def loss_fn(m, x):
        traces.append(x.shape)
        return (m(x) ** 2).mean()

    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x):
        loss, grad = value_and_grad(model, x)
        optimizer.update(model, grad)
        return loss

    x = mx.random.normal((6, 24), key=mx.random.key(1))
    for _ in range(3):
        mx.eval(step(x), state)
    model.eval()
    moments = lambda: [(k, v) for k, v in tree_flatten(optimizer.state) if ".lora_" in k]  # noqa: E731
    before, old = model(x), {k: np.array(v) for k, v in moments()}
    model.train()
    assert grow_rank(model, 5, optimizer, key=mx.random.key(2)) == 2 and adapter_rank(model) == 5
    model.eval()
    np.testing.assert_array_equal(model(x), before)  # lora_b's new rows are zeros: not a bit moved
    model.train()
    assert len(old) == 8  # m and v of lora_a and lora_b of both layers
    for k, v in moments():
        kept = np.array(v)[:, :2] if ".lora_a." in k else np.array(v)[:2]
        new = np.array(v)[:, 2:] if ".lora_a." in k else np.array(v)[2:]
        assert np.array_equal(kept, old[k]) and not new.any(), k  # old moments bit for bit, new ones zero
    a = np.array(model.layers[0].lora_a)
    assert a.shape == (24, 5) and np.abs(a[:, 2:]).max() <= 1 / np.sqrt(24) and np.abs(a[:, 2:]).min() > 0
    assert not np.array(model.layers[0].lora_b)[2:].any()
    for _ in range(3):
        mx.eval(step(x), state)
    assert len(traces) == 2, "one trace per rank, none per step"
    assert np.array(model.layers[0].lora_b)[2:].any()  # the new rows learn
    assert grow_rank(model, 4, optimizer) == 0  # never shrinks


def test_a_named_adapter_grows_alone_and_what_cannot_grow_says_why():
    from mlx_fused_lora.csm import CSM, CSMConfig

    model = CSM(CSMConfig.tiny())
    add_adapter(model, "default", {"rank": 2, "keys": ["q_proj"]})
    add_adapter(model, "voice", {"rank": 2, "keys": ["q_proj"], "init_lora_weights": "gaussian"})
    set_adapter(model, ["default", "voice"])
    adam = optim.Adam(learning_rate=1e-3)
    adam.init(model.trainable_parameters())
    assert grow_rank(model, 6, adam, name="voice") == 4
    assert (adapter_rank(model, "voice"), adapter_rank(model, "default")) == (6, 2)
    q = model.backbone.layers[0].self_attn.q_proj
    assert q.adapters["voice"].lora_a.shape == (64, 6) and q.lora_a.shape == (64, 2)
    moments = adam.state["backbone"]["layers"][0]["self_attn"]["q_proj"]
    assert moments["adapters"]["voice"]["lora_b"]["v"].shape == (6, 64) and moments["lora_b"]["v"].shape == (2, 64)
    model(mx.zeros((1, 3, 9), dtype=mx.int32), mx.ones((1, 3, 9)))  # stacked at ranks 2 + 6
    pissa = FusedLoRALinear.from_base(nn.Linear(16, 16), r=2, scale=1.0, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="started from init_lora_weights='pissa'.*move more out of the base"):
        grow_rank(pissa, 4)
    layer = FusedLoRALinear.from_base(nn.Linear(16, 16), r=2)
    factored = optim.Adafactor()
    factored.init(layer.trainable_parameters())
    with pytest.raises(ValueError, match="optimizer's state lora_a.exp_avg_sq_row has shape.*Adafactor"):
        grow_rank(layer, 4, factored)
    assert layer.lora_a.shape == (16, 2)  # refused before anything changed


def test_finetune_resumed_across_a_growth_is_bit_exact(tmp_path):
    root, model_dir, audio = write_tiny_run(tmp_path, 6)
    common = ["--max-steps", "6", "--save-every", "2", "--val-every", "0", "--lora-dropout", "0.1"]
    common += ["--rank-schedule", "16:2,32:4", "--target-modules", "q_proj", "v_proj"]
    ref = tmp_path / "ref"
    assert finetune(finetune_args(model_dir, audio, ref, *common)) == 0
    saved = read_adapters(ref)[0]
    assert {m.r for m in saved.modules.values()} == {32}  # a plain LoRA file of the final rank
    assert [load_checkpoint(ref / "checkpoints" / f"step_{s:08d}")[2]["lora_rank"] for s in (2, 4, 6)] == [8, 16, 32]
    for step in (2, 4):  # the last step before a growth: resumed, the growth happens as it did
        out = tmp_path / f"from{step}"
        args = finetune_args(
            model_dir, audio, out, *common, "--resume-from", str(ref / "checkpoints" / f"step_{step:08d}")
        )
        assert finetune(args) == 0
        assert (out / "fine_tuned_model.safetensors").read_bytes() == (
            ref / "fine_tuned_model.safetensors"
        ).read_bytes()
    assert finetune(finetune_args(model_dir, audio, tmp_path / "x", *common, "--rank-pattern", "q_proj=4")) == 1
