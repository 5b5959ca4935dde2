"""``mlx-fused-lora example``: what it writes fits together, the README's fine-tuning commands
reach a trained adapter and a generated sample, and the committed sample data is its output.
"""

import json
import re
import shlex
import wave
from pathlib import Path

import numpy as np
import pytest
from mlx_fused_lora.cli import COMMANDS
from mlx_fused_lora.cli import main as cli_main
from mlx_fused_lora.csm import CSMConfig
from mlx_fused_lora.train import example as example_module
from mlx_fused_lora.train.audio import load_codes, read_wav
from mlx_fused_lora.train.example import finetune_command, write_example
from mlx_fused_lora.train.tokenizer import load_text_tokenizer
from mlx_fused_lora.train.trainer import CSMLoRATrainer

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
    with pytest.raises(ValueError, match="num_files must be at least 2.*got 1"):
        write_example(tmp_path / "one", num_files=1)
    with pytest.raises(SystemExit):
        cli_main(["example", "--help"])
    help_text = capsys.readouterr().out
    assert "(default: 16)" in help_text and "(default: None)" not in help_text  # each default once


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


def test_committed_sample_data_is_what_the_example_writes(tmp_path, capsys):
    """``examples/data`` (shown in the README's data layout) is the output of the command its
    README block names; regenerating it gives the same bytes."""
    (cmd,) = commands(readme_block(SAMPLE_DATA))
    target = Path(cmd[2])
    assert target == Path("examples") and cmd[3:] == ["--data-only", "--files", "2", "--format", "mixed"]
    assert cli_main(["example", str(tmp_path / "examples"), *cmd[3:]]) == 0
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "examples").rglob("*") if p.is_file())
    committed = sorted(p.relative_to(REPO) for p in (REPO / "examples").rglob("*") if p.is_file())
    assert fresh == committed
    for rel in committed:
        assert (tmp_path / rel).read_bytes() == (REPO / rel).read_bytes(), rel
    # one file of each kind: a WAV (not at Mimi's 24 kHz: the data path resamples) and codes
    samples, rate = read_wav(REPO / "examples/data/audio/clip_000.wav")
    assert rate == 16_000 and np.abs(samples).max() > 0.1
    assert load_codes(REPO / "examples/data/audio/clip_001.npy").shape[0] == 32
