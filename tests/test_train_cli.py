"""`mlx-fused-lora finetune` end to end on a tiny random CSM and a generated dataset."""

import json
import subprocess

import mlx.core as mx
import numpy as np
import pytest
from mlx_fused_lora.csm import load_csm
from mlx_fused_lora.train.checkpoint import load_checkpoint
from mlx_fused_lora.train.csm.cli import build_parser, main
from train_helpers import K, finetune_args, finetune_command, kill_at_first_checkpoint, write_tiny_run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("finetune"), num_files=6)


def _args(model, audio, out, *extra):
    return finetune_args(model, audio, out, "--lora-dropout", "0.1", *extra)


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--model-path",
        "--output-dir",
        "--audio-dir",
        "--transcript-dir",
        "--alignment-dir",
        "--speaker-id",
        "--max-seq-len",
        "--context-turns",
        "--lora-r",
        "--lora-alpha",
        "--lora-dropout",
        "--target-modules",
        "--target-layers",
        "--lora-bias",
        "--learning-rate",
        "--semantic-weight",
        "--acoustic-weight",
        "--weight-decay",
        "--batch-size",
        "--epochs",
        "--val-split",
        "--val-every",
        "--save-every",
        "--max-grad-norm",
        "--resume-from",
        "--save-mode",
        "--generate-samples",
        "--sample-prompt",
        "--log-level",
        "--debug",
        "--warmup-steps",
        "--lr-schedule",
        "--grad-accumulation-steps",
        "--decoder-fraction",
        "--seed",
        "--tokenizer",
        "--codec-path",
        "--grad-checkpoint",
    ):
        assert flag in text, flag
    defaults = build_parser().parse_args(["--model-path", "m", "--output-dir", "o", "--audio-dir", "a"])
    assert (defaults.lora_r, defaults.lora_alpha, defaults.target_modules) == (8, 16.0, ["q_proj", "v_proj"])
    assert defaults.save_mode == "lora" and abs(defaults.decoder_fraction - 1 / 16) < 1e-12


@pytest.mark.parametrize("mode", ["lora", "full", "both"])
def test_trains_validates_checkpoints_and_saves(setup, tmp_path, mode, capsys):
    root, model, audio = setup
    out = tmp_path / "out"
    rc = main(
        _args(
            model,
            audio,
            out,
            "--epochs",
            "2",
            "--val-every",
            "3",
            "--save-every",
            "2",
            "--save-mode",
            mode,
            "--grad-accumulation-steps",
            "2",
            "--generate-samples",
        )
    )
    assert rc == 0
    assert "done:" in capsys.readouterr().out
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if "loss" in l]
    assert [l["step"] for l in train] == list(range(1, len(train) + 1)) and len(train) >= 4
    assert any("val_loss" in l for l in lines) and all(np.isfinite(l["loss"]) for l in train)
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, _, state = load_checkpoint(out)
    assert state["step"] == len(train)
    lora_files = {"fine_tuned_model.safetensors", "fine_tuned_model_metadata.json"}
    full_files = {"model.safetensors", "config.json"}
    names = {p.name for p in out.iterdir()}
    assert lora_files <= names if mode in ("lora", "both") else not lora_files & names
    assert full_files <= names if mode in ("full", "both") else not full_files & names
    assert (out / "sample.npy").exists() and np.load(out / "sample.npy").shape[0] == K
    if mode == "lora":  # the Python API reads the saved adapters back, equal to the checkpoint's
        from mlx.utils import tree_flatten
        from mlx_fused_lora.train.csm import CSMLoRATrainer

        trainer = CSMLoRATrainer(model, tmp_path / "again", tokenizer="byte", progress=False)
        trainer.load_lora_weights(out)
        ckpt_adapters, _, _ = load_checkpoint(out)
        for k, v in tree_flatten(trainer.model.trainable_parameters()):
            assert np.array_equal(np.array(v), np.array(ckpt_adapters[k])), k
    if mode != "lora":
        merged = load_csm(out)  # adapters folded in: a plain CSM
        base = load_csm(model)
        w_m = np.array(merged.backbone.layers[0].self_attn.q_proj.weight)
        w_b = np.array(base.backbone.layers[0].self_attn.q_proj.weight)
        assert not np.array_equal(w_m, w_b)  # the adapters changed the merged weight
        np.testing.assert_array_equal(
            np.array(merged.backbone.layers[0].self_attn.k_proj.weight),
            np.array(base.backbone.layers[0].self_attn.k_proj.weight),
        )


def test_non_finite_loss_stops_with_a_clear_message(setup, tmp_path, caplog):
    root, model, audio = setup
    rc = main(_args(model, audio, tmp_path / "out", "--max-steps", "3", "--semantic-weight", "nan"))
    assert rc == 1
    assert "the loss became nan at step 1" in caplog.text


def test_sigkill_then_resume_gives_bitwise_equal_adapters(setup, tmp_path):
    root, model, audio = setup
    common = ["--epochs", "0", "--max-steps", "40", "--save-every", "3", "--val-every", "0", "--val-split", "0.2"]
    ref = tmp_path / "ref"
    subprocess.run(finetune_command(*_args(model, audio, ref, *common)), check=True, timeout=300)

    killed = tmp_path / "killed"
    kill_at_first_checkpoint(finetune_command(*_args(model, audio, killed, *common)), killed)
    _, _, state = load_checkpoint(killed)  # the last checkpoint is intact
    assert 0 < state["step"] < 40
    assert not (killed / "fine_tuned_model.safetensors").exists()

    subprocess.run(
        finetune_command(*_args(model, audio, killed, *common, "--resume-from", str(killed))), check=True, timeout=300
    )
    a = mx.load(str(ref / "fine_tuned_model.safetensors"))
    b = mx.load(str(killed / "fine_tuned_model.safetensors"))
    assert sorted(a) == sorted(b) and len(a) > 0
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k
    assert (ref / "fine_tuned_model.safetensors").read_bytes() == (killed / "fine_tuned_model.safetensors").read_bytes()
    entries = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in entries if "loss" in e]
    assert steps == list(range(1, 41))  # the resumed run's metrics continue without duplicates


def test_corrupt_checkpoint_refused_by_resume(setup, tmp_path, caplog):
    root, model, audio = setup
    out = tmp_path / "out"
    assert main(_args(model, audio, out, "--max-steps", "2", "--epochs", "0", "--val-every", "0")) == 0
    ckpt = out / "checkpoints" / "step_00000002" / "adapters.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:-4])
    rc = main(_args(model, audio, out, "--max-steps", "4", "--epochs", "0", "--resume-from", str(out)))
    assert rc == 1 and "truncated" in caplog.text and "refusing to resume" in caplog.text
