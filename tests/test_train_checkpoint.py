"""Checkpoints: round trip, atomic replacement, corrupt/truncated/incomplete ones refused."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_fused_lora.train.checkpoint import (
    TrainingCheckpointError,
    atomic_write_text,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


def _save(root, step):
    adapters = {"a.lora_a": mx.arange(12, dtype=mx.float32).reshape(3, 4) * step}
    opt = {"step": mx.array(step), "a.lora_a.m": mx.ones((3, 4))}
    return save_checkpoint(root, step, adapters, opt, {"step": step, "seed": 1})


def test_round_trip_and_latest(tmp_path):
    _save(tmp_path, 2)
    path = _save(tmp_path, 4)
    assert resolve_checkpoint(tmp_path) == path == resolve_checkpoint(tmp_path.parent / tmp_path.name)
    adapters, opt, state = load_checkpoint(tmp_path)
    assert state["step"] == 4 and opt["step"].item() == 4
    np.testing.assert_array_equal(np.array(adapters["a.lora_a"]), np.arange(12).reshape(3, 4) * 4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_keeps_only_the_last_checkpoints(tmp_path):
    for s in range(1, 6):
        save_checkpoint(tmp_path, s, {"x": mx.ones(2)}, {"y": mx.ones(1)}, {"step": s}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004", "step_00000005"]


def test_truncated_file_is_refused(tmp_path):
    path = _save(tmp_path, 3)
    f = path / "adapters.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(TrainingCheckpointError, match="adapters.safetensors is .* bytes.*truncated"):
        load_checkpoint(path)


def test_corrupt_byte_is_refused(tmp_path):
    path = _save(tmp_path, 3)
    f = path / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(TrainingCheckpointError, match="optimizer.safetensors has sha256.*corrupt"):
        load_checkpoint(path)


def test_incomplete_checkpoint_without_manifest_is_refused(tmp_path):
    path = _save(tmp_path, 3)
    (path / "manifest.json").unlink()
    with pytest.raises(TrainingCheckpointError, match="no manifest.json"):
        load_checkpoint(path)
    with pytest.raises(TrainingCheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def test_atomic_write_text_replaces_whole(tmp_path):
    p = tmp_path / "latest"
    atomic_write_text(p, "one\n")
    atomic_write_text(p, "two\n")
    assert p.read_text() == "two\n" and [x.name for x in tmp_path.iterdir()] == ["latest"]
