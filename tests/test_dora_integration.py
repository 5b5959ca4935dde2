"""DoRA beyond one layer: conversion, mlx-lm's trainer CLI, adapters with ``m``, CSM.

``linear_to_lora_layers(use_dora=True)``, ``python -m mlx_fused_lora.lm_lora
--fine-tune-type dora`` on a 4-bit model, the mlx-lm and PEFT adapter formats (``m`` /
``lora_magnitude_vector``) read and written, mlx-lm's own loader on our files, and
``apply_lora(use_dora=True)`` on a tiny CSM.
"""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

pytest.importorskip("mlx_lm")

from mlx_fused_lora.layers.fused_dora_linear import FusedDoRALinear  # noqa: E402
from mlx_lm.tuner.dora import DoRALinear  # noqa: E402
from test_dora import assert_close  # noqa: E402


def test_linear_to_lora_layers_use_dora_builds_fused_dora_and_trains_m():
    from mlx_fused_lora.layers import freeze_all_but_lora, linear_to_lora_layers
    from test_mlx_lm_integration import make_llama

    model = make_llama(num_hidden_layers=2)
    nn.quantize(model, group_size=64, bits=4)
    model.freeze()
    linear_to_lora_layers(model, 1, {"rank": 4, "scale": 2.0, "dropout": 0.0}, use_dora=True)
    dora = [m for _, m in model.named_modules() if isinstance(m, FusedDoRALinear)]
    assert len(dora) == 7 and all(isinstance(m.linear, nn.QuantizedLinear) for m in dora)
    freeze_all_but_lora(model)
    trainable = {k.rsplit(".", 1)[1] for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == {"lora_a", "lora_b", "m"}


# -- python -m mlx_fused_lora.lm_lora --fine-tune-type dora, on a 4-bit model --


def write_4bit_model_dir(path):
    """A tiny Llama directory as mlx-lm's convert -q writes it: 4-bit weights + "quantization"."""
    import json

    from test_mlx_lm_integration import write_tiny_model_dir

    model, words = write_tiny_model_dir(path)
    nn.quantize(model, group_size=64, bits=4)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((path / "config.json").read_text())
    config["quantization"] = {"group_size": 64, "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    return words


def test_lm_lora_fine_tune_type_dora_trains_a_4bit_model(tmp_path, monkeypatch):
    import json

    import mlx_lm.lora
    from mlx_fused_lora import lm_lora
    from test_mlx_lm_integration import mlx_lm_classes, write_text_data

    mlx_lm_classes(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    words = write_4bit_model_dir(tmp_path / "model")
    write_text_data(tmp_path / "data", words)
    seen = {}
    real_train = mlx_lm.lora.train

    def spy_train(model, **kwargs):
        seen["layers"] = [m for _, m in model.named_modules() if hasattr(m, "lora_a")]
        return real_train(model=model, **kwargs)

    monkeypatch.setattr(mlx_lm.lora, "train", spy_train)
    adapters = tmp_path / "adapters"
    common = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--batch-size", "2"]
    lm_lora.main(
        [*common, "--train", "--fine-tune-type", "dora", "--iters", "3", "--num-layers", "1"]
        + ["--val-batches", "1", "--learning-rate", "1e-3", "--adapter-path", str(adapters)]
    )
    layers = seen["layers"]
    assert layers and all(type(m) is FusedDoRALinear for m in layers)
    assert all(isinstance(m.linear, nn.QuantizedLinear) for m in layers)
    saved = mx.load(str(adapters / "adapters.safetensors"))
    leaves = {k.rsplit(".", 1)[1] for k in saved}
    assert leaves == {"lora_a", "lora_b", "m"}
    assert len(saved) == 3 * len(layers)
    assert json.loads((adapters / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    # --test: mlx-lm's load_adapters rebuilds the DoRA layers (ours) and loads m.
    seen.clear()
    real_evaluate = mlx_lm.lora.evaluate

    def spy_evaluate(model, **kwargs):
        seen["m"] = {p: m.m for p, m in model.named_modules() if isinstance(m, FusedDoRALinear)}
        return real_evaluate(model=model, **kwargs)

    monkeypatch.setattr(mlx_lm.lora, "evaluate", spy_evaluate)
    lm_lora.main([*common, "--test", "--test-batches", "1", "--adapter-path", str(adapters)])
    assert len(seen["m"]) == len(layers)
    for path, m in seen["m"].items():
        assert mx.array_equal(m, saved[f"{path}.m"]).item(), path


# -- adapters with m: mlx-lm and PEFT formats --


def dora_llama(seed=0, quantize=False):
    from mlx_fused_lora.layers import linear_to_lora_layers
    from test_mlx_lm_integration import make_llama

    model = make_llama(seed=0, num_hidden_layers=2)
    if quantize:
        nn.quantize(model, group_size=64, bits=4)
    model.freeze()
    mx.random.seed(seed)
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 3.0, "dropout": 0.0}, use_dora=True)
    return model


def randomized(model, seed):
    mx.random.seed(seed)
    params = dict(tree_flatten(model.trainable_parameters()))
    new = {k: (v * (1 + 0.1 * mx.random.normal(v.shape)) if k.endswith(".m") else 0.05 * mx.random.normal(v.shape))
           for k, v in params.items()}  # fmt: skip
    model.load_weights(list(new.items()), strict=False)
    mx.eval(model.parameters())
    return new


@pytest.mark.parametrize("fmt", ["mlx-lm", "peft"])
@pytest.mark.parametrize("quantize", [False, True])
def test_dora_adapters_round_trip(tmp_path, fmt, quantize):
    from mlx_fused_lora.adapters import load_adapters, read_adapters, save_adapters

    trained = dora_llama(quantize=quantize)
    saved = randomized(trained, seed=1)
    save_adapters(trained, tmp_path, format=fmt)
    adapters, detected = read_adapters(tmp_path)
    assert detected == fmt and adapters.use_dora
    fresh = dora_llama(seed=9, quantize=quantize)  # other adapters, same base
    load_adapters(fresh, tmp_path)
    loaded = dict(tree_flatten(fresh.trainable_parameters()))
    assert loaded.keys() == saved.keys()
    for k, v in saved.items():
        assert mx.array_equal(loaded[k], v).item(), k
    tokens = mx.array([[1, 5, 9, 3]])
    assert_close(fresh(tokens), trained(tokens), 0.0, 1e-5, "logits after the round trip")
    # A plain model (no LoRA layers yet) gets FusedDoRALinear layers from the file.
    from test_mlx_lm_integration import make_llama

    plain = make_llama(seed=0, num_hidden_layers=2)
    if quantize:
        nn.quantize(plain, group_size=64, bits=4)
    load_adapters(plain, tmp_path)
    assert sum(isinstance(m, FusedDoRALinear) for _, m in plain.named_modules()) == 14
    assert_close(plain(tokens), trained(tokens), 0.0, 1e-5, "logits, adapters loaded into a plain model")


def test_dora_file_names_and_mlx_lm_reads_ours(tmp_path):
    import json

    from mlx_fused_lora.adapters import convert_adapter, save_adapters
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters
    from test_mlx_lm_integration import make_llama

    trained = dora_llama()
    saved = randomized(trained, seed=2)
    save_adapters(trained, tmp_path / "mlx", format="mlx-lm")
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "dora"
    # PEFT names: lora_magnitude_vector beside lora_A / lora_B, use_dora in the config.
    convert_adapter(tmp_path / "mlx", tmp_path / "peft", to="peft")
    peft = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    q = "base_model.model.model.layers.1.self_attn.q_proj"
    assert mx.array_equal(peft[f"{q}.lora_magnitude_vector"], saved["model.layers.1.self_attn.q_proj.m"]).item()
    assert peft[f"{q}.lora_A.weight"].shape == (4, 64)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"] is True
    # Back to mlx-lm, and mlx-lm's own loader (its DoRALinear) reads it.
    convert_adapter(tmp_path / "peft", tmp_path / "back", to="mlx-lm")
    model = make_llama(seed=0, num_hidden_layers=2)
    model.freeze()
    mlx_lm_load_adapters(model, str(tmp_path / "back"))
    assert sum(isinstance(m, DoRALinear) for _, m in model.named_modules()) == 14
    for k, v in dict(tree_flatten(model.trainable_parameters())).items():
        assert mx.array_equal(v, saved[k]).item(), k
    tokens = mx.array([[1, 5, 9, 3]])
    assert_close(model(tokens), trained(tokens), 1e-5, 1e-5, "mlx-lm's DoRALinear on our saved adapters")


def test_bad_dora_files_are_named(tmp_path):
    import json

    from mlx_fused_lora.adapters import AdapterError, read_adapters, save_adapters

    save_adapters(dora_llama(), tmp_path, format="mlx-lm")
    weights = tmp_path / "adapters.safetensors"
    good = mx.load(str(weights))
    mx.eval(good)  # mx.load reads lazily: the writes below replace the file it would read from
    key = "model.layers.0.self_attn.q_proj.m"

    def write(tensors):
        mx.save_safetensors(str(weights), tensors)

    write({k: v for k, v in good.items() if k != key})
    with pytest.raises(AdapterError, match=f"no '{key}'"):
        read_adapters(tmp_path)
    write({**good, key: good[key][:5]})
    with pytest.raises(AdapterError, match=r"shape \(64,\)"):
        read_adapters(tmp_path)
    write(good)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "fine_tune_type": "lora"}))
    with pytest.raises(AdapterError, match="not DoRA"):
        read_adapters(tmp_path)


def test_csm_apply_lora_use_dora_trains_m_and_merges(tmp_path):
    from mlx_fused_lora.adapters import load_adapters, save_adapters
    from mlx_fused_lora.csm import CSM, CSMConfig, apply_lora, merge_lora
    from test_csm_lora import frames, outputs

    mx.random.seed(3)
    model = CSM(CSMConfig.tiny())
    mx.eval(model.parameters())
    report = apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8.0, use_dora=True)
    layers = [m for _, m in model.named_modules() if isinstance(m, FusedDoRALinear)]
    assert len(layers) == len(report.modules) and model.lora_settings.use_dora
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert {k.rsplit(".", 1)[1] for k in trainable} == {"lora_a", "lora_b", "m"}
    for layer in layers:
        layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape)
        layer.m = layer.m * 1.1
    model.eval()
    tokens, mask = frames(model.config)
    before = outputs(model, tokens, mask)
    save_adapters(model, tmp_path, format="peft")
    mx.random.seed(3)
    other = CSM(CSMConfig.tiny())
    load_adapters(other, tmp_path)
    other.eval()
    assert sum(isinstance(m, FusedDoRALinear) for _, m in other.named_modules()) == len(layers)
    assert abs(outputs(other, tokens, mask) - before).max() < 1e-4
    merge_lora(model)
    assert not any(isinstance(m, FusedDoRALinear) for _, m in model.named_modules())
    assert abs(outputs(model, tokens, mask) - before).max() < 1e-4
