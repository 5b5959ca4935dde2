"""Adapters: mlx-lm / PEFT / CSM-CLI formats, conversion, CLI, CSM and plain mlx-lm models."""

import json

import mlx.core as mx
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
from mlx_fused_lora.csm import CSM, CSMConfig, apply_lora
from mlx_fused_lora.layers import FusedLoRALinear, lora_layers

FILES = {
    "mlx-lm": ("adapters.safetensors", "adapter_config.json"),
    "peft": ("adapter_model.safetensors", "adapter_config.json"),
    "csm-cli": ("fine_tuned_model.safetensors", "fine_tuned_model_metadata.json"),
}


def base_csm():
    mx.random.seed(21)  # same base weights every call
    m = CSM(CSMConfig.tiny())
    mx.eval(m.parameters())
    return m


def randomize_lora_b(model, seed=4):
    key = mx.random.key(seed)
    for _, layer in lora_layers(model):
        key, sub = mx.random.split(key)
        layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape, key=sub)
    mx.eval(model.parameters())


@pytest.fixture(scope="module")
def adapted():
    m = base_csm()
    apply_lora(
        m,
        ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "codebook0_head", "projection"],
        r=4,
        alpha=12.0,
        dropout=0.05,
    )
    randomize_lora_b(m)
    m.eval()
    return m


@pytest.fixture(scope="module")
def frames():
    cfg = CSMConfig.tiny()
    K = cfg.audio_num_codebooks
    rng = np.random.default_rng(3)
    tokens = mx.array(rng.integers(0, cfg.audio_vocab_size, (2, 5, K + 1)).astype(np.int32))
    mask = mx.array(np.concatenate([np.ones((2, 5, K)), np.zeros((2, 5, 1))], -1).astype(np.float32))
    return tokens, mask


def outputs(m, frames):
    tokens, mask = frames
    K = m.config.audio_num_codebooks
    m.eval()
    h = m(tokens, mask)
    return np.array(m.codebook_logits(h[:, :-1], tokens[:, 1:, :K]))


def tensors_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), k


@pytest.mark.parametrize("fmt", ["mlx-lm", "peft", "csm-cli"])
def test_save_load_each_format_reproduces_outputs(adapted, frames, fmt, tmp_path):
    written = save_adapters(adapted, tmp_path, format=fmt)
    weights_name, config_name = FILES[fmt]
    assert written == tmp_path / weights_name and (tmp_path / config_name).exists()
    assert detect_adapter_format(tmp_path) == fmt
    loaded = load_adapters(base_csm(), tmp_path)
    assert isinstance(loaded.backbone.layers[1].self_attn.k_proj, FusedLoRALinear)
    assert isinstance(loaded.codebook0_head, FusedLoRALinear)
    np.testing.assert_array_equal(outputs(loaded, frames), outputs(adapted, frames))
    ref = dict(lora_layers(adapted))
    for name, layer in lora_layers(loaded):
        assert mx.array_equal(layer.lora_a, ref[name].lora_a).item(), name
        assert layer.scale == ref[name].scale == 3.0


def test_format_contents(adapted, tmp_path):
    save_adapters(adapted, tmp_path / "mlx", format="mlx-lm")
    save_adapters(adapted, tmp_path / "peft", format="peft")
    mlx_cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert mlx_cfg["fine_tune_type"] == "lora"
    assert mlx_cfg["lora_parameters"]["rank"] == 4 and mlx_cfg["lora_parameters"]["scale"] == 3.0
    assert mlx_cfg["lora_parameters"]["dropout"] == pytest.approx(0.05)
    assert "self_attn.q_proj" in mlx_cfg["lora_parameters"]["keys"]
    mlx_w = mx.load(str(tmp_path / "mlx" / "adapters.safetensors"))
    assert mlx_w["backbone.layers.0.self_attn.q_proj.lora_a"].shape == (64, 4)
    assert mlx_w["decoder.layers.0.self_attn.q_proj.lora_b"].shape == (4, 32)
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 4 and peft_cfg["lora_alpha"] == 12.0
    assert peft_cfg["use_rslora"] is False and peft_cfg["rank_pattern"] == {}
    assert set(peft_cfg["target_modules"]) >= {"q_proj", "codebook0_head", "projection"}
    peft_w = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    A = peft_w["base_model.model.backbone.layers.0.self_attn.q_proj.lora_A.weight"]
    B = peft_w["base_model.model.backbone.layers.0.self_attn.q_proj.lora_B.weight"]
    assert A.shape == (4, 64) and B.shape == (64, 4)
    assert mx.array_equal(A, mlx_w["backbone.layers.0.self_attn.q_proj.lora_a"].T).item()


def test_peft_mlx_lm_round_trip_is_exact(adapted, frames, tmp_path):
    save_adapters(adapted, tmp_path / "peft", format="peft")
    convert_adapter(tmp_path / "peft", tmp_path / "mlx", to="mlx-lm")
    convert_adapter(tmp_path / "mlx", tmp_path / "peft2", to="peft")
    convert_adapter(tmp_path / "peft2", tmp_path / "mlx2", to="mlx-lm")
    tensors_equal(
        mx.load(str(tmp_path / "peft" / "adapter_model.safetensors")),
        mx.load(str(tmp_path / "peft2" / "adapter_model.safetensors")),
    )
    tensors_equal(
        mx.load(str(tmp_path / "mlx" / "adapters.safetensors")),
        mx.load(str(tmp_path / "mlx2" / "adapters.safetensors")),
    )
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "peft2" / "adapter_config.json").read_text()
    )
    expected = outputs(adapted, frames)
    for d in ("peft", "mlx", "peft2", "mlx2"):
        np.testing.assert_array_equal(outputs(load_adapters(base_csm(), tmp_path / d), frames), expected)


def test_heterogeneous_ranks_and_alphas_survive_conversion(tmp_path):
    m = base_csm()
    apply_lora(m, ["q_proj"], r=4, alpha=8.0)
    apply_lora(m, ["v_proj"], r=2, alpha=3.0, use_rslora=True)
    save_adapters(m, tmp_path / "peft", format="peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True  # the model's last settings
    convert_adapter(tmp_path / "peft", tmp_path / "mlx", to="mlx-lm")
    convert_adapter(tmp_path / "mlx", tmp_path / "peft2", to="peft")
    scales = {p: a.scale for p, a in read_adapters(tmp_path / "peft2")[0].modules.items()}
    expected = {name: layer.scale for name, layer in lora_layers(m)}
    assert scales == expected
    assert {2, 4} == {a.r for a in read_adapters(tmp_path / "mlx")[0].modules.values()}
    assert json.loads((tmp_path / "peft2" / "adapter_config.json").read_text()) == cfg


def test_cli(adapted, tmp_path, capsys):
    save_adapters(adapted, tmp_path / "in", format="mlx-lm")
    assert convert_main(["convert-adapter", str(tmp_path / "in"), str(tmp_path / "out"), "--to", "peft"]) == 0
    assert detect_adapter_format(tmp_path / "out") == "peft"
    assert "mlx-lm" in capsys.readouterr().out
    assert convert_main([str(tmp_path / "nowhere"), str(tmp_path / "o2"), "--to", "peft"]) == 1
    assert "no adapter" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "in"), str(tmp_path / "o3"), "--to", "onnx"]) == 2


def hf_permute_rows(w, n_heads):
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, -1).transpose(0, 2, 1, 3).reshape(out, -1)


def test_peft_adapter_with_hf_csm_names(adapted, frames, tmp_path):
    """An adapter trained with PEFT on Transformers' CsmForConditionalGeneration: HF module
    names, and q/k output rows in rotate-half order."""
    save_adapters(adapted, tmp_path / "ours", format="peft")
    cfg = adapted.config
    hf = {}
    for key, value in mx.load(str(tmp_path / "ours" / "adapter_model.safetensors")).items():
        k = key.replace("base_model.model.", "")
        v = np.array(value)
        if ".self_attn.q_proj.lora_B" in k or ".self_attn.k_proj.lora_B" in k:
            fl = cfg.backbone if k.startswith("backbone") else cfg.decoder
            heads = fl.num_heads if ".q_proj." in k else fl.num_kv_heads
            v = hf_permute_rows(v, heads)
        k = (
            k.replace("backbone.layers.", "backbone_model.layers.")
            .replace("decoder.layers.", "depth_decoder.model.layers.")
            .replace("codebook0_head.", "lm_head.")
            .replace("projection.", "depth_decoder.model.inputs_embeds_projector.")
        )
        hf["base_model.model." + k] = mx.array(v)
    (tmp_path / "hf").mkdir()
    mx.save_safetensors(str(tmp_path / "hf" / "adapter_model.safetensors"), hf)
    (tmp_path / "hf" / "adapter_config.json").write_text((tmp_path / "ours" / "adapter_config.json").read_text())
    loaded = load_adapters(base_csm(), tmp_path / "hf")
    np.testing.assert_array_equal(outputs(loaded, frames), outputs(adapted, frames))


def test_bad_adapters_name_the_module(adapted, tmp_path):
    save_adapters(adapted, tmp_path / "a", format="mlx-lm")
    w = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    w["backbone.layers.7.self_attn.q_proj.lora_a"] = mx.zeros((64, 4))
    w["backbone.layers.7.self_attn.q_proj.lora_b"] = mx.zeros((4, 64))
    mx.save_safetensors(str(tmp_path / "a" / "adapters.safetensors"), w)
    with pytest.raises(
        AdapterError, match=r"adapters\.safetensors: adapter module 'backbone\.layers\.7\.self_attn\.q_proj'"
    ):
        load_adapters(base_csm(), tmp_path / "a")

    save_adapters(adapted, tmp_path / "b", format="mlx-lm")
    w = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    w["decoder.layers.0.mlp.up_proj.lora_b"] = mx.zeros((4, 63))
    mx.save_safetensors(str(tmp_path / "b" / "adapters.safetensors"), w)
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.mlp\.up_proj.*\(4, 63\).*\(r, 64\)"):
        load_adapters(base_csm(), tmp_path / "b")

    save_adapters(adapted, tmp_path / "c", format="peft")
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    cfg["r"] = 8
    (tmp_path / "c" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"adapter_config\.json: r is 8 but the tensors of .* have rank 4"):
        read_adapters(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no adapter"):
        detect_adapter_format(tmp_path)


def test_any_mlx_lm_model(tmp_path):
    """Adapters of a plain mlx-lm Llama: mlx-lm's own LoRA layers saved by us, loaded into
    FusedLoRALinear; and our mlx-lm-format files read by mlx-lm's loader."""
    llama = pytest.importorskip("mlx_lm.models.llama")
    tuner = pytest.importorskip("mlx_lm.tuner.utils")
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=40,
    )

    def base():
        mx.random.seed(9)
        m = llama.Model(args)
        mx.eval(m.parameters())
        return m

    model = base()
    model.freeze()
    tuner.linear_to_lora_layers(
        model, 2, {"rank": 4, "scale": 2.5, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}
    )
    randomize_lora_b(model)
    tokens = mx.array([[1, 5, 7, 2, 9]])
    expected = np.array(model(tokens))
    save_adapters(model, tmp_path / "peft", format="peft")
    save_adapters(model, tmp_path / "mlx", format="mlx-lm")
    w = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in w
    ours = load_adapters(base(), tmp_path / "peft")
    assert isinstance(ours.model.layers[0].self_attn.q_proj, FusedLoRALinear)
    np.testing.assert_allclose(np.array(ours(tokens)), expected, rtol=1e-5, atol=1e-5)
    theirs = tuner.load_adapters(base(), str(tmp_path / "mlx"))
    np.testing.assert_allclose(np.array(theirs(tokens)), expected, rtol=1e-5, atol=1e-5)


def test_adapter_with_torchtune_csm_names(adapted, frames, tmp_path):
    save_adapters(adapted, tmp_path / "ours", format="mlx-lm")
    renamed = {
        k.replace(".self_attn.o_proj.", ".attn.output_proj.")
        .replace(".self_attn.", ".attn.")
        .replace(".mlp.up_proj.", ".mlp.w3."): v
        for k, v in mx.load(str(tmp_path / "ours" / "adapters.safetensors")).items()
    }
    assert "backbone.layers.0.attn.output_proj.lora_a" in renamed
    (tmp_path / "tt").mkdir()
    mx.save_safetensors(str(tmp_path / "tt" / "adapters.safetensors"), renamed)
    (tmp_path / "tt" / "adapter_config.json").write_text((tmp_path / "ours" / "adapter_config.json").read_text())
    loaded = load_adapters(base_csm(), tmp_path / "tt")
    np.testing.assert_array_equal(outputs(loaded, frames), outputs(adapted, frames))
