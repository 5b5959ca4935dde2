"""Several speakers' adapters trained in one run (``finetune --adapter-per-speaker``, the trainer's
``adapter_per_speaker``): each adapter gets exactly the gradients of its own rows trained alone on
the shared base; each is saved on its own and loads alone, plain or by name; speakers from the data;
the README's per-speaker run."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_fused_lora.adapters import list_adapters, load_adapters, set_adapter, using_adapters
from mlx_fused_lora.csm import load_csm
from mlx_fused_lora.train import example as example_module
from mlx_fused_lora.train.csm.cli import main as finetune_main
from mlx_fused_lora.train.csm.data import DataSpec, collate, find_files, load_segments, speaker_and_text
from mlx_fused_lora.train.csm.task import CSMLoRATrainer
from test_example import run_readme_block
from train_helpers import K, V, finetune_args, write_tiny_run


def tag_speakers(audio, count):
    """Begin transcript ``i`` with the speaker tag ``[i % count]`` (the data's own speaker ids)."""
    for i, path in enumerate(sorted((audio.parent / "transcripts").glob("*.txt"))):
        path.write_text(f"[{i % count}]{path.read_text()}")


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    root, model, audio = write_tiny_run(tmp_path_factory.mktemp("voices"), num_files=4)
    tag_speakers(audio, 2)
    return root, model, audio


def trainer_for(model, out, **settings):
    return CSMLoRATrainer(
        model,
        out,
        tokenizer="byte",
        adapter_per_speaker=True,
        lora_dropout=0.0,
        decoder_fraction=1.0,  # every row through the decoder: no random row choice
        target_modules=["q_proj", "v_proj", "codebook0_head", "projection"],
        max_seq_len=256,
        progress=False,
        **settings,
    )


def test_each_speaker_gets_exactly_the_gradients_of_its_own_rows_alone(voices, tmp_path):
    root, model_path, audio = voices
    trainer = trainer_for(model_path, tmp_path / "out")
    trainer.prepare_data(audio, val_split=0.0)
    model = trainer.model
    assert list_adapters(model) == ["speaker_0", "speaker_1"] and trainer.speakers.ids == (0, 1)
    # nonzero adapters, different per speaker, so every path of the gradient is exercised
    params = tree_flatten(model.trainable_parameters())
    model.load_weights(
        [(k, 0.1 * mx.random.normal(v.shape, key=mx.random.key(i))) for i, (k, v) in enumerate(params)], strict=False
    )
    samples = trainer.train_samples[:6]
    speakers = [s.speaker for s in samples]
    assert set(speakers) == {0, 1}
    mixed = dict(tree_flatten(nn.value_and_grad(model, trainer._loss)(model, *trainer._inputs(samples)[0])[1]))
    assert len(mixed) == len(params)  # both speakers' adapters, one step, one optimizer's tree
    for speaker in (0, 1):
        own = [s for s in samples if s.speaker == speaker]
        set_adapter(model, f"speaker_{speaker}")  # trained alone, on its own rows, on the shared base
        b = collate(own, 256)
        alone = nn.value_and_grad(model, trainer._loss)(
            model, mx.array(b["tokens"]), mx.array(b["mask"]), mx.array(b["target"])
        )
        alone = dict(tree_flatten(alone[1]))
        assert alone and all(k in mixed for k in alone)
        for k, g in alone.items():
            np.testing.assert_allclose(mixed[k], g, rtol=2e-4, atol=2e-6 * float(mx.abs(g).max()), err_msg=k)
    set_adapter(model, ["speaker_0", "speaker_1"])


def test_finetune_saves_each_speaker_alone_loadable_plain_and_by_name(voices, tmp_path):
    root, model_path, audio = voices
    out = tmp_path / "run"
    args = finetune_args(model_path, audio, out, "--adapter-per-speaker", "--max-steps", "2", "--val-split", "0")
    assert finetune_main([*args, "--target-modules", "q_proj", "codebook0_head"]) == 0
    for name in ("speaker_0", "speaker_1"):
        assert (out / name / "fine_tuned_model.safetensors").is_file()
    trained = load_csm(model_path)
    load_adapters(trained, out / "speaker_0", name="speaker_0")
    load_adapters(trained, out, name="speaker_1")  # PEFT's layout: OUTPUT_DIR/speaker_1
    plain = load_csm(model_path)
    load_adapters(plain, out / "speaker_1")  # a plain single-adapter file
    for m in (trained, plain):
        m.eval()  # no dropout
    tokens = mx.random.randint(0, V, (1, 5, K + 1), key=mx.random.key(0))
    mask = mx.ones((1, 5, K + 1))
    base = load_csm(model_path)(tokens, mask)
    with using_adapters(trained, "speaker_1"):
        speaker_1 = trained(tokens, mask)
    np.testing.assert_allclose(plain(tokens, mask), speaker_1, rtol=1e-5, atol=1e-6)
    with using_adapters(trained, "speaker_0"):
        assert not mx.allclose(trained(tokens, mask), speaker_1).item()
    assert not mx.allclose(speaker_1, base).item()  # trained: not the base any more


def test_speakers_come_from_the_transcripts_tag(tmp_path):
    assert speaker_and_text("[12] hello there", 0) == (12, "hello there")
    assert speaker_and_text("hello [1]", 4) == (4, "hello [1]")
    root, _, audio = write_tiny_run(tmp_path, num_files=2)
    tag_speakers(audio, 2)
    spec = DataSpec(K, V, 260, speaker_id=7)
    files = find_files(audio)
    speakers = [{seg.speaker for seg in load_segments(f, spec)} for f in files]
    assert speakers == [{0}, {1}]
    assert all(not seg.text.startswith("[") for f in files for seg in load_segments(f, spec))


def test_per_speaker_runs_refuse_what_they_cannot_do(voices, tmp_path, caplog):
    root, model_path, audio = voices
    args = finetune_args(model_path, audio, tmp_path / "x", "--adapter-per-speaker", "--max-steps", "1")
    assert finetune_main([*args, "--adapter-name", "alice"]) == 1
    assert "--adapter-per-speaker trains adapters named speaker_<id>" in caplog.text
    assert finetune_main([*args, "--save-mode", "full"]) == 1
    assert "--adapter-per-speaker saves each" in caplog.text


PER_SPEAKER_RUN = "tested-by: tests/test_multi_speaker.py (the per-speaker run)"


@pytest.mark.skipif(not example_module._have("mlx_audio"), reason="needs the [audio] extra")
def test_the_readme_per_speaker_run(tmp_path, monkeypatch, capsys):
    """The README's block as written, fewer steps and frames (argparse keeps the last value)."""
    shorter = {"finetune": ["--max-steps", "1", "--no-progress", "--val-split", "0"], "generate": ["--max-frames", "3"]}
    monkeypatch.chdir(tmp_path)
    lines = run_readme_block(PER_SPEAKER_RUN, shorter)
    assert [line[1] for line in lines] == ["example", "finetune", "generate"]
    printed = capsys.readouterr().out
    for wav, said in {"zero.wav": "speaker_0=1", "one.wav": "speaker_1=1"}.items():
        assert f"wrote {wav} ({said})" in printed
    for name in ("speaker_0", "speaker_1"):
        assert (tmp_path / "speakers" / "out" / name / "fine_tuned_model.safetensors").is_file()
