"""What a run promises about its folder and checkpoints (issue 12): reused folders, NaN, resume, bad data, CLI errors."""

import json
import stat
import subprocess
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx_fused_lora.csm import CSMConfig
from mlx_fused_lora.train.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from mlx_fused_lora.train.csm.audio import CodeRangeError, load_codes
from mlx_fused_lora.train.csm.cli import main
from mlx_fused_lora.train.csm.data import DataMismatchError, DataSpec, build_dataset
from mlx_fused_lora.train.csm.synthetic import write_random_csm
from mlx_fused_lora.train.csm.tokenizer import ByteTokenizer
from mlx_fused_lora.train.loop import LoopSettings, NonFiniteLossError, train
from train_helpers import K, Scale, V, finetune_command, write_tiny_run
from train_helpers import finetune_args as _args


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("rules"), num_files=4)


def _steps(out):
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


# -- 1: a reused output folder --


def test_pruning_keeps_the_new_checkpoint_beside_another_runs_later_ones(tmp_path):
    for s in (10, 11, 12):  # an earlier, longer run
        save_checkpoint(tmp_path, s, {"x": mx.full((2,), s)}, {"y": mx.ones(1)}, {"step": s})
    for s in range(1, 5):
        path = save_checkpoint(tmp_path, s, {"x": mx.full((2,), s)}, {"y": mx.ones(1)}, {"step": s}, keep_last=2)
        assert path.is_dir() and resolve_checkpoint(tmp_path) == path  # `latest` names what was just written
    names = sorted(p.name for p in tmp_path.glob("step_*"))
    assert names == ["step_00000003", "step_00000004", "step_00000010", "step_00000011", "step_00000012"]
    adapters, _, state = load_checkpoint(tmp_path)
    assert state["step"] == 4 and adapters["x"].tolist() == [4, 4]


def test_a_new_run_refuses_a_folder_with_another_runs_checkpoints(setup, tmp_path, caplog):
    _, model, audio = setup
    out = tmp_path / "out"
    common = ["--max-steps", "2", "--save-every", "1", "--val-every", "0"]
    assert main(_args(model, audio, out, *common)) == 0
    before = _steps(out)
    assert before == ["step_00000001", "step_00000002"]
    assert main(_args(model, audio, out, *common, "--seed", "7")) == 1
    assert "holds another run's checkpoints" in caplog.text and "--overwrite" in caplog.text
    assert _steps(out) == before and resolve_checkpoint(out).name == "step_00000002"
    caplog.clear()
    assert main(_args(model, audio, out, "--max-steps", "1", "--val-every", "0", "--seed", "7", "--overwrite")) == 0
    assert _steps(out) == ["step_00000001"]  # the earlier run's checkpoints went, as asked
    _, _, state = load_checkpoint(out)
    assert state["step"] == 1 and state["settings"]["seed"] == 7


def test_a_folder_holding_another_formats_adapter_is_refused_before_training(setup, tmp_path, caplog):
    """finetune writes its adapter (csm-cli format) through a temporary folder: the check of
    the real folder must come first, and before any step is trained."""
    _, model, audio = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    (out / "adapter_model.safetensors").write_bytes(b"")
    assert main(_args(model, audio, out, "--max-steps", "2", "--val-every", "0")) == 1
    assert "holds a peft adapter" in caplog.text and "write into another folder" in caplog.text
    assert not (out / "checkpoints").exists() and not (out / "fine_tuned_model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


# -- 2: no checkpoint holds NaN; the message names the newest good one --


def test_non_finite_tensors_are_never_checkpointed_and_the_message_names_the_last_good_one(tmp_path):
    """A generic model on the generic loop: the learning rate turns NaN at the third update."""
    model = Scale()
    lr = lambda step: mx.where(step < 2, mx.array(0.1), mx.array(float("nan")))
    optimizer = optim.SGD(learning_rate=lr)
    x, y = mx.array([[1.0, 2.0], [3.0, 4.0]]), mx.array([[2.0, 1.0], [0.0, 1.0]])

    def loss_fn(model, x, y):
        return ((model(x) - y) ** 2).mean(), ()

    saved = []

    def save(step):
        tensors = {"w": model.w}
        saved.append(save_checkpoint(tmp_path, step, tensors, {"step": mx.array(step)}, {"step": step}))
        return saved[-1]

    with pytest.raises(NonFiniteLossError) as err:
        train(model, optimizer, loss_fn, lambda i: ((x, y), 2.0), LoopSettings(steps=5, save_every=1), save=save)
    msg = str(err.value)
    assert "after step 3" in msg and "hold NaN or inf" in msg
    assert f"The newest good checkpoint is {tmp_path / 'step_00000002'}" in msg
    assert [p.name for p in saved] == ["step_00000001", "step_00000002"] and not (tmp_path / "step_00000003").exists()
    adapters, _, _ = load_checkpoint(tmp_path)
    assert np.isfinite(np.array(adapters["w"])).all()


def test_save_and_load_refuse_non_finite_tensors(tmp_path):
    from mlx_fused_lora.train.checkpoint import NonFiniteCheckpointError

    with pytest.raises(NonFiniteCheckpointError, match="1 tensors hold NaN or inf.*a.lora_b"):
        save_checkpoint(tmp_path, 1, {"a.lora_b": mx.array([1.0, float("inf")])}, {"s": mx.ones(1)}, {"step": 1})
    assert not list(tmp_path.glob("step_*")) and not (tmp_path / "latest").exists()
    path = save_checkpoint(tmp_path, 2, {"a.lora_b": mx.array([1.0, 2.0])}, {"s": mx.ones(1)}, {"step": 2})
    # a NaN written behind the manifest's back (manifest rewritten to match) is still refused
    mx.save_safetensors(str(path / "adapters.safetensors"), {"a.lora_b": mx.array([float("nan"), 2.0])})
    from mlx_fused_lora.train.checkpoint import sha256_file

    manifest = json.loads((path / "manifest.json").read_text())
    f = path / "adapters.safetensors"
    manifest["files"]["adapters.safetensors"] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NonFiniteCheckpointError, match="refusing to resume"):
        load_checkpoint(tmp_path)


def test_a_nan_at_the_first_step_says_no_checkpoint_holds_progress(setup, tmp_path, caplog):
    _, model, audio = setup
    rc = main(_args(model, audio, tmp_path / "out", "--max-steps", "3", "--semantic-weight", "nan"))
    assert rc == 1 and "the loss became nan at step 1" in caplog.text
    assert "No checkpoint holds this run's progress yet" in caplog.text


def test_a_checkpoint_that_already_diverged_is_not_called_good(setup, tmp_path, caplog):
    """lr 1e30: step 1's adapters are finite (~1e30) but give a NaN loss at step 2."""
    _, model, audio = setup
    out = tmp_path / "out"
    assert main(_args(model, audio, out, "--max-steps", "4", "--save-every", "1", "--learning-rate", "1e30")) == 1
    first = out / "checkpoints" / "step_00000001"
    assert "the loss became nan at step 2" in caplog.text
    assert f"Checkpoint {first} already gives this loss" in caplog.text
    assert "No checkpoint holds this run's progress yet" in caplog.text
    assert "The newest good checkpoint is" not in caplog.text


# -- 5: resume refuses other adapters or another model, in one message --


def test_resume_refuses_changed_adapter_settings_and_model_in_one_message(setup, tmp_path, caplog):
    root, model, audio = setup
    out = tmp_path / "out"
    assert main(_args(model, audio, out, "--max-steps", "2", "--val-every", "0")) == 0
    caplog.clear()
    changed = ["--lora-r", "4", "--lora-alpha", "32", "--target-modules", "q_proj", "--resume-from", str(out)]
    assert main(_args(model, audio, out, "--max-steps", "3", *changed)) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    for part in ("--lora-r 4 (the checkpoint has 8)", "--lora-alpha 32.0 (the checkpoint has 16.0)"):
        assert part in errors[0]
    assert "--target-modules ['q_proj'] (the checkpoint has ['q_proj', 'v_proj'])" in errors[0]
    other = write_random_csm(tmp_path / "other", CSMConfig.tiny(text_vocab_size=260), seed=3)
    caplog.clear()
    assert main(_args(other, audio, out, "--max-steps", "3", "--resume-from", str(out))) == 1
    assert "--model-path holds other weights than the checkpoint's base model" in caplog.text
    caplog.clear()
    # what only steers the optimization is allowed, and said
    assert main(_args(model, audio, out, "--max-steps", "3", "--resume-from", str(out), "--weight-decay", "0.1")) == 0
    assert "weight_decay 0.01 -> 0.1" in caplog.text
    assert load_checkpoint(out)[2]["step"] == 3


# -- 6: codes are range-checked before the cast --


def test_load_codes_refuses_codes_that_would_wrap(tmp_path):
    codes = np.full((K, 4), 2**32 + 5, np.int64)
    np.save(tmp_path / "wrap.npy", codes)
    with pytest.raises(
        CodeRangeError, match=r"wrap.npy: codes span \[4294967301, 4294967301\], outside \[0, 2147483648\)"
    ):
        load_codes(tmp_path / "wrap.npy")
    (tmp_path / "audio").mkdir()
    np.save(tmp_path / "audio" / "wrap.npy", codes)
    (tmp_path / "audio" / "wrap.txt").write_text("hello")
    with pytest.raises(DataMismatchError, match=r"wrap.npy: codes span \[4294967301, 4294967301\].* 24 entries"):
        build_dataset(tmp_path / "audio", ByteTokenizer(), DataSpec(K, V, 260))


# -- 9: every CLI error is one line naming the file or flag --


def _cli(*args):
    proc = subprocess.run(finetune_command(*args), capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr.strip().splitlines()


def test_output_dir_that_is_a_file_is_one_line_without_traceback(setup, tmp_path):
    _, model, audio = setup
    (tmp_path / "taken").write_text("a file")
    rc, err = _cli(*_args(model, audio, tmp_path / "taken"))
    assert rc == 1 and len(err) == 1, err
    assert f"--output-dir {tmp_path / 'taken'} is a file, not a folder" in err[0] and "Traceback" not in err[0]


def _writable(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return False
    probe.unlink()
    return True


def test_output_dir_that_cannot_be_written(setup, tmp_path, caplog):
    _, model, audio = setup
    (tmp_path / "file").write_text("x")
    assert main(_args(model, audio, tmp_path / "file" / "out")) == 1  # a folder below a file
    assert f"cannot create --output-dir {tmp_path / 'file' / 'out'}" in caplog.text
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if _writable(locked):  # root ignores the mode: a folder of the kernel's instead
        locked = Path("/sys/kernel")
        if not locked.is_dir() or _writable(locked):
            pytest.skip("no folder this user cannot write to")
    caplog.clear()
    assert main(_args(model, audio, locked)) == 1
    assert f"cannot write to --output-dir {locked}" in caplog.text


def test_a_write_error_names_the_file(setup, tmp_path, caplog):
    _, model, audio = setup
    out = tmp_path / "out"
    (out / "metrics.jsonl").mkdir(parents=True)  # the run cannot create its metrics file
    assert main(_args(model, audio, out, "--max-steps", "1")) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"cannot write {out / 'metrics.jsonl'}" in errors[0]


def test_an_output_file_that_cannot_be_replaced_is_named(setup, tmp_path, caplog):
    _, model, audio = setup
    out = tmp_path / "out"
    (out / "fine_tuned_model.safetensors").mkdir(parents=True)  # a folder where the adapters go
    assert main(_args(model, audio, out, "--max-steps", "1")) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"cannot write {out / 'fine_tuned_model.safetensors'}" in errors[0], errors


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--batch-size", "0", "argument --batch-size: must be >= 1, got 0"),
        ("--learning-rate", "-1e-3", "argument --learning-rate: must be a finite (float32) number > 0.0, got -0.001"),
        ("--learning-rate", "nan", "argument --learning-rate: must be a finite (float32) number > 0.0, got nan"),
        ("--learning-rate", "1e39", "argument --learning-rate: must be a finite (float32) number > 0.0, got 1e+39"),
        ("--epochs", "0", "argument --epochs: must be >= 1 when --max-steps is not given, got 0"),
        ("--max-steps", "0", "argument --max-steps: must be >= 1, got 0"),
    ],
)
def test_bad_flag_values_are_one_line_naming_the_flag(setup, tmp_path, capsys, flag, value, expected):
    _, model, audio = setup
    with pytest.raises(SystemExit) as exit_:
        main(_args(model, audio, tmp_path / "out", f"{flag}={value}"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err == [f"mlx-fused-lora finetune: error: {expected}"]
    assert not (tmp_path / "out").exists()


# -- 10: leftovers cleaned; a finished run resumed reports its record --


def test_stale_temporaries_are_cleaned_and_a_finished_run_resumes_quietly(setup, tmp_path, capsys):
    _, model, audio = setup
    out = tmp_path / "out"
    (out / "checkpoints" / ".tmp-step_00000005-4242").mkdir(parents=True)
    (out / ".tmp-4242").mkdir()
    common = ["--max-steps", "2", "--val-every", "1", "--val-split", "0.25", "--generate-samples"]
    assert main(_args(model, audio, out, *common)) == 0
    first = capsys.readouterr().out
    assert not list((out / "checkpoints").glob(".tmp-*")) and not list(out.glob(".tmp-*"))
    metrics, sample = (out / "metrics.jsonl").read_text(), (out / "sample.npy").stat().st_mtime_ns
    # issue 18, item 13: the model and the data are never read (here they are gone), the
    # sample is not generated again, and the one line says so, with the run's record
    gone = tmp_path / "gone"
    assert main(_args(gone / "model", gone / "audio", out, *common, "--resume-from", str(out))) == 0
    again = capsys.readouterr().out.splitlines()
    assert len(again) == 1 and again[0].startswith("already finished: ") and "is step 2 of 2" in again[0], again
    summary = next(line for line in first.splitlines() if line.startswith("done:")).split(", ")
    assert summary[1] in again[0] and summary[2] in again[0]  # its loss and validation loss on record
    assert (out / "metrics.jsonl").read_text() == metrics and (out / "sample.npy").stat().st_mtime_ns == sample
