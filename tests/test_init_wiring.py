"""The inits through every entry point (issue 24, part 2): ``from_base``, ``linear_to_lora_layers``,
``apply_lora``, ``add_adapter``, ``finetune``; what saving, loading and fusing do for an init
that split W (PEFT's rules), and the warning that says the base changed."""

import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_fused_lora.adapters import add_adapter, load_adapters, read_adapters, save_adapters
from mlx_fused_lora.csm import CSM, CSMConfig, apply_lora, load_csm
from mlx_fused_lora.layers import FusedDoRALinear, FusedLoRALinear, lora_layers
from mlx_fused_lora.layers.tree import fuse_lora_layers
from mlx_fused_lora.train.csm.cli import main as finetune
from train_helpers import finetune_args, write_tiny_run

TOKENS, MASK = mx.zeros((2, 5, 9), dtype=mx.int32) + 3, mx.ones((2, 5, 9))


def csm(seed=0):
    mx.random.seed(seed)
    model = CSM(CSMConfig.tiny())
    mx.eval(model.parameters())
    return model


def twin(model):
    other = CSM(CSMConfig.tiny())
    other.update(model.parameters())
    return other


def outputs(model):
    model.eval()
    return np.array(model(TOKENS, MASK))


def perturb(model, seed=1):
    """Stand-in for training: every adapter tensor moved (what the conversions must carry)."""
    key = mx.random.key(seed)
    for _, layer in lora_layers(model):
        key, ka, kb = mx.random.split(key, 3)
        layer.lora_a = layer.lora_a + 0.1 * mx.random.normal(layer.lora_a.shape, key=ka)
        layer.lora_b = layer.lora_b + 0.1 * mx.random.normal(layer.lora_b.shape, key=kb)


def base_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "init_lora_weights=" in str(w.message)]


@pytest.mark.parametrize("cls", [FusedLoRALinear, FusedDoRALinear])
@pytest.mark.parametrize("init", ["gaussian", "pissa", "pissa_niter_2", "olora"])
def test_from_base_starts_at_the_base_output_and_keeps_the_base_frozen(cls, init):
    base = nn.Linear(64, 48)
    base.freeze()
    weight = np.array(base.weight)
    layer = cls.from_base(base, r=4, scale=2.0, init_lora_weights=init)
    x = mx.random.normal((5, 64), key=mx.random.key(0))
    np.testing.assert_allclose(layer(x), base(x), atol=2e-5)
    assert layer.lora_init.init_lora_weights == init and np.array_equal(np.array(base.weight), weight)
    assert (layer.linear is not base) == (init != "gaussian")
    trainable = {k for k, _ in tree_flatten(layer.trainable_parameters())}
    assert not any(k.startswith("linear.") for k in trainable), trainable  # the new base is frozen as the old


def test_from_base_loftq_quantizes_the_base_and_starts_nearer_w_than_plain_quantization():
    base = nn.Linear(128, 32)
    x = mx.random.normal((8, 128), key=mx.random.key(1))
    for cls in (FusedLoRALinear, FusedDoRALinear):
        layer = cls.from_base(base, r=8, scale=1.0, init_lora_weights="loftq")
        plain = cls.from_base(nn.QuantizedLinear.from_linear(base, 64, 4), r=8, scale=1.0)
        assert isinstance(layer.linear, nn.QuantizedLinear) and layer.linear.bits == 4
        assert mx.abs(layer(x) - base(x)).mean().item() < mx.abs(plain(x) - base(x)).mean().item()


def test_linear_to_lora_layers_takes_inits_and_patterns_and_warns_once():
    pytest.importorskip("mlx_lm")
    from mlx_fused_lora.layers import linear_to_lora_layers
    from test_mlx_lm_integration import make_llama

    model = make_llama()
    x = mx.array([[1, 5, 7, 9]])
    before = model(x)
    config = {"rank": 4, "scale": 2.0, "dropout": 0.0, "init_lora_weights": "olora"}
    config.update(rank_pattern={"v_proj": 2}, alpha_pattern={"model.layers.2.self_attn.q_proj": 32.0})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        linear_to_lora_layers(model, 2, config)
    assert base_warnings(record) == [base_warnings(record)[0]] and "on 14 modules" in base_warnings(record)[0]
    np.testing.assert_allclose(model(x), before, atol=1e-4)
    layers = dict(lora_layers(model))
    assert set(layers) == {p for p in layers if p.startswith(("model.layers.1.", "model.layers.2."))}
    v, q, k = (layers[f"model.layers.2.self_attn.{n}_proj"] for n in "vqk")
    assert (v.lora_a.shape[1], v.scale) == (2, 4.0)  # PEFT: the alpha (2.0 * 4) kept, the rank from the pattern
    assert (q.lora_a.shape[1], q.scale) == (4, 8.0) and (k.lora_a.shape[1], k.scale) == (4, 2.0)
    with pytest.raises(ValueError, match="rank_pattern key 'v_prj' names none of the adapted modules"):
        linear_to_lora_layers(make_llama(), 2, {**config, "rank_pattern": {"v_prj": 2}})
    with pytest.raises(ValueError, match="init_lora_weights.*'pisa'"):
        linear_to_lora_layers(make_llama(), 2, {**config, "init_lora_weights": "pisa"})


def test_apply_lora_takes_inits_and_patterns():
    model = csm()
    reference = outputs(model)
    with pytest.warns(UserWarning, match="init_lora_weights='pissa' on 12 modules") as record:
        apply_lora(
            model,
            ["q_proj", "v_proj", "up_proj"],
            r=8,
            alpha=16.0,
            init_lora_weights="pissa",
            rank_pattern={"up_proj": 4},
            alpha_pattern={"decoder.layers.0.self_attn.q_proj": 32.0},
        )
    assert len(base_warnings(record)) == 1
    np.testing.assert_allclose(outputs(model), reference, atol=2e-4)
    q, up = model.decoder.layers[0].self_attn.q_proj, model.backbone.layers[1].mlp.up_proj
    assert (q.lora_a.shape[1], q.scale, up.lora_a.shape[1], up.scale) == (8, 4.0, 4, 4.0)
    assert model.lora_settings.init_lora_weights == "pissa" and model.lora_settings.rank_pattern == {"up_proj": 4}


def test_add_adapter_takes_an_init_first_and_refuses_one_that_splits_a_shared_base():
    model = csm()
    reference = outputs(model)
    add_adapter(model, "voice", {"rank": 4, "alpha": 8.0, "keys": ["q_proj"], "init_lora_weights": "gaussian"})
    np.testing.assert_allclose(outputs(model), reference, atol=1e-5)
    with pytest.raises(ValueError, match="replaces the base weight.*\\['voice'\\] run on too"):
        add_adapter(model, "other", {"rank": 4, "keys": ["v_proj"], "init_lora_weights": "olora"})
    first = csm()
    with pytest.warns(UserWarning, match="init_lora_weights='olora' on 4 modules"):
        add_adapter(first, "voice", {"rank": 4, "keys": ["v_proj"], "use_dora": True, "init_lora_weights": "olora"})
    np.testing.assert_allclose(outputs(first), reference, atol=2e-4)
    assert first.backbone.layers[0].self_attn.v_proj.adapter_name == "voice"


@pytest.mark.parametrize("init, fmt", [("pissa", "peft"), ("olora", "mlx-lm")])
def test_a_split_adapter_saved_converted_or_not_reloads_on_the_original_base_as_the_trained_model(tmp_path, init, fmt):
    original = csm()
    model = twin(original)
    with pytest.warns(UserWarning):
        apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8.0, init_lora_weights=init)
    perturb(model)
    trained = outputs(model)
    save_adapters(model, tmp_path / "as-trained", fmt)
    save_adapters(model, tmp_path / "converted", fmt, convert_to_lora=True)
    converted = read_adapters(tmp_path / "converted")[0]
    assert read_adapters(tmp_path / "as-trained")[0].init_lora_weights == init
    assert converted.init_lora_weights is True and {m.r for m in converted.modules.values()} == {8}

    plain = twin(original)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain LoRA file changes no base: nothing to say
        load_adapters(plain, tmp_path / "converted")
    np.testing.assert_allclose(outputs(plain), trained, atol=2e-4)
    split = twin(original)
    with pytest.warns(UserWarning, match=f"records init_lora_weights='{init}': split the base weight of 8 modules"):
        load_adapters(split, tmp_path / "as-trained")  # PEFT's rule: the base split again
    np.testing.assert_allclose(outputs(split), trained, atol=2e-4)
    save_adapters(split, tmp_path / "again", fmt, convert_to_lora=True)  # the reloaded layers know their init too
    for path, m in read_adapters(tmp_path / "again")[0].modules.items():
        np.testing.assert_allclose(m.lora_a, converted.modules[path].lora_a, atol=1e-5)

    fuse_lora_layers(model)  # into the residual base: the trained model's weights
    np.testing.assert_allclose(outputs(model), trained, atol=2e-4)


def test_loading_refusals_and_warnings_for_inits_that_split_w(tmp_path):
    model = csm()
    with pytest.warns(UserWarning):
        apply_lora(model, ["q_proj"], r=4, alpha=8.0, init_lora_weights="pissa")
    save_adapters(model, tmp_path / "pissa", "peft")
    other = csm()
    add_adapter(other, "default", {"rank": 2, "keys": ["v_proj"]})
    with pytest.raises(ValueError, match="splits the base weights again.*\\['default'\\] run on too"):
        load_adapters(other, tmp_path / "pissa", name="voice")
    with pytest.raises(ValueError, match="init_lora_weights is True; only pissa"):
        save_adapters(other, tmp_path / "x", convert_to_lora=True)  # nothing to undo: it says why
    q = csm()
    with pytest.warns(UserWarning):
        apply_lora(q, ["q_proj"], {"backbone": None}, r=4, alpha=4.0, init_lora_weights="loftq")  # in: 64
    save_adapters(q, tmp_path / "loftq", "peft")
    with pytest.warns(
        UserWarning, match="'loftq': it was fitted to the quantized base.*2 of its modules land on a dense"
    ):
        load_adapters(csm(), tmp_path / "loftq")


def test_finetune_with_pissa_writes_a_converted_adapter_and_a_merged_model_that_agree(tmp_path):
    root, model_dir, audio = write_tiny_run(tmp_path, 4)
    out = tmp_path / "out"
    args = finetune_args(model_dir, audio, out, "--max-steps", "3", "--save-mode", "both", "--val-every", "0")
    with pytest.warns(UserWarning, match="init_lora_weights='pissa' on 8 modules"):
        assert finetune([*args, "--init-lora-weights", "pissa", "--convert-to-lora"]) == 0
    adapter = read_adapters(out)[0]
    assert adapter.init_lora_weights is True and {m.r for m in adapter.modules.values()} == {16}
    merged = load_csm(out)  # the adapters folded into the residual base
    original = load_csm(model_dir)
    load_adapters(original, out)
    np.testing.assert_allclose(outputs(original), outputs(merged), atol=2e-4)


def test_finetune_refuses_an_unknown_init_naming_the_flag(tmp_path, caplog):
    root, model_dir, audio = write_tiny_run(tmp_path, 2)
    rc = finetune(finetune_args(model_dir, audio, tmp_path / "out", "--max-steps", "1", "--init-lora-weights", "pisa"))
    assert rc == 1 and "--init-lora-weights: `init_lora_weights` must be True or one of" in caplog.text
