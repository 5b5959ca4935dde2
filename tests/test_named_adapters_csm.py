"""Named adapters on CSM: generation per voice on one base, finetune of a named adapter (start from, stack on), the generate CLI."""

import wave

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_fused_lora.adapters import active_adapters, add_adapter, list_adapters, read_adapters, set_adapter
from mlx_fused_lora.csm import CSM, CSMConfig, apply_lora, generate
from mlx_fused_lora.layers import lora_layers
from mlx_fused_lora.train import example as example_module
from mlx_fused_lora.train.csm import CSMLoRATrainer
from mlx_fused_lora.train.csm.cli import build_parser
from mlx_fused_lora.train.csm.cli import main as finetune_main
from mlx_fused_lora.train.csm.generate import main as generate_main
from test_example import run_readme_block
from train_helpers import K, finetune_args, write_tiny_run


def voiced_csm():
    mx.random.seed(3)
    model = CSM(CSMConfig.tiny())
    apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8.0)
    add_adapter(model, "voice", {"rank": 2, "scale": 4.0, "keys": ["q_proj", "codebook0_head"]})
    key = mx.random.key(0)
    for _, layer in lora_layers(model):
        for h in [layer, *layer.get("adapters", {}).values()]:
            key, sub = mx.random.split(key)
            h.lora_b = 0.5 * mx.random.normal(h.lora_b.shape, key=sub)
    mx.eval(model.parameters())
    return model


def prompt(model):
    cfg = model.config
    tokens = mx.array(np.random.default_rng(0).integers(0, cfg.audio_vocab_size, (1, 3, cfg.audio_num_codebooks + 1)))
    mask = mx.concatenate([mx.ones((1, 3, cfg.audio_num_codebooks)), mx.zeros((1, 3, 1))], axis=-1)
    return tokens.astype(mx.int32), mask


def test_generate_speaks_with_the_adapter_asked_for():
    model = voiced_csm()
    tokens, mask = prompt(model)
    greedy = dict(temperature=0.0, max_frames=3)
    by_name = {n: generate(model, tokens, mask, adapters=n, **greedy) for n in ("default", "voice")}
    assert active_adapters(model) == [("default", 1.0)]  # the call's choice did not stay
    set_adapter(model, "voice")
    assert mx.array_equal(generate(model, tokens, mask, **greedy), by_name["voice"]).item()
    assert not mx.array_equal(by_name["default"], by_name["voice"]).item()
    mixed = generate(model, tokens, mask, adapters={"default": 0.5, "voice": 0.5}, **greedy)
    assert mixed.shape == by_name["voice"].shape and active_adapters(model) == [("voice", 1.0)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root, model, audio = write_tiny_run(tmp_path_factory.mktemp("named"), num_files=4)
    first = root / "voice_a"
    args = finetune_args(model, audio, first, "--adapter-name", "voice_a", "--max-steps", "1", "--val-split", "0")
    assert finetune_main(args) == 0
    return root, model, audio, first


def test_finetune_a_named_adapter_started_from_another_and_stacked_on_it(run, tmp_path):
    root, model_path, audio, first = run
    voice_a = read_adapters(first)[0].modules
    trainer = CSMLoRATrainer(
        model_path,
        tmp_path / "b",
        tokenizer="byte",
        adapter_name="voice_b",
        resume_adapter_file=str(first),
        frozen_adapters=[f"voice_a={first}"],
        max_seq_len=256,
        seed=1,
        progress=False,
    )
    model = trainer.model
    assert list_adapters(model) == ["voice_b", "voice_a"]
    assert dict(active_adapters(model)) == {"voice_b": 1.0, "voice_a": 1.0}
    trained = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trained and all(".adapters." not in k for k in trained)  # voice_b is each layer's own; voice_a frozen
    layer = model.backbone.layers[0].self_attn.q_proj
    assert mx.array_equal(layer.lora_a, voice_a["backbone.layers.0.self_attn.q_proj"].lora_a).item()  # started from
    assert layer.scale == 2.0  # the run's alpha / r, not the file's
    trainer.prepare_data(audio, val_split=0.0)
    trainer.train(batch_size=2, max_steps=1, save_every=10)
    written = read_adapters(tmp_path / "b")[0].modules  # the trained adapter alone
    assert written.keys() == voice_a.keys()
    assert mx.array_equal(written["backbone.layers.0.self_attn.q_proj"].lora_b, layer.lora_b).item()
    frozen = layer.adapters["voice_a"]
    assert mx.array_equal(frozen.lora_b, voice_a["backbone.layers.0.self_attn.q_proj"].lora_b).item()


def test_finetune_help_names_the_adapter_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--adapter-name", "--resume-adapter-file", "--frozen-adapters"))


def test_resume_adapter_file_must_fit_the_run(run, tmp_path, caplog):
    root, model_path, audio, first = run
    args = finetune_args(model_path, audio, tmp_path / "c", "--resume-adapter-file", str(first), "--lora-r", "4")
    assert finetune_main([*args, "--max-steps", "1"]) == 1
    assert "--resume-adapter-file" in caplog.text and "rank 8 there and rank 4 in this run" in caplog.text


def test_generate_cli_one_base_two_voices(run, tmp_path, capsys):
    root, model_path, audio, first = run
    common = ["--model-path", str(model_path), "--tokenizer", "byte", "--text", "hi", "--temperature", "0"]
    outputs = [str(tmp_path / f"{n}.npy") for n in ("a", "a2", "base")]
    code = generate_main(
        [*common, "--max-frames", "3", "--adapter", f"voice_a={first}", "--adapter", f"again={first}"]
        + ["--use", "voice_a", "--use", "again=1.0", "--use", "none", "--output", *outputs]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {outputs[0]} (voice_a=1)" in printed and f"wrote {outputs[2]} (the base model)" in printed
    a, a2 = np.load(outputs[0]), np.load(outputs[1])
    assert a.shape[0] == K and np.array_equal(a, a2)  # the same adapter under two names speaks alike
    assert generate_main([*common, "--adapter", f"x={first}", "--use", "nope", "--output", outputs[0]]) == 1


WORKFLOW = "tested-by: tests/test_named_adapters_csm.py (the multi-speaker workflow)"


@pytest.mark.skipif(not example_module._have("mlx_audio"), reason="needs the [audio] extra")
def test_the_readme_multi_speaker_workflow(tmp_path, monkeypatch, capsys):
    """The README's block as written, fewer steps and frames (argparse keeps the last value)."""
    shorter = {"finetune": ["--max-steps", "1", "--no-progress", "--val-split", "0"], "generate": ["--max-frames", "3"]}
    monkeypatch.chdir(tmp_path)
    lines = run_readme_block(WORKFLOW, shorter)
    assert [line[1] for line in lines[:4]] == ["example", "finetune", "finetune", "generate"]
    assert {line[1] for line in lines} <= {"example", "finetune", "generate", "merge-adapters"}
    printed = capsys.readouterr().out
    said_by = {"a.wav": "speaker_a=1", "b.wav": "speaker_b=1", "mix.wav": "speaker_a=0.5, speaker_b=0.5"}
    for wav, said in {**said_by, "merged.wav": "merged"}.items():
        assert f"wrote {wav} ({said})" in printed
        with wave.open(wav, "rb") as f:
            assert f.getframerate() == 24_000 and f.getnframes() > 0
    assert list_adapters(read_model_adapters(tmp_path)) == ["speaker_a", "speaker_b"]


def read_model_adapters(root):
    from mlx_fused_lora.adapters import load_adapters
    from mlx_fused_lora.csm import load_csm

    model = load_csm(root / "voices" / "model")
    for name in ("speaker_a", "speaker_b"):
        load_adapters(model, root / "voices" / name, name=name)
    return model
