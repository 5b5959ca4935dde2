"""``mlx-fused-lora example``: what it writes fits together, the README's fine-tuning commands
reach a trained adapter and a generated sample, and the committed sample data is its output.
"""

import json
import os
import re
import shlex
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
from mlx_fused_lora.cli import COMMANDS
from mlx_fused_lora.cli import main as cli_main
from mlx_fused_lora.csm import CSMConfig
from mlx_fused_lora.train import example as example_module
from mlx_fused_lora.train.csm import CSMLoRATrainer
from mlx_fused_lora.train.csm.audio import load_codes, read_wav
from mlx_fused_lora.train.csm.example import finetune_command
from mlx_fused_lora.train.csm.tokenizer import load_text_tokenizer
from mlx_fused_lora.train.example import write_example

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# the README blocks this file runs (tests/test_readme.py checks that these markers name it)
FINE_TUNING = "tested-by: tests/test_example.py (the example fine-tune)"
SAMPLE_DATA = "tested-by: tests/test_example.py (the sample data)"
have_audio = pytest.mark.skipif(not example_module._have("mlx_audio"), reason="needs the [audio] extra")


def readme_block(marker: str) -> str:
    """The fenced code block that follows ``<!-- marker -->`` in the README."""
    m = re.search(rf"<!-- {re.escape(marker)} -->\s*```\w*\n(.*?)```", README.read_text(), re.S)
    assert m, f"README has no code block after <!-- {marker} -->"
    return m.group(1)


def commands(block: str) -> list[list[str]]:
    """Shell command lines of a block (comments and continuations handled) as argv lists."""
    text = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if shlex.split(line, comments=True)]


def run_readme_block(marker: str, shorter: dict) -> list[list[str]]:
    """Run the ``mlx-fused-lora`` commands of the README block after ``marker`` in the current
    folder, each subcommand's line with ``shorter[subcommand]`` appended (argparse keeps the last
    value: fewer steps, frames); returns the lines."""
    lines = commands(readme_block(marker))
    for line in lines:
        assert line[0] == "mlx-fused-lora" and cli_main(line[1:] + shorter.get(line[1], [])) == 0, line
    return lines


def test_example_writes_a_model_tokenizer_and_data_that_fit(tmp_path):
    ex = write_example(tmp_path / "ex", num_files=4, audio_format="codes")
    config = CSMConfig.from_dict(json.loads((ex.model / "config.json").read_text()))
    tok = load_text_tokenizer(None, ex.model)  # found beside the weights, as finetune does
    assert ex.tokenizer == ex.model / "tokenizer.json"
    assert tok.vocab_size <= config.text_vocab_size
    ids = tok.encode("[0]any text at all, even ünïcode")  # byte-level: no unknown token
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids) < config.text_vocab_size
    for f in ex.audio.iterdir():
        codes = load_codes(f)
        assert codes.shape[0] == config.audio_num_codebooks == 32
        assert 0 <= codes.min() and codes.max() < min(config.audio_vocab_size, 2048)  # Mimi's codebook
    trainer = CSMLoRATrainer(ex.model, tmp_path / "out", progress=False)
    report = trainer.prepare_data(ex.audio, val_split=0.0)
    assert report.samples == 8 and not report.skipped, str(report)
    cmd = finetune_command(ex)
    assert "--tokenizer" not in cmd and "--generate-samples" in cmd  # the tokenizer is found beside the model


def test_without_the_audio_extra_it_falls_back_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(example_module, "_have", lambda module: False)
    assert cli_main(["example", str(tmp_path / "ex"), "--files", "2"]) == 0
    out = capsys.readouterr().out
    assert "sample.npy" in out and "--tokenizer byte" in out and "--codec-path" not in out
    assert sorted(p.suffix for p in (tmp_path / "ex/data/audio").iterdir()) == [".npy", ".npy"]
    assert not (tmp_path / "ex/mimi.safetensors").exists() and not (tmp_path / "ex/model/tokenizer.json").exists()
    with pytest.raises(ImportError, match=r"mlx-audio.*\[audio\]"):
        write_example(tmp_path / "wav", audio_format="wav")


@have_audio
def test_without_tokenizers_the_model_takes_the_byte_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setattr(example_module, "_have", lambda module: module != "tokenizers")
    ex = write_example(tmp_path / "ex", num_files=2, audio_format="codes")
    config = json.loads((ex.model / "config.json").read_text())
    assert ex.tokenizer == "byte" and config["text_vocab_size"] == 258 and ex.codec is not None
    cmd = finetune_command(ex)
    assert cmd[cmd.index("--tokenizer") + 1] == "byte" and "--codec-path" in cmd


def test_bad_arguments_are_refused_with_what_was_given(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert cli_main(["example", str(tmp_path / "full")]) == 1
    assert f"{tmp_path / 'full'} exists and is not empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--files must be an integer from 2 to 10000, got 1"):
        write_example(tmp_path / "one", num_files=1)
    with pytest.raises(SystemExit):
        cli_main(["example", "--help"])
    help_text = capsys.readouterr().out
    assert "(default: 64)" in help_text and "(default: None)" not in help_text  # each default once


BAD_ARGUMENTS = [
    (["--width", "0"], "--width must be a multiple of 16 from 16 to 1024, got 0"),
    (["--width", "24"], "--width must be a multiple of 16 from 16 to 1024, got 24"),
    (["--width", "abc"], "argument --width: invalid int value: 'abc'"),
    (["--files", "1"], "--files must be an integer from 2 to 10000, got 1"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 2**32 - 1, got -1"),
    (["--format", "flac"], "--format must be one of wav, codes, mixed, got 'flac'"),
    (["--llm", "--format", "wav"], "--format is the CSM example's audio; --llm writes text data"),
    (["--llm", "--width", "8"], "--width must be a multiple of 16 from 16 to 1024, got 8"),
]


@pytest.mark.parametrize("args, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_each_bad_argument_is_one_line_and_nothing_is_written(tmp_path, capsys, args, message):
    """Issue 18, item 6: checked before anything is written, one line naming the argument."""
    try:
        status = cli_main(["example", str(tmp_path / "new" / "ex"), *args])
    except SystemExit as e:  # argparse's own (type) errors: exit status 2
        status = e.code
    err = capsys.readouterr().err.strip()
    assert status in (1, 2) and message in err and "\n" not in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # not even the parent folder


def test_an_unwritable_target_is_one_line_and_leaves_nothing(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert cli_main(["example", str(tmp_path / "afile" / "ex"), "--data-only", "--files", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert f"cannot write the example into {tmp_path / 'afile' / 'ex'}: {tmp_path / 'afile'} is a file" in err
    assert "\n" not in err
    read_only = Path("/sys/mlx-fused-lora-example")  # a read-only file system, even for root
    if not read_only.exists() and not os.access("/sys", os.W_OK):
        assert cli_main(["example", str(read_only), "--data-only", "--files", "2"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"mlx-fused-lora example: cannot write the example into {read_only}:") and "\n" not in err


def test_a_failure_while_writing_leaves_no_half_written_folder(tmp_path, monkeypatch, capsys):
    import mlx_fused_lora.train.csm.synthetic as synthetic

    def disk_full(*args, **kwargs):
        raise RuntimeError("[write] Unable to write 129 bytes to file.")  # how MLX reports ENOSPC

    monkeypatch.setattr(synthetic, "write_random_csm", disk_full)
    assert cli_main(["example", str(tmp_path / "a" / "ex"), "--files", "2", "--format", "codes"]) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot write the example into" in err and "Unable to write" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []  # no example, no temporary folder, no parent made for it


@have_audio
def test_the_readme_fine_tuning_commands_give_an_adapter_and_a_wav_sample(tmp_path, monkeypatch, capsys):
    """The README's first fine-tuning block, run as written (with fewer steps), from a fresh
    directory: ``example`` prints the very ``finetune`` command the README shows next, and that
    command trains an adapter and writes ``sample.wav`` through the example's Mimi."""
    assert COMMANDS["example"][0] == "mlx_fused_lora.train.example"
    example_cmd, finetune_cmd = commands(readme_block(FINE_TUNING))
    assert example_cmd[:2] == ["mlx-fused-lora", "example"] and finetune_cmd[:2] == ["mlx-fused-lora", "finetune"]
    monkeypatch.chdir(tmp_path)
    assert cli_main(example_cmd[1:]) == 0
    printed = capsys.readouterr().out
    assert shlex.join(finetune_cmd) in printed  # no guessing: the printed command is the README's
    # fewer steps (argparse keeps the last value) and a shorter sample than the real run
    generate_sample = CSMLoRATrainer.generate_sample
    monkeypatch.setattr(
        CSMLoRATrainer, "generate_sample", lambda self, *a, **k: generate_sample(self, *a, **{**k, "max_frames": 6})
    )
    assert cli_main(finetune_cmd[1:] + ["--max-steps", "3", "--no-progress", "--log-level", "WARNING"]) == 0
    out = Path(finetune_cmd[finetune_cmd.index("--output-dir") + 1])
    assert {"fine_tuned_model.safetensors", "fine_tuned_model_metadata.json", "sample.wav"} <= {
        p.name for p in out.iterdir()
    }
    assert "sample.wav" in capsys.readouterr().out
    with wave.open(str(out / "sample.wav"), "rb") as f:
        assert (f.getframerate(), f.getnchannels(), f.getnframes()) == (24_000, 1, 6 * 1920)


def test_committed_sample_data_is_what_the_example_writes(tmp_path, monkeypatch, capsys):
    """``examples/data`` (shown in the README's data layout) is the output of the command its
    README block names, run as written in a clone (where ``examples/`` already holds it):
    regenerating it gives the same bytes."""
    (cmd,) = commands(readme_block(SAMPLE_DATA))
    assert cmd[:3] == ["mlx-fused-lora", "example", "examples"]
    shutil.copytree(REPO / "examples", tmp_path / "examples")  # a clone's examples/
    (tmp_path / "examples" / "data" / "audio" / "clip_000.wav").write_bytes(b"stale")
    monkeypatch.chdir(tmp_path)
    assert cli_main(cmd[1:]) == 0, capsys.readouterr().err
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "examples").rglob("*") if p.is_file())
    committed = sorted(p.relative_to(REPO) for p in (REPO / "examples").rglob("*") if p.is_file())
    assert fresh == committed
    for rel in committed:
        assert (tmp_path / rel).read_bytes() == (REPO / rel).read_bytes(), rel
    # one file of each kind: a WAV (not at Mimi's 24 kHz: the data path resamples) and codes
    samples, rate = read_wav(REPO / "examples/data/audio/clip_000.wav")
    assert rate == 16_000 and np.abs(samples).max() > 0.1
    assert load_codes(REPO / "examples/data/audio/clip_001.npy").shape[0] == 32
    # --overwrite replaces an earlier example only: a folder holding anything else is refused
    (tmp_path / "examples" / "notes.txt").write_text("mine")
    assert cli_main(cmd[1:]) == 1
    assert "also holds ['notes.txt']: not an example folder" in capsys.readouterr().err
