"""The WAV path: real WAV files -> resampling -> mlx-audio's Mimi -> CSM frames -> training,
and `--generate-samples` back through Mimi's decoder, on a tiny random Mimi.

The tiny Mimi is written the way the released one is (kyutai's PyTorch layout, bfloat16),
plus its config in the file's metadata, so `MimiCodec` takes the same code path as with
``tokenizer-e351c8d8-checkpoint125.safetensors``.
"""

import json
import math
import re
import wave

import numpy as np
import pytest

pytest.importorskip("mlx_audio")

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_audio.codec.models.mimi.mimi import Mimi  # noqa: E402
from mlx_fused_lora.csm import CSMConfig  # noqa: E402
from mlx_fused_lora.train.csm import CSMLoRATrainer  # noqa: E402
from mlx_fused_lora.train.csm.audio import MIMI_CONFIG_KEY, MimiCodec, save_mimi, write_wav  # noqa: E402
from mlx_fused_lora.train.csm.cli import main  # noqa: E402
from mlx_fused_lora.train.csm.synthetic import random_mimi, write_random_csm  # noqa: E402
from train_helpers import run_paths  # noqa: E402

K = 8  # codebooks, the tiny CSM's and the tiny Mimi's
BINS = 21  # Mimi codes per codebook
V = BINS + 3  # the CSM's audio vocabulary is larger than Mimi's codebooks, as 2051 vs 2048
SAMPLES_PER_FRAME = 1920  # 24 kHz / 12.5 frames/s


def _kyutai_name(name: str) -> str:
    """mlx-audio's parameter name -> kyutai's (the inverse of `Mimi.load_pytorch_weights`)."""
    for side in ("encoder", "decoder"):
        name = name.replace(f"{side}.init_conv1d.", f"{side}.model.0.")
        name = name.replace(f"{side}.final_conv1d.", f"{side}.model.14.")
    name = re.sub(r"^encoder\.layers\.(\d)\.residuals\.0\.", lambda m: f"encoder.model.{1 + 3 * int(m[1])}.", name)
    name = re.sub(r"^encoder\.layers\.(\d)\.downsample\.", lambda m: f"encoder.model.{3 + 3 * int(m[1])}.", name)
    name = re.sub(r"^decoder\.layers\.(\d)\.upsample\.", lambda m: f"decoder.model.{2 + 3 * int(m[1])}.", name)
    name = re.sub(r"^decoder\.layers\.(\d)\.residuals\.0\.", lambda m: f"decoder.model.{3 + 3 * int(m[1])}.", name)
    name = re.sub(r"\.block\.(\d)\.", lambda m: f".block.{2 * int(m[1]) + 1}.", name)  # ELUs sit between
    name = name.replace(".gating.linear", ".linear").replace(".in_proj.weight", ".in_proj_weight")
    return name.replace(".codebook.", "._codebook.").replace(".initialized", "._initialized")


def _kyutai_value(name: str, v: mx.array) -> mx.array:
    """mlx-audio's layout -> PyTorch's: convolutions are channels-first there."""
    if name.endswith((".conv.weight", ".output_proj.weight", ".input_proj.weight")):
        return v.swapaxes(-1, -2)
    if name.endswith(".convtr.weight"):  # MLX (out, k, in/groups) -> PyTorch (in, out/groups, k)
        return v.transpose(0, 2, 1) if v.shape[2] == 1 else v.transpose(2, 0, 1)
    return v


def save_kyutai_checkpoint(model: Mimi, path, dtype=mx.float32):
    """``model`` as kyutai's checkpoint has it, with its config in the metadata."""
    import dataclasses

    weights = {_kyutai_name(k): _kyutai_value(k, v).astype(dtype) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(path), weights, metadata={MIMI_CONFIG_KEY: json.dumps(dataclasses.asdict(model.cfg))})
    return path


def _clip(seconds: float, rate: int, kind: str, rng) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    if kind == "sine":
        return 0.5 * np.sin(2 * np.pi * rng.uniform(150, 600) * t)
    return 0.3 * rng.standard_normal(len(t))


CLIPS = [  # (seconds, rate, kind): two rates away from 24 kHz, so resampling runs both ways
    (1.0, 16_000, "sine"),
    (1.5, 44_100, "noise"),
    (0.8, 16_000, "noise"),
    (1.2, 44_100, "sine"),
    (1.0, 44_100, "sine"),
    (0.9, 16_000, "sine"),
]


def write_wav_dataset(root):
    rng = np.random.default_rng(0)
    (root / "audio").mkdir(parents=True)
    (root / "transcripts").mkdir()
    for i, (seconds, rate, kind) in enumerate(CLIPS):
        write_wav(root / "audio" / f"clip_{i}.wav", _clip(seconds, rate, kind, rng), rate)
        (root / "transcripts" / f"clip_{i}.txt").write_text(f"clip {i} is a {kind} at {rate} hertz\n")
    return root / "audio"


def expected_frames(seconds: float, rate: int) -> int:
    samples_24k = round(int(seconds * rate) * 24_000 / rate)
    return math.ceil(samples_24k / SAMPLES_PER_FRAME)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("wav")
    mimi = random_mimi(K, BINS)
    codec_file = save_kyutai_checkpoint(mimi, root / "tokenizer-tiny.safetensors", mx.bfloat16)
    model = write_random_csm(
        root / "model", CSMConfig.tiny(text_vocab_size=260, audio_vocab_size=V, audio_num_codebooks=K)
    )
    return root, mimi, codec_file, model, write_wav_dataset(root / "data")


def test_codec_loads_kyutai_and_mlx_layouts_and_encodes_as_the_model(tiny, tmp_path):
    _, mimi, _, _, _ = tiny
    audio = _clip(1.3, 24_000, "noise", np.random.default_rng(1)).astype(np.float32)
    expected = np.array(mimi.encode(mx.array(audio)[None, None]))[0]
    assert expected.shape == (K, math.ceil(len(audio) / SAMPLES_PER_FRAME))
    assert len(np.unique(expected[0])) > 1  # the random Mimi tells frames apart
    for path in (
        save_kyutai_checkpoint(mimi, tmp_path / "kyutai.safetensors"),
        save_mimi(mimi, tmp_path / "mlx.safetensors"),
    ):
        codec = MimiCodec(path, num_codebooks=K)
        codes = codec.encode(audio)
        assert codes.dtype == np.int32
        np.testing.assert_array_equal(codes, expected, err_msg=path.name)
        pcm = codec.decode(codes)
        assert pcm.dtype == np.float32 and pcm.shape == (codes.shape[1] * SAMPLES_PER_FRAME,)
        assert np.isfinite(pcm).all()
    with pytest.raises(FileNotFoundError, match="pass the file itself"):
        MimiCodec(tmp_path, K)  # two candidate files, neither named for Mimi


def test_codec_keeps_the_first_codebooks_and_refuses_what_it_cannot_use(tiny):
    _, _, codec_file, model, _ = tiny
    audio = _clip(0.5, 24_000, "sine", np.random.default_rng(2)).astype(np.float32)
    full = MimiCodec(codec_file, K).encode(audio)
    np.testing.assert_array_equal(MimiCodec(codec_file, 3).encode(audio), full[:3])  # residual: a prefix
    with pytest.raises(ValueError, match=f"{K} codebooks; the model needs 32"):
        MimiCodec(codec_file, 32)
    assert MimiCodec(codec_file.parent, K).path == codec_file  # a directory: its tokenizer* file
    with pytest.raises(ValueError, match="not a Mimi checkpoint"):
        MimiCodec(next(model.glob("*.safetensors")), K)  # the CSM's weights by mistake
    assert MimiCodec(codec_file, K).encode(np.zeros(0, np.float32)).shape == (K, 0)


def test_decode_clamps_codes_past_the_codebook(tiny, caplog):
    _, _, codec_file, _, _ = tiny
    codec = MimiCodec(codec_file, K)
    codes = np.full((K, 3), V - 1)  # a CSM code Mimi has no entry for
    pcm = codec.decode(codes)
    np.testing.assert_array_equal(pcm, codec.decode(np.full((K, 3), BINS - 1)))
    assert "outside Mimi's codebook" in caplog.text


def test_wav_dataset_becomes_frames_of_mimi_codes(tiny, tmp_path):
    _, _, codec_file, model, audio = tiny
    trainer = CSMLoRATrainer(model, tmp_path / "out", tokenizer="byte", codec_path=codec_file, progress=False)
    report = trainer.prepare_data(audio, val_split=0.0, context_turns=0)
    assert (report.files, report.samples, sum(report.skipped.values())) == (len(CLIPS), len(CLIPS), 0)
    for sample in trainer.train_samples:
        seconds, rate, _ = CLIPS[int(sample.source.split("#")[0].split("_")[1])]
        audio_rows = sample.mask[:, 0]  # rows with the audio columns present (the end frame too)
        assert sample.tokens.shape[1] == K + 1 and sample.mask.shape == sample.tokens.shape
        assert audio_rows.sum() == expected_frames(seconds, rate) + 1
        codes = sample.tokens[audio_rows, :K]
        assert codes.min() >= 0 and codes.max() < BINS
        assert not codes[-1].any()  # the all-zero end frame


def test_finetune_cli_trains_on_wavs_and_writes_a_wav_sample(tiny, tmp_path, capsys):
    _, _, codec_file, model, audio = tiny
    out = tmp_path / "out"
    rc = main(
        [
            *run_paths(model, audio, out),
            "--codec-path",
            str(codec_file),
            "--tokenizer",
            "byte",
            "--batch-size",
            "2",
            "--learning-rate",
            "1e-2",
            "--epochs",
            "4",
            "--val-split",
            "0.2",
            "--val-every",
            "4",
            "--save-every",
            "4",
            "--decoder-fraction",
            "0.5",
            "--context-turns",
            "0",
            "--generate-samples",
            "--sample-prompt",
            "hello",
            "--no-progress",
            "--log-level",
            "WARNING",
        ]
    )
    assert rc == 0 and "done:" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) >= 8 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # it learns the clips' codes
    assert any("val_loss" in line for line in lines)
    assert {"fine_tuned_model.safetensors", "fine_tuned_model_metadata.json"} <= {p.name for p in out.iterdir()}
    with wave.open(str(out / "sample.wav"), "rb") as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (24_000, 1, 2)
        n = f.getnframes()
        assert n > 0 and n % SAMPLES_PER_FRAME == 0  # whole Mimi frames
    assert not (out / "sample.npy").exists()
