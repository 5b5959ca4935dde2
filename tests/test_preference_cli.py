"""``python -m mlx_fused_lora.lm_lora --train-mode``: sft stays mlx-lm's, dpo / orpo take mlx-lm's and mlx-lm-lora's flags and YAML keys, bad input is one line."""

import json

import mlx.core as mx
import pytest

pytest.importorskip("mlx_lm")
pytest.importorskip("tokenizers")

from mlx_fused_lora import lm_lora  # noqa: E402
from mlx_fused_lora.train.checkpoint import load_checkpoint  # noqa: E402
from mlx_fused_lora.train.lm_example import write_lm_example  # noqa: E402
from test_preference_train import cli_args, metrics  # noqa: E402


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_lm_example(tmp_path_factory.mktemp("llm"), samples=8)


@pytest.mark.parametrize(
    "argv, mode, passed",
    [
        (["--model", "m", "--train"], "sft", ["--model", "m", "--train"]),
        (["--train", "--train-mode", "sft", "--iters", "3"], "sft", ["--train", "--iters", "3"]),
        (["--train-mode=dpo", "--train"], "dpo", ["--train-mode=dpo", "--train"]),
        (["--train", "--train-mode", "orpo"], "orpo", ["--train", "--train-mode", "orpo"]),
    ],
)
def test_the_train_mode_picks_the_trainer_and_sft_gets_mlx_lm_s_arguments(argv, mode, passed):
    assert lm_lora.train_mode(argv) == (mode, passed)  # --train is not taken for --train-mode


def test_the_config_file_can_pick_the_mode_and_a_bad_mode_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train_mode: orpo\n")
    assert lm_lora.train_mode(["-c", str(config), "--train"]) == ("orpo", ["-c", str(config), "--train"])
    assert lm_lora.train_mode(["-c", str(config), "--train-mode", "sft"]) == ("sft", ["-c", str(config)])
    with pytest.raises(SystemExit) as exit_:
        lm_lora.main(["--train-mode", "ppo", "--train"])
    assert "argument --train-mode: expected one of sft, dpo, orpo, got 'ppo'" in str(exit_.value)


def test_mlx_lm_lora_s_yaml_keys_and_spellings(example, tmp_path):
    """A config in mlx-lm / mlx-lm-lora's words: lora_parameters as a mapping, train_type,
    gradient_accumulation_steps; the command line overrides the file."""
    config = tmp_path / "dpo.yaml"
    config.write_text(
        f"model: {example.model}\ntrain: true\ntrain_mode: dpo\ndata: {example.preference}\n"
        "train_type: dora\nnum_layers: 1\nlora_parameters: {rank: 4, scale: 10.0}\n"
        "gradient_accumulation_steps: 2\nbatch_size: 2\niters: 2\nbeta: 0.5\n"
    )
    out = tmp_path / "out"
    argv = ["-c", str(config), "--adapter-path", str(out), "--iters", "1", "--val-batches", "0", "--no-progress"]
    assert lm_lora.main(argv) == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["fine_tune_type"] == "dora" and adapter["lora_parameters"]["rank"] == 4
    assert adapter["lora_parameters"]["scale"] == 10.0
    state = load_checkpoint(out)[2]
    assert state["step"] == 1  # --iters 1 won over the file's 2
    assert state["settings"]["grad_accumulation_steps"] == 2 and state["settings"]["beta"] == 0.5
    assert any(k.endswith(".m") for k in mx.load(str(out / "adapters.safetensors")))  # DoRA's magnitude


@pytest.mark.parametrize(
    "extra, status, said",
    [
        (
            ["--dpo-cpo-loss-type", "ipo", "--label-smoothing", "0.1"],
            1,
            "label_smoothing (cDPO) applies to DPO's sigmoid",
        ),
        (["--train-mode", "orpo", "--precompute-reference"], 1, "ORPO has no reference model"),
        (["--lora-parameters", '{"alpha": 16}'], 2, "unknown lora_parameters ['alpha']"),
        (["--beta", "0"], 2, "argument --beta: must be a finite (float32) number > 0.0, got 0.0"),
        (["--data", "nowhere"], 1, "--data nowhere is not a folder"),
        (["--reference-model-path", "nowhere"], 1, "--reference-model-path nowhere: neither an adapter folder"),
        (["--data", "SFT"], 1, 'data/train.jsonl:1: field "prompt" is missing'),  # chats, not pairs
        (["--val-batches", "2", "--data", "TRAIN-ONLY"], 1, "valid.jsonl: no such file"),
        (["--resume-from", "nowhere"], 1, "--resume-from nowhere does not exist"),
    ],
)
def test_bad_input_is_one_line_naming_it(example, tmp_path, monkeypatch, caplog, capsys, extra, status, said):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "train.jsonl").write_bytes((example.preference / "train.jsonl").read_bytes())
    extra = [{"SFT": str(example.data), "TRAIN-ONLY": str(tmp_path / "only")}.get(e, e) for e in extra]
    caplog.clear()
    if status == 2:
        with pytest.raises(SystemExit) as exit_:
            lm_lora.main(cli_args(example, tmp_path / "out", "--iters", "1", *extra))
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err
        return
    assert lm_lora.main(cli_args(example, tmp_path / "out", "--iters", "1", *extra)) == status
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and said in errors[0] and "\n" not in errors[0], errors
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_missing_train_is_one_line(example, tmp_path, capsys):
    argv = [a for a in cli_args(example, tmp_path / "out") if a != "--train"]
    with pytest.raises(SystemExit) as exit_:
        lm_lora.main(argv)
    assert exit_.value.code == 2 and "--train is required with --train-mode dpo or orpo" in capsys.readouterr().err


def test_a_finished_run_resumed_says_so_and_loads_nothing(example, tmp_path, capsys):
    out = tmp_path / "out"
    assert lm_lora.main(cli_args(example, out, "--iters", "2", "--train-mode", "orpo")) == 0
    before = metrics(out)
    capsys.readouterr()
    assert lm_lora.main(cli_args(example, out, "--iters", "2", "--train-mode", "orpo", "--resume-from", str(out))) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"already finished: {out / 'checkpoints' / 'step_00000002'} is step 2 of 2, loss ")
    assert "a larger --iters would continue it" in said and metrics(out) == before
