"""Preference training on the generic loop: step 0 is ln 2, the reference pass runs no rank-r op, DPO learns, kill and resume are exact.

All on the tiny Llama of ``mlx-fused-lora example --llm`` and its preference pairs, through
``python -m mlx_fused_lora.lm_lora --train-mode dpo|orpo`` (the CLI) or `PreferenceTrainer`.
"""

import json
import math
import signal
import subprocess
import sys
import textwrap
import time

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

pytest.importorskip("mlx_lm")
pytest.importorskip("tokenizers")

from mlx_fused_lora import lm_lora  # noqa: E402
from mlx_fused_lora.layers import fused_lora_linear as layer_module  # noqa: E402
from mlx_fused_lora.train import loop  # noqa: E402
from mlx_fused_lora.train.checkpoint import load_checkpoint  # noqa: E402
from mlx_fused_lora.train.distributed import World  # noqa: E402
from mlx_fused_lora.train.lm_example import write_lm_example  # noqa: E402
from mlx_fused_lora.train.preference.settings import PreferenceSettings  # noqa: E402
from mlx_fused_lora.train.preference.task import PreferenceTrainer  # noqa: E402
from train_helpers import kill_at_first_checkpoint, launcher  # noqa: E402

LN2 = math.log(2.0)
LAYERS = 2  # the example's blocks; 7 adapted projections each
ADAPTED = 7 * LAYERS


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_lm_example(tmp_path_factory.mktemp("llm"), samples=16)


def cli_args(example, out, *extra):
    """A quiet DPO run on the example's pairs; ``extra`` comes last and overrides."""
    return [
        "--train-mode",
        "dpo",
        "--model",
        str(example.model),
        "--train",
        "--data",
        str(example.preference),
        "--adapter-path",
        str(out),
        "--num-layers",
        str(LAYERS),
        "--batch-size",
        "4",
        "--learning-rate",
        "1e-3",
        "--val-batches",
        "0",
        "--steps-per-report",
        "0",
        "--no-progress",
        "--log-level",
        "WARNING",
        *extra,
    ]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "reference",
    [[], ["--precompute-reference"], ["--reference-model-path", "MODEL"], ["--reference-model-path", "ADAPTER"]],
    ids=["adapters-off", "precomputed", "second-model", "reference-adapter"],
)
def test_step_zero_is_ln2_with_zero_rewards_whatever_the_reference(example, tmp_path, reference):
    """At step 0 the policy is its reference: B = 0 (or, with a reference adapter, the policy
    starts from that very adapter), so the sigmoid loss is ln 2 and every reward 0."""
    extra = [str(example.model) if a == "MODEL" else a for a in reference]
    if "ADAPTER" in reference:
        start = tmp_path / "sft"
        assert lm_lora.main(cli_args(example, start, "--iters", "2")) == 0  # an adapter with B != 0
        extra = ["--reference-model-path", str(start), "--resume-adapter-file", str(start)]
    out = tmp_path / "out"
    assert lm_lora.main(cli_args(example, out, "--iters", "1", *extra)) == 0
    first = metrics(out)[0]
    assert first["step"] == 1 and abs(first["loss"] - LN2) < 1e-5, first
    # (rewards/accuracies counts strict wins of rewards that are 0 up to rounding: the base GEMM
    # of the fused op and MLX's own, under disable_adapters, may round differently)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) < 1e-5, (key, first[key])
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0


@pytest.fixture
def op_calls(monkeypatch):
    """The names of the fused ops (the dense one and its quantized twin) the layers call."""
    calls = []
    for name in ("fused_lora_linear", "fused_qlora_linear"):
        op = getattr(layer_module, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls.append(_name)
            return _op(*args, **kwargs)

        monkeypatch.setattr(layer_module, name, counted)
    return calls


def step_op_calls(example, out, op_calls, model=None, **settings) -> int:
    """Fused-op calls traced by one compiled training step (`loop.build_step`) of a trainer."""
    settings = PreferenceSettings(num_layers=LAYERS, **settings)
    trainer = PreferenceTrainer(model or example.model, out, settings, world=World())
    trainer.prepare_data(example.preference, ("train",))
    optimizer, _ = trainer._optimizer(trainer.plan_run(4, 1, None))
    step = loop.build_step(trainer.model, optimizer, trainer.loss, loop.LoopSettings(steps=1), World())
    inputs, _ = trainer._batches(4)(0)
    op_calls.clear()
    loss, aux, _, _ = step(inputs, None, True)
    mx.eval(loss, aux)
    return len(op_calls)


def test_the_reference_pass_runs_no_rank_r_op(example, tmp_path, op_calls):
    """DPO's step traces one op call per adapted projection (the policy's) and none for its
    reference (the adapters off): as many as ORPO's, which has no reference at all. A
    reference adapter, by contrast, runs the op in its own pass."""
    assert step_op_calls(example, tmp_path / "dpo", op_calls, train_mode="dpo") == ADAPTED
    assert step_op_calls(example, tmp_path / "orpo", op_calls, train_mode="orpo") == ADAPTED
    from mlx_fused_lora.adapters import save_adapters

    trainer = PreferenceTrainer(example.model, tmp_path / "x", PreferenceSettings(num_layers=LAYERS), world=World())
    save_adapters(trainer.model, tmp_path / "ref", "mlx-lm")
    calls = step_op_calls(example, tmp_path / "adapter", op_calls, reference_model_path=str(tmp_path / "ref"))
    assert calls == 2 * ADAPTED


def test_a_quantized_base_trains_with_fused_qlora_and_its_reference_runs_no_op(example, tmp_path, op_calls):
    """QLoRA: a 4-bit base gets the fused QLoRA op; the reference pass (adapters off) runs the
    quantized base product alone, and step 0 is ln 2 again."""
    import mlx.nn as nn
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(example.model))
    nn.quantize(model, group_size=32, bits=4)
    assert step_op_calls(example, tmp_path / "q", op_calls, model=(model, tokenizer)) == ADAPTED
    assert set(op_calls) == {"fused_qlora_linear"}
    model, tokenizer = mlx_lm.load(str(example.model))
    nn.quantize(model, group_size=32, bits=4)
    trainer = PreferenceTrainer(
        (model, tokenizer), tmp_path / "out", PreferenceSettings(num_layers=LAYERS, learning_rate=1e-3), world=World()
    )
    trainer.prepare_data(example.preference, ("train",))
    assert abs(trainer.evaluate(4, split="train")[0] - LN2) < 1e-5
    result = trainer.train(batch_size=4, iters=4, val_batches=0, save_every=0, report_every=0)
    assert result.losses[-1][1] < result.losses[0][1]


def test_a_short_dpo_run_raises_accuracy_and_margin_on_its_training_pairs(example, tmp_path):
    settings = PreferenceSettings(num_layers=LAYERS, learning_rate=1e-3, seed=3)
    trainer = PreferenceTrainer(example.model, tmp_path / "out", settings, progress=False, world=World())
    trainer.prepare_data(example.preference, ("train",))
    loss0, before = trainer.evaluate(4, split="train")
    assert abs(loss0 - LN2) < 1e-5 and abs(before["rewards/margins"]) < 1e-5  # B = 0: the policy is the reference
    result = trainer.train(batch_size=4, iters=12, val_batches=0, save_every=0, report_every=0)
    assert result.steps == 12 and not result.interrupted
    loss1, after = trainer.evaluate(4, split="train")
    assert after["rewards/accuracies"] > max(0.9, before["rewards/accuracies"]) and after["rewards/margins"] > 1.0
    assert loss1 < 0.5 * LN2
    assert after["rewards/chosen"] > after["rewards/rejected"]
    # the adapter as mlx-lm writes it: mlx_lm.load takes it back
    import mlx_lm

    model, _ = mlx_lm.load(str(example.model), adapter_path=str(tmp_path / "out"))
    trained = dict(tree_flatten(trainer.model.trainable_parameters()))
    loaded = {k: v for k, v in tree_flatten(model.parameters()) if ".lora_" in k}
    assert sorted(loaded) == sorted(trained)
    assert all(np.array_equal(np.array(loaded[k]), np.array(trained[k])) for k in trained)


def test_sigkill_then_resume_gives_bitwise_equal_adapters(example, tmp_path):
    common = ["--iters", "16", "--save-every", "2", "--lora-parameters", '{"dropout": 0.1}']
    ref = tmp_path / "ref"
    command = [sys.executable, "-m", "mlx_fused_lora.lm_lora"]
    subprocess.run([*command, *cli_args(example, ref, *common)], check=True, timeout=300)

    killed = tmp_path / "killed"
    kill_at_first_checkpoint([*command, *cli_args(example, killed, *common)], killed)
    _, _, state = load_checkpoint(killed)
    assert 0 < state["step"] < 16 and not (killed / "adapters.safetensors").exists()

    resumed = subprocess.run(
        [*command, *cli_args(example, killed, *common, "--resume-from", str(killed))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {state['step']}" in resumed.stdout
    assert (ref / "adapters.safetensors").read_bytes() == (killed / "adapters.safetensors").read_bytes()
    ref_lines, killed_lines = metrics(ref), metrics(killed)
    assert [e["step"] for e in killed_lines] == list(range(1, 17))  # continued without duplicates
    for a, b in zip(ref_lines, killed_lines, strict=True):
        assert {k: a[k] for k in ("loss", "rewards/margins")} == {k: b[k] for k in ("loss", "rewards/margins")}


def test_ctrl_c_saves_a_checkpoint_and_exits_130(example, tmp_path):
    """As for finetune (the same loop): Ctrl-C finishes the step, checkpoints it, exits 130."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mlx_fused_lora.lm_lora", *cli_args(example, out, "--iters", "1000")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    step = load_checkpoint(out)[2]["step"]
    assert 2 <= step < 1000 and f"interrupted: {step} steps" in stdout
    assert not (out / "adapters.safetensors").exists()  # the outputs wait for the run's end


RANK_SCRIPT = textwrap.dedent("""
    import sys
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_fused_lora.train.preference.settings import PreferenceSettings
    from mlx_fused_lora.train.preference.task import PreferenceTrainer
    model, data, out = sys.argv[1:4]
    settings = PreferenceSettings(num_layers=2, learning_rate=1e-3, lora_dropout=0.1)
    t = PreferenceTrainer(model, out, settings, progress=False)
    t.prepare_data(data, ("train",))
    r = t.train(batch_size=2, iters=4, val_batches=0, save_every=2, report_every=0)
    mx.save_safetensors(f"{out}/rank{t.world.rank}.safetensors", dict(tree_flatten(t.model.trainable_parameters())))
    print(f"rank {t.world.rank} of {t.world.size}: loss {r.final_loss:.6f}")
""")


@pytest.mark.skipif(launcher() is None, reason="mlx.launch not installed")
def test_two_ranks_train_to_identical_adapters(example, tmp_path):
    """``mlx.launch -n 2``: each rank takes half of every global batch, the gradients are
    averaged, both end with the same adapter; only rank 0 writes the run's files."""
    script, out = tmp_path / "rank.py", tmp_path / "out"
    script.write_text(RANK_SCRIPT)
    command = [launcher(), "-n", "2", "--python", sys.executable, str(script)]
    proc = subprocess.run(
        [*command, str(example.model), str(example.preference), str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = mx.load(str(out / "rank0.safetensors")), mx.load(str(out / "rank1.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    assert any(np.abs(np.array(a[k])).max() > 0 for k in a if k.endswith("lora_b"))
    assert (out / "adapters.safetensors").exists() and load_checkpoint(out)[2]["world_size"] == 2
    losses = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert len(losses) == 2 and losses[0].split("loss ")[1] == losses[1].split("loss ")[1]
