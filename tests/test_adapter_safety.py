"""Adapter files that must not load wrong or be overwritten (issue 18, items 2, 7 and 8):
format-aware writes, configs checked against their tensors, and a model that lacks a module."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_fused_lora.adapters import (
    AdapterError,
    convert_adapter,
    detect_adapter_format,
    load_adapters,
    read_adapters,
    save_adapters,
)
from mlx_fused_lora.adapters.cli import main as convert_main
from mlx_fused_lora.layers import linear_to_lora_layers


class Block(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.q_proj = nn.Linear(dims, dims, bias=False)
        self.v_proj = nn.Linear(dims, dims, bias=False)


class Toy(nn.Module):
    """A model of ``n`` blocks, mlx-lm style (``layers.{i}.q_proj``)."""

    def __init__(self, n, dims=8):
        super().__init__()
        self.layers = [Block(dims) for _ in range(n)]


def adapted(n=2, r=2, seed=0):
    mx.random.seed(seed)
    model = Toy(n)
    linear_to_lora_layers(model, n, {"rank": r, "scale": 2.0, "dropout": 0.0})
    for block in model.layers:
        for layer in (block.q_proj, block.v_proj):
            layer.lora_b = mx.random.normal(layer.lora_b.shape)
    mx.eval(model.parameters())
    return model


def edit_config(d, edit):
    config = json.loads((d / "adapter_config.json").read_text())
    edit(config)
    (d / "adapter_config.json").write_text(json.dumps(config))


def files(d):
    return {p.name: p.read_bytes() for p in d.iterdir()}


# -- item 2: no write overwrites an adapter of another format --


@pytest.mark.parametrize("first, second", [("peft", "mlx-lm"), ("mlx-lm", "peft"), ("mlx-lm", "csm-cli")])
def test_saving_over_an_adapter_of_another_format_is_refused(tmp_path, first, second):
    model = adapted()
    save_adapters(model, tmp_path, format=first)
    before = files(tmp_path)
    with pytest.raises(FileExistsError, match=rf"holds a {first} adapter.*write into another folder"):
        save_adapters(model, tmp_path, format=second)
    assert files(tmp_path) == before  # nothing written
    assert detect_adapter_format(tmp_path) == first and read_adapters(tmp_path)[0].modules
    save_adapters(model, tmp_path, format=first)  # the same format again: allowed


def test_the_check_reads_the_config_not_only_file_names(tmp_path):
    """A PEFT config alone (no weights yet) is still PEFT's: mlx-lm's writer would overwrite it;
    a config neither format recognises is not overwritten either."""
    save_adapters(adapted(), tmp_path / "peft", format="peft")
    (tmp_path / "peft" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileExistsError, match="holds a peft adapter"):
        save_adapters(adapted(), tmp_path / "peft", format="mlx-lm")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter_config.json").write_text('{"something": "else"}')
    with pytest.raises(FileExistsError, match="is not a mlx-lm adapter config"):
        save_adapters(adapted(), tmp_path / "other", format="mlx-lm")


def test_convert_adapter_into_its_own_folder_or_over_another_format_is_refused(tmp_path, capsys):
    save_adapters(adapted(), tmp_path / "a", format="mlx-lm")
    before = files(tmp_path / "a")
    for out in (tmp_path / "a", tmp_path / "a" / "."):
        assert convert_main([str(tmp_path / "a"), str(out), "--to", "peft"]) == 1
        err = capsys.readouterr().err.strip()
        assert "is the folder of the input adapter" in err and "\n" not in err
    with pytest.raises(ValueError, match="folder of the input adapter"):
        convert_adapter(tmp_path / "a" / "adapters.safetensors", tmp_path / "a", to="mlx-lm")
    save_adapters(adapted(), tmp_path / "b", format="peft")
    assert convert_main([str(tmp_path / "a"), str(tmp_path / "b"), "--to", "mlx-lm"]) == 1
    assert "holds a peft adapter" in capsys.readouterr().err
    assert files(tmp_path / "a") == before and detect_adapter_format(tmp_path / "b") == "peft"


# -- item 7: every config field checked against the tensors, naming the file --


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda c: c["lora_parameters"].update(scale=1e300),
            r"lora_parameters: field 'scale' must be a number finite in float32.*got float 1e\+300",
        ),
        (lambda c: c["lora_parameters"].update(rank="8"), r"field 'rank' must be an integer >= 1, got str '8'"),
        (lambda c: c["lora_parameters"].update(rank=0), r"field 'rank' must be an integer >= 1, got int 0"),
        (
            lambda c: c["lora_parameters"].update(rank=8),
            r"lora_parameters\.rank is 8 but the tensors of layers\.\d\.[qv]_proj in .*adapters\.safetensors have rank 2",
        ),
        (lambda c: c["lora_parameters"].update(alpha=-1e39), r"field 'alpha' must be a number finite in float32"),
        (lambda c: c.update(scale_pattern={"layers.0.q_proj": 1e39}), r"scale_pattern: field 'layers\.0\.q_proj'"),
        (lambda c: c.update(rank_pattern={"layers.0.q_proj": 3}), r"rank_pattern\['layers\.0\.q_proj'\] is 3 but"),
        (lambda c: c.update(scale_pattern={"layers.9.q_proj": 1.0}), r"scale_pattern names 'layers\.9\.q_proj'"),
        (lambda c: c["lora_parameters"].update(keys="q_proj"), r"'keys' must be a list of strings"),
        (lambda c: c.update(num_layers=-5), r"'num_layers' must be -1 \(all\) or more, got -5"),
        (lambda c: c.pop("lora_parameters"), r"field 'lora_parameters' is missing"),
    ],
)
def test_mlx_lm_config_is_checked_against_the_tensors(tmp_path, edit, match):
    save_adapters(adapted(), tmp_path, format="mlx-lm")
    edit_config(tmp_path, edit)
    with pytest.raises(AdapterError, match=r"adapter_config\.json.*" + match):
        read_adapters(tmp_path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.update(r="8"), r"field 'r' must be an integer >= 1, got str '8'"),
        (
            lambda c: c.update(r=8),
            r"r is 8 but the tensors of layers\.\d\.[qv]_proj in .*adapter_model\.safetensors have",
        ),
        (lambda c: c.update(rank_pattern={"v_proj": 5}), r"rank_pattern is 5 but the tensors of layers\.\d\.v_proj"),
        (lambda c: c.update(rank_pattern={"v_proj": 0}), r"rank_pattern: field 'v_proj' must be an integer >= 1"),
        (lambda c: c.update(lora_alpha=1e300), r"field 'lora_alpha' must be a number finite in float32"),
        (lambda c: c.update(alpha_pattern={"q_proj": 1e40}), r"alpha_pattern: field 'q_proj' must be a number"),
        (lambda c: c.update(target_modules=[1]), r"field 'target_modules' must be a list of strings or null, got list"),
    ],
)
def test_peft_config_is_checked_against_the_tensors(tmp_path, edit, match):
    save_adapters(adapted(), tmp_path, format="peft")
    edit_config(tmp_path, edit)
    with pytest.raises(AdapterError, match=r"adapter_config\.json.*" + match):
        read_adapters(tmp_path)


def test_heterogeneous_ranks_are_written_so_they_read_back(tmp_path):
    model = adapted(r=2)
    model.layers[1].v_proj = linear_to_lora_layers_one(model.layers[1].v_proj.linear, r=3)
    for fmt in ("mlx-lm", "peft"):
        save_adapters(model, tmp_path / fmt, format=fmt)
        ranks = {p: m.r for p, m in read_adapters(tmp_path / fmt)[0].modules.items()}
        assert ranks["layers.1.v_proj"] == 3 and ranks["layers.0.q_proj"] == 2
    assert json.loads((tmp_path / "mlx-lm" / "adapter_config.json").read_text())["rank_pattern"] == {
        "layers.1.v_proj": 3
    }


def linear_to_lora_layers_one(linear, r):
    from mlx_fused_lora.layers import FusedLoRALinear

    return FusedLoRALinear.from_base(linear, r=r, scale=2.0)


# -- item 8: an adapter for another model names the file and the module --


def test_an_adapter_for_a_deeper_model_is_an_adapter_error_naming_file_and_module(tmp_path):
    save_adapters(adapted(n=4), tmp_path, format="mlx-lm")
    target = adapted(n=2, seed=1)
    before = {k: np.array(v) for k, v in tree_items(target)}
    with pytest.raises(AdapterError) as e:
        load_adapters(target, tmp_path)
    message = str(e.value)
    assert str(tmp_path / "adapters.safetensors") in message
    assert "adapter module 'layers.2.q_proj' is not in the model" in message
    assert "4 of 8 modules" in message and "layers.0.q_proj" in message  # the nearest names it has
    assert {k: np.array(v) for k, v in tree_items(target)}.keys() == before.keys()
    for k, v in tree_items(target):
        np.testing.assert_array_equal(np.array(v), before[k])


def tree_items(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())
