"""``mlx-fused-lora example --llm``: a tiny Llama mlx-lm loads offline, SFT chats, and the
README's ``lm_lora`` command training it on fused layers (issue 18, item 14)."""

import json
import os
import subprocess
import sys

import pytest
from mlx_fused_lora.cli import main as cli_main
from mlx_fused_lora.train import example as example_module
from mlx_fused_lora.train.lm_example import DATASETS, lm_lora_command, preference_command
from test_example import commands, readme_block

LLM_EXAMPLE = "tested-by: tests/test_lm_example.py (the LLM example)"


def test_without_mlx_lm_the_llm_example_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(example_module, "_have", lambda module: module != "mlx_lm")
    assert cli_main(["example", "--llm", str(tmp_path / "llm")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == 'mlx-fused-lora example: --llm writes an mlx-lm model: pip install "mlx-fused-lora[lm]"'
    assert not (tmp_path / "llm").exists()


def test_the_readme_llm_commands_train_fused_layers(tmp_path, monkeypatch, capsys):
    """The README block as written (fewer steps): ``example --llm`` prints the very
    ``lm_lora`` command the README shows next; mlx-lm loads the model and reads the data;
    the run trains, saves the adapters and says which fused layers replaced mlx-lm's."""
    mlx_lm = pytest.importorskip("mlx_lm")
    example_cmd, train_cmd = commands(readme_block(LLM_EXAMPLE))
    assert example_cmd[:3] == ["mlx-fused-lora", "example", "--llm"]
    assert train_cmd[:3] == ["python", "-m", "mlx_fused_lora.lm_lora"]
    monkeypatch.chdir(tmp_path)
    assert cli_main(example_cmd[1:]) == 0
    printed = capsys.readouterr().out
    assert " ".join(train_cmd) in printed  # no guessing: the printed command is the README's
    model_dir = train_cmd[train_cmd.index("--model") + 1]
    data_dir = train_cmd[train_cmd.index("--data") + 1]

    model, tokenizer = mlx_lm.load(model_dir)  # offline: a local folder
    chat = json.loads(open(os.path.join(data_dir, "train.jsonl")).readline())["messages"]
    ids = tokenizer.apply_chat_template(chat, return_dict=False)
    assert tokenizer.decode(ids).startswith("<|begin_of_text|><|start_header_id|>user")
    assert model(__import__("mlx.core").core.array([ids])).shape[-1] == model.args.vocab_size
    assert set(DATASETS) == {"sft", "preference"}
    assert sorted(os.listdir(data_dir)) == ["test.jsonl", "train.jsonl", "valid.jsonl"]
    pairs = os.path.join(os.path.dirname(data_dir), "preference")
    assert sorted(os.listdir(pairs)) == ["train.jsonl", "valid.jsonl"]
    assert f"python -m mlx_fused_lora.lm_lora --train-mode dpo --model {model_dir} --train --data {pairs}" in printed

    env = {**os.environ, "NO_COLOR": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, *train_cmd[1:], "--iters", "4", "--steps-per-eval", "4", "--val-batches", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fused LoRA layers: 14 FusedLoRALinear in place of mlx-lm's LoRALinear" in proc.stdout.splitlines()
    adapters = train_cmd[train_cmd.index("--adapter-path") + 1]
    assert {"adapters.safetensors", "adapter_config.json"} <= set(os.listdir(adapters))


def test_the_command_names_what_was_written(tmp_path):
    example = example_module.write_llm_example(tmp_path / "x", 8, data_only=True)
    cmd = lm_lora_command(example)
    assert cmd[cmd.index("--data") + 1] == str(tmp_path / "x" / "data")
    assert not (tmp_path / "x" / "model").exists()
    lines = (tmp_path / "x" / "data" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line)["messages"][1]["role"] == "assistant" for line in lines)
    pairs = [json.loads(line) for line in (tmp_path / "x" / "preference" / "train.jsonl").read_text().splitlines()]
    chats = [json.loads(line)["messages"] for line in lines]
    # each pair asks what its chat asks and prefers the chat's answer
    assert [(p["prompt"], p["chosen"]) for p in pairs] == [(c[0]["content"], c[1]["content"]) for c in chats]
    assert all(p["rejected"] != p["chosen"] for p in pairs)
    assert len((tmp_path / "x" / "preference" / "valid.jsonl").read_text().splitlines()) == 2
    cmd = preference_command(example, "orpo")
    assert cmd[cmd.index("--data") + 1] == str(tmp_path / "x" / "preference") and "orpo" in cmd
