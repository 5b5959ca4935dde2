"""`finetune`'s run length, config file, help, reported figures, outputs and data checks (issue 14)."""

import json
import re
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from mlx_fused_lora.train.checkpoint import load_checkpoint
from mlx_fused_lora.train.cli_args import apply_config_file
from mlx_fused_lora.train.csm.cli import build_parser, main
from mlx_fused_lora.train.csm.synthetic import write_synthetic_dataset
from train_helpers import K, V, finetune_args, write_tiny_run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # 4 files of two turns each: 8 samples, 1 held out, 7 to train on: 4 batches of 2 per epoch
    return write_tiny_run(tmp_path_factory.mktemp("options"), num_files=4)


def _args(model, audio, out, *extra):
    return finetune_args(model, audio, out, "--val-split", "0.125", *extra)


def _train_steps(out):
    return [e["step"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e]


def test_max_steps_is_the_run_length_and_the_first_line_says_so(setup, tmp_path, capsys):
    _, model, audio = setup
    out = tmp_path / "steps"
    # 10 steps are 2.5 epochs: the default --epochs 5 no longer cuts a longer --max-steps short,
    # and a step count past one epoch cycles the data
    assert main(_args(model, audio, out, "--max-steps", "10", "--epochs", "1", "--val-every", "0")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "training 10 steps (--max-steps; 2.5 epochs of 4 steps, the data cycled as needed)"
    assert _train_steps(out) == list(range(1, 11))
    out = tmp_path / "epochs"
    assert main(_args(model, audio, out, "--epochs", "2", "--val-every", "0")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "training 8 steps (2 epochs (--epochs) of 4 steps)"
    assert _train_steps(out) == list(range(1, 9))


def test_yaml_config_gives_every_flag_and_the_command_line_overrides_it(setup, tmp_path, capsys):
    _, model, audio = setup
    out = tmp_path / "out"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model_path: {model}\n"
        f"audio-dir: {audio}\n"
        f"output_dir: {out}\n"
        "tokenizer: byte\n"
        "max_steps: 2\n"
        "lora_r: 4\n"
        "lora_alpha: 8\n"
        "learning_rate: 2e-3\n"  # YAML reads this as a string; the flag's type makes it a number
        "target_modules: [q_proj, k_proj]\n"
        "val_every: 0\n"
        "lora_bias: false\n"
        "no_progress: true\n"
        "log_level: WARNING\n"
    )
    assert main(["-c", str(config), "--lora-r", "2"]) == 0
    settings = load_checkpoint(out)[2]["settings"]
    assert settings["lora_r"] == 2  # the command line wins
    assert (settings["lora_alpha"], settings["learning_rate"]) == (8.0, 2e-3)
    assert settings["target_modules"] == ["q_proj", "k_proj"]
    capsys.readouterr()

    config.write_text("lora_r: 4\nlearning_rat: 1e-3\n")
    with pytest.raises(SystemExit) as exit_:
        main(["-c", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and f"config file {config}: unknown key 'learning_rat'" in err[0]
    config.write_text(f"model_path: {model}\nlora_r: many\n")
    with pytest.raises(SystemExit):
        main(["-c", str(config)])
    assert f"config file {config}: lora_r: expected int, got 'many'" in capsys.readouterr().err


def test_the_readmes_config_file_is_valid():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    marker = "<!-- tested-by: tests/test_train_cli_options.py (the README's config file) -->"
    block = readme.split(marker, 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(textwrap.dedent(block))
        args = apply_config_file(build_parser(), ["-c", str(config)])
    assert (args.model_path, args.audio_dir, args.output_dir) == ("csm-1b/", "data/audio", "out/")
    assert (args.max_steps, args.lora_r, args.target_modules) == (500, 16, ["q_proj", "k_proj", "v_proj", "o_proj"])


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    assert len(blocks) > 40
    for block in blocks:
        assert block.count("default") <= 1, block
        assert "(default: None)" not in block and "(default: False)" not in block, block
    assert "(default: 0)" in next(b for b in blocks if b.startswith("--speaker-id"))


def test_two_steps_report_a_speed_and_warmup_starts_above_zero(setup, tmp_path, capsys):
    _, model, audio = setup
    out = tmp_path / "out"
    extra = ["--max-steps", "2", "--warmup-steps", "2", "--val-every", "0", "--lr-schedule", "constant"]
    assert main(_args(model, audio, out, *extra)) == 0
    done = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("done:"))
    speed = float(re.search(r"([0-9.]+) steps/s", done).group(1))
    assert speed > 0, done
    entries = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    lrs = [e["learning_rate"] for e in entries if "loss" in e]
    np.testing.assert_allclose(lrs, [2.5e-3, 5e-3], rtol=1e-6)  # step 1 learns; step 2 is at the peak


def test_the_summary_names_every_file_written(setup, tmp_path, capsys):
    _, model, audio = setup
    out = tmp_path / "out"
    assert main(_args(model, audio, out, "--max-steps", "2", "--val-every", "0", "--generate-samples")) == 0
    wrote = {line[len("wrote ") :] for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")}
    expected = {
        out / "checkpoints" / "step_00000002",
        out / "metrics.jsonl",
        out / "loss_curve.png",
        out / "fine_tuned_model.safetensors",
        out / "fine_tuned_model_metadata.json",
        out / "sample.npy",
    }
    assert wrote == {str(p) for p in expected}
    assert all(p.exists() for p in expected)
    assert {p.name for p in out.iterdir()} == {p.name for p in expected if p.parent == out} | {"checkpoints"}


def test_mismatched_data_is_refused_naming_the_file_and_both_numbers(setup, tmp_path, caplog):
    _, model, _ = setup
    wide = write_synthetic_dataset(tmp_path / "wide", num_files=3, num_codebooks=32, audio_vocab_size=V)
    assert main(_args(model, wide, tmp_path / "out1", "--max-steps", "1")) == 1
    assert f"{wide / 'clip_000.npy'}: 32 codebooks, the model has 8" in caplog.text
    assert "--drop-mismatched-data" in caplog.text
    caplog.clear()
    assert main(_args(model, wide, tmp_path / "out2", "--max-steps", "1", "--drop-mismatched-data")) == 0
    caplog.clear()
    big = write_synthetic_dataset(tmp_path / "big", num_files=3, num_codebooks=K, audio_vocab_size=2051)
    assert main(_args(model, big, tmp_path / "out3", "--max-steps", "1")) == 1
    assert re.search(
        rf"{re.escape(str(big))}/clip_00\d\.npy: codes span \[\d+, \d+\], the model's audio vocabulary", caplog.text
    )
    assert "has 24 entries" in caplog.text


def test_resuming_with_another_step_count_is_stated(setup, tmp_path, caplog):
    _, model, audio = setup
    out = tmp_path / "out"
    assert main(_args(model, audio, out, "--max-steps", "2", "--val-every", "0")) == 0
    caplog.clear()
    assert main(_args(model, audio, out, "--max-steps", "3", "--val-every", "0", "--resume-from", str(out))) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("total steps 2 -> 3" in w and "schedule is rebuilt" in w for w in warnings), warnings
    assert _train_steps(out) == [1, 2, 3]
