"""``python -m mlx_fused_lora.lm_lora`` with this package's options (issue 24, part 2): PEFT's
init and patterns, a rank schedule and the conversion, end to end through mlx-lm's own trainer,
saver and ``--test`` loader, on the tiny Llama of ``example --llm``."""

import contextlib
import io
import json
import re
import warnings

import pytest
from mlx_fused_lora.adapters import convert_adapter, read_adapters
from mlx_fused_lora.bench import peft_peer
from mlx_fused_lora.train.lm_example import write_lm_example
from test_rank_patterns import check_in_peft

pytest.importorskip("mlx_lm")

from mlx_fused_lora.lm_lora import PATCHED_NAMES, _import_mlx_lm_tuner  # noqa: E402
from mlx_fused_lora.lm_lora import main as lm_lora  # noqa: E402

TRAIN = ["--train", "--iters", "6", "--batch-size", "4", "--num-layers", "2", "--learning-rate", "2e-3"]
TRAIN += ["--steps-per-report", "3", "--steps-per-eval", "100", "--val-batches", "1"]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_lm_example(tmp_path_factory.mktemp("llm") / "example", samples=16)


def run(example, adapters, *args) -> str:
    """The command's output (mlx-lm prints its report; our lines go there too). mlx-lm's class
    names, which the command patches for good, are given back: later tests build mlx-lm's own."""
    out = io.StringIO()
    modules = _import_mlx_lm_tuner()
    names = [(modules[module], name) for module, name in PATCHED_NAMES]
    saved = [(module, name, getattr(module, name)) for module, name in names]
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the inits' warning about the base (tests/test_init_wiring.py reads it)
            args = ["--model", str(example.model), "--data", str(example.data), "--adapter-path", str(adapters), *args]
            lm_lora(args)
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
    return out.getvalue()


def test_loss(output: str) -> str:
    return re.search(r"Test loss (\S+),", output).group(1)


test_loss.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def patterned(example, tmp_path_factory):
    """A PiSSA run with rank and alpha patterns, tested after training and again from its files."""
    adapters = tmp_path_factory.mktemp("patterned")
    options = ["--rank-pattern", "v_proj=4", "--alpha-pattern", "layers.1.self_attn.q_proj=64"]
    options += ["--init-lora-weights", "pissa", "--test", "--test-batches", "1"]
    trained = run(example, adapters, *TRAIN, *options)
    reloaded = run(example, adapters, "--test", "--test-batches", "1")
    convert_adapter(adapters, adapters.parent / "peft", "peft")
    return adapters, trained, reloaded


def expected_llama(path):
    rank = 4 if path.endswith("v_proj") else 8
    alpha = 64.0 if path == "model.layers.1.self_attn.q_proj" else 20.0 * 8  # mlx-lm's scale 20 at rank 8
    return rank, alpha / rank


def test_patterns_and_the_init_reach_every_module_and_the_saved_config(patterned):
    adapters, trained, _ = patterned
    config = json.loads((adapters / "adapter_config.json").read_text())
    params = config["lora_parameters"]  # where mlx-lm keeps its LoRA settings, and the file says them
    assert params["rank_pattern"] == {"v_proj": 4} and params["init_lora_weights"] == "pissa"
    assert "fused LoRA layers: 14 FusedLoRALinear in place of mlx-lm's LoRALinear" in trained
    for fmt_dir in (adapters, adapters.parent / "peft"):
        read = read_adapters(fmt_dir)[0]
        assert read.init_lora_weights == "pissa" and len(read.modules) == 14
        assert {p: (m.r, m.scale) for p, m in read.modules.items()} == {p: expected_llama(p) for p in read.modules}


def test_reloading_a_pissa_adapter_splits_the_base_again_and_gives_the_trained_model(patterned):
    _, trained, reloaded = patterned
    assert test_loss(reloaded) == test_loss(trained)


@pytest.mark.skipif(not peft_peer.available(), reason="needs torch and peft (pip install '.[peft]')")
def test_the_patterned_adapter_loads_in_peft(patterned):
    adapters, _, _ = patterned
    check_in_peft(adapters.parent / "peft", read_adapters(adapters.parent / "peft")[0])


def test_a_rank_schedule_grows_the_adapters_and_the_files_say_the_final_rank(example, tmp_path):
    trained = run(example, tmp_path / "grown", *TRAIN, "--rank-schedule", "12:2,16:4", "--test", "--test-batches", "1")
    assert "step 2: LoRA rank 12" in trained and "step 4: LoRA rank 16" in trained
    config = json.loads((tmp_path / "grown" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 16 and config["rank_schedule"] == "12:2,16:4"
    assert {m.r for m in read_adapters(tmp_path / "grown")[0].modules.values()} == {16}
    reloaded = run(example, tmp_path / "grown", "--test", "--test-batches", "1")  # mlx-lm's loader, rank 16
    assert test_loss(reloaded) == test_loss(trained)


def test_convert_to_lora_writes_plain_lora_of_the_original_weights(example, tmp_path):
    trained = run(example, tmp_path / "a", *TRAIN, "--init-lora-weights", "olora", "--convert-to-lora", "--test")
    assert "the olora adapter as plain LoRA of the original weights" in trained
    converted = read_adapters(tmp_path / "a")[0]
    assert converted.init_lora_weights is True and {m.r for m in converted.modules.values()} == {16}
    reloaded = run(example, tmp_path / "a", "--test")  # no split on loading: the original base and a rank-16 LoRA
    assert abs(float(test_loss(reloaded)) - float(test_loss(trained))) < 2e-3
