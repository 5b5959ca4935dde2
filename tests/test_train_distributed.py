"""Data-parallel fine-tuning under `mlx.launch -n 2` on localhost: both ranks end equal."""

import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest
from mlx_fused_lora.csm import CSMConfig
from mlx_fused_lora.train.csm.synthetic import write_random_csm, write_synthetic_dataset
from train_helpers import launcher

SCRIPT = textwrap.dedent("""
    import sys
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_fused_lora.train.csm import CSMLoRATrainer
    model, audio, out = sys.argv[1:4]
    t = CSMLoRATrainer(model, out, tokenizer="byte", lora_dropout=0.1, learning_rate=5e-3, progress=False)
    t.prepare_data(audio, val_split=0.0)
    r = t.train(epochs=0, max_steps=6, batch_size=1, val_every=0, save_every=3)
    rank = t.world.rank
    mx.save_safetensors(f"{out}/rank{rank}.safetensors", dict(tree_flatten(t.model.trainable_parameters())))
    print(f"rank {rank} of {t.world.size}: loss {r.final_loss:.6f}")
""")


@pytest.mark.skipif(launcher() is None, reason="mlx.launch not installed")
def test_two_ranks_train_to_identical_adapters(tmp_path):
    model = write_random_csm(tmp_path / "model", CSMConfig.tiny(text_vocab_size=260))
    audio = write_synthetic_dataset(tmp_path / "data", num_files=4, num_codebooks=8, audio_vocab_size=24)
    script = tmp_path / "train_rank.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    proc = subprocess.run(
        [launcher(), "-n", "2", "--python", sys.executable, str(script), str(model), str(audio), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 of 2" in proc.stdout and "rank 1 of 2" in proc.stdout
    a, b = mx.load(str(out / "rank0.safetensors")), mx.load(str(out / "rank1.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k
    # the adapters trained (lora_b starts at zero) and only rank 0 wrote the run's files
    assert any(np.abs(np.array(a[k])).max() > 0 for k in a if k.endswith("lora_b"))
    assert (out / "fine_tuned_model.safetensors").exists() and (out / "checkpoints" / "latest").exists()
    # the reported loss is the mean over ranks, the same number on both
    losses = sorted(l for l in proc.stdout.splitlines() if l.startswith("rank "))
    assert losses[0].split("loss ")[1] == losses[1].split("loss ")[1]
