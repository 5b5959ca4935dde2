"""The trainer's data path: discovery, framing, bad data, WAV reading, tokenizers."""

import wave

import numpy as np
import pytest
from mlx_fused_lora.train.batching import batch_order
from mlx_fused_lora.train.csm.audio import read_wav, resample, write_wav
from mlx_fused_lora.train.csm.data import (
    DataSpec,
    Segment,
    build_dataset,
    build_sample,
    collate,
    frame_turn,
    split_train_val,
)
from mlx_fused_lora.train.csm.synthetic import write_synthetic_dataset
from mlx_fused_lora.train.csm.tokenizer import ByteTokenizer, load_text_tokenizer

K, V = 8, 24
SPEC = DataSpec(num_codebooks=K, audio_vocab_size=V, text_vocab_size=260, max_seq_len=256, context_turns=1)
# the skipping tests opt in to dropping mismatched files (the default refuses them: test_train_run_rules)
SKIP = DataSpec(K, V, 260, max_seq_len=256, context_turns=1, drop_mismatched=True)


def test_frame_turn_layout():
    codes = np.arange(K * 5, dtype=np.int32).reshape(K, 5) % (V - 1) + 1
    tokens, mask, is_audio = frame_turn(Segment("hi", 3, codes), ByteTokenizer(), SPEC)
    text = ByteTokenizer().encode("[3]hi")
    assert tokens.shape == (len(text) + 5 + 1, K + 1)
    # text rows: only the text column
    assert list(tokens[: len(text), K]) == text
    assert mask[: len(text), K].all() and not mask[: len(text), :K].any()
    # audio rows: the codes, transposed, and an all-zero end frame with the audio mask on
    np.testing.assert_array_equal(tokens[len(text) : -1, :K], codes.T)
    assert (tokens[-1] == 0).all() and mask[-1, :K].all() and not mask[-1, K]
    assert not mask[len(text) :, K].any()
    assert list(is_audio) == [False] * len(text) + [True] * 6


def test_context_turns_targets_only_last_turn_and_truncation():
    seg = [Segment(w, 0, np.ones((K, 4), np.int32)) for w in ("one", "two", "three")]
    sample, truncated = build_sample(seg[1:], ByteTokenizer(), SPEC)
    n_last = len(ByteTokenizer().encode("[0]three")) + 5
    assert not truncated and sample.target.sum() == 5 and sample.target[-5:].all()
    assert len(sample) == len(ByteTokenizer().encode("[0]two")) + 5 + n_last
    short = DataSpec(K, V, 260, max_seq_len=n_last + 2, context_turns=1)
    sample, truncated = build_sample(seg[1:], ByteTokenizer(), short)
    assert truncated and len(sample) == n_last  # the context turn went first


def test_bad_data_is_skipped_and_counted(tmp_path):
    audio = write_synthetic_dataset(tmp_path, num_files=4, num_codebooks=K, audio_vocab_size=V, alignments=False)
    (tmp_path / "transcripts" / "clip_000.txt").unlink()  # missing transcript
    (audio / "clip_001.npy").write_bytes(b"not a numpy file")  # unreadable
    np.save(audio / "bad_range.npy", np.full((K, 10), V + 5, np.int32))
    (tmp_path / "transcripts" / "bad_range.txt").write_text("out of range")
    np.save(audio / "few.npy", np.ones((K - 2, 10), np.int32))
    (tmp_path / "transcripts" / "few.txt").write_text("too few codebooks")
    np.save(audio / "empty.npy", np.ones((K, 0), np.int32))
    (tmp_path / "transcripts" / "empty.txt").write_text("no audio")
    samples, report = build_dataset(audio, ByteTokenizer(), SKIP)
    assert report.files == 7
    assert dict(report.skipped) == {
        "missing transcript": 1,
        "unreadable file": 1,
        "codes out of range": 1,
        "too few codebooks": 1,
        "empty segment": 1,
    }
    assert len(samples) == report.samples == 2
    assert "skipped" in str(report) and "missing transcript: 1" in str(report)


def test_alignments_cut_segments_and_give_context(tmp_path):
    audio = write_synthetic_dataset(tmp_path, num_files=3, num_codebooks=K, audio_vocab_size=V)
    samples, report = build_dataset(audio, ByteTokenizer(), SPEC)
    assert report.segments == 6 and len(samples) == 6  # each file: two turns around a 1 s pause
    # the second turn of a file carries the first as context: more rows than targets + its text
    second = samples[1]
    assert second.target.sum() < len(second) - len(ByteTokenizer().encode("[0]x"))


def test_wav_input_without_codec_is_a_clear_error(tmp_path):
    (tmp_path / "audio").mkdir()
    write_wav(tmp_path / "audio" / "a.wav", np.zeros(2400, np.float32), 24000)
    (tmp_path / "audio" / "a.txt").write_text("hello")
    with pytest.raises(RuntimeError, match="--codec-path"):
        build_dataset(tmp_path / "audio", ByteTokenizer(), SPEC)


def test_read_wav_pcm16_stereo_and_resample(tmp_path):
    rate, f0 = 16000, 440.0
    t = np.arange(rate) / rate
    left = 0.5 * np.sin(2 * np.pi * f0 * t)
    pcm = (np.stack([left, left], axis=1) * 32767).astype("<i2")
    with wave.open(str(tmp_path / "s.wav"), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    x, r = read_wav(tmp_path / "s.wav")
    assert r == rate and x.shape == (rate,) and abs(np.abs(x).max() - 0.5) < 1e-3
    y = resample(x, rate, 24000)
    assert y.shape == (24000,)
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) - f0) <= 1  # 1 s of audio: bin = Hz
    np.testing.assert_allclose(y[::3][:1000], np.interp(np.arange(1000) * 3 / 24000, t, x), atol=2e-3)


def test_split_and_batch_order_are_pure_functions_of_the_seed():
    samples = list(range(10))
    a = split_train_val(samples, 0.2, seed=5)
    assert a == split_train_val(samples, 0.2, seed=5) and len(a[1]) == 2
    assert sorted(a[0] + a[1]) == samples
    epoch0 = np.concatenate([batch_order(10, 3, 7, i) for i in range(4)])
    assert sorted(epoch0) == list(range(10))  # one epoch covers every sample once
    np.testing.assert_array_equal(batch_order(10, 3, 7, 5), batch_order(10, 3, 7, 5))
    assert not np.array_equal(np.concatenate([batch_order(10, 3, 7, i) for i in range(4, 8)]), epoch0)


def test_collate_pads_with_masked_rows():
    s1, _ = build_sample([Segment("a", 0, np.ones((K, 3), np.int32))], ByteTokenizer(), SPEC)
    s2, _ = build_sample([Segment("abcdefgh", 0, np.ones((K, 9), np.int32))], ByteTokenizer(), SPEC)
    b = collate([s1, s2], max_seq_len=256, pad_multiple=16)
    assert b["tokens"].shape == (2, 32, K + 1) and b["target"].shape == (2, 32)
    assert not b["mask"][0, len(s1) :].any() and not b["target"][0, len(s1) :].any()


def test_tokenizer_json_through_tokenizers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "[UNK]": 2, "[": 3, "]": 4, "0": 5, "hello": 6, "world": 7}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_text_tokenizer(tmp_path)  # a directory holding tokenizer.json
    assert loaded.encode("[0]hello world") == [0, 3, 5, 4, 6, 7, 1]
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        (tmp_path / "empty").mkdir()
        load_text_tokenizer(None, tmp_path / "empty")
