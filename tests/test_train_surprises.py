"""What a run no longer does silently or in many lines (issue 18, items 11-13): a mistyped
--resume-from, a full disk, a batch larger than the data, --overwrite, a config key given twice."""

import os
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_fused_lora.train.checkpoint import load_checkpoint, resolve_checkpoint
from mlx_fused_lora.train.csm.cli import main
from train_helpers import finetune_args, write_tiny_run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # 4 files of two turns: 8 samples, 1 held out for validation, 7 to train on
    return write_tiny_run(tmp_path_factory.mktemp("surprises"), num_files=4)


def _errors(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_a_resume_from_that_does_not_exist_is_said_first(setup, tmp_path, caplog):
    _, model, audio = setup
    out = tmp_path / "out"
    assert main(finetune_args(model, audio, out, "--max-steps", "1", "--val-every", "0")) == 0
    caplog.clear()
    # the folder holds a run: the missing path is still what the one line is about
    assert main(finetune_args(model, audio, out, "--max-steps", "2", "--resume-from", str(out / "nope"))) == 1
    assert _errors(caplog) == [f"--resume-from {out / 'nope'} does not exist"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(setup, tmp_path, caplog, monkeypatch):
    """From step 2 on, the checkpoint's adapters file lies on a full device (/dev/full):
    MLX's own writer fails as on a full disk, with its message that names nothing."""
    _, model, audio = setup
    out = tmp_path / "out"
    real = mx.save_safetensors

    def on_a_full_disk(path, tensors, *args, **kwargs):
        if Path(path).name == "adapters.safetensors" and "step_00000001" not in str(path):
            os.symlink("/dev/full", path)
        return real(path, tensors, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", on_a_full_disk)
    assert main(finetune_args(model, audio, out, "--max-steps", "3", "--save-every", "1", "--val-every", "0")) == 1
    errors = _errors(caplog)
    file = out / "checkpoints" / "step_00000002" / "adapters.safetensors"
    assert len(errors) == 1 and "No space left on device" in errors[0] and str(file) in errors[0], errors
    assert "[write]" not in errors[0]
    assert resolve_checkpoint(out).name == "step_00000001" and load_checkpoint(out)[2]["step"] == 1
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the failed write's space is given back


def test_a_batch_larger_than_the_data_is_refused_with_both_numbers(setup, tmp_path, caplog):
    _, model, audio = setup
    out = tmp_path / "out"
    assert main(finetune_args(model, audio, out, "--batch-size", "64", "--max-steps", "1")) == 1
    assert _errors(caplog) == [
        "--batch-size 64 is more than the 7 training samples: use --batch-size 7 or less, or more data"
    ]
    assert not out.exists()


def test_overwrite_removes_every_output_of_the_earlier_run(setup, tmp_path):
    _, model, audio = setup
    out = tmp_path / "out"
    first = ["--max-steps", "1", "--val-every", "0", "--save-mode", "both", "--generate-samples"]
    assert main(finetune_args(model, audio, out, *first)) == 0
    for name in ("sample.npy", "model.safetensors", "config.json", "fine_tuned_model.safetensors", "loss_curve.png"):
        assert (out / name).is_file(), name
    assert main(finetune_args(model, audio, out, "--max-steps", "1", "--val-every", "0", "--overwrite")) == 0
    left = sorted(p.name for p in out.iterdir())
    assert left == [
        "checkpoints",
        "fine_tuned_model.safetensors",
        "fine_tuned_model_metadata.json",
        "loss_curve.png",
        "metrics.jsonl",
    ], left
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000001"]


def test_a_config_key_given_twice_is_refused_naming_both(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("lora_r: 4\nlora-r: 2\n")
    with pytest.raises(SystemExit) as exit_:
        main(["-c", str(config), "--model-path", "m", "--audio-dir", "a", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err == [
        f"mlx-fused-lora finetune: error: config file {config}: keys 'lora_r' and 'lora-r' both give --lora-r"
    ]
    config.write_text("lora_r: 4\nlora_r: 2\n")  # the same spelling twice: YAML itself would keep the last
    with pytest.raises(SystemExit):
        main(["-c", str(config), "--model-path", "m", "--audio-dir", "a", "--output-dir", str(tmp_path / "out")])
    assert "key 'lora_r' appears twice" in capsys.readouterr().err
