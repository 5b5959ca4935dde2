"""PiSSA / OLoRA adapters converted to plain LoRA on the original W (issue 24), and the init
recorded in both adapter formats."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_fused_lora.adapters import (
    AdapterError,
    AdapterSet,
    ModuleAdapter,
    convert_to_lora,
    read_adapters,
    write_adapters,
)
from mlx_fused_lora.layers import FusedLoRALinear, init_lora


def linear(out_dims, in_dims, seed):
    lin = nn.Linear(in_dims, out_dims)
    lin.weight = mx.random.normal((out_dims, in_dims), key=mx.random.key(seed)) / np.sqrt(in_dims)
    return lin


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_a_trained_pissa_adapter_converts_to_lora_on_the_original_weight(tmp_path, method):
    lin, scale, r, path = linear(40, 64, seed=2), 2.0, 4, "model.layers.0.q_proj"
    init = init_lora(lin, r, scale, method)
    trained_a = init.lora_a + 0.1 * mx.random.normal(init.lora_a.shape, key=mx.random.key(1))
    trained_b = init.lora_b + 0.1 * mx.random.normal(init.lora_b.shape, key=mx.random.key(2))
    trained_layer = FusedLoRALinear.from_base(init.base, r=r, scale=scale)
    trained_layer.lora_a, trained_layer.lora_b = trained_a, trained_b
    trained = AdapterSet({path: ModuleAdapter(trained_a, trained_b, scale)}, init_lora_weights=method)
    initial = AdapterSet({path: ModuleAdapter(init.lora_a, init.lora_b, scale)}, init_lora_weights=method)
    converted = convert_to_lora(trained, initial)
    assert converted.init_lora_weights is True and converted.modules[path].r == 2 * r
    plain = FusedLoRALinear.from_base(lin, r=2 * r, scale=converted.modules[path].scale)
    plain.lora_a, plain.lora_b = converted.modules[path].lora_a, converted.modules[path].lora_b
    x = mx.random.normal((6, 64), key=mx.random.key(3))
    np.testing.assert_allclose(np.array(plain(x)), np.array(trained_layer(x)), atol=1e-5)
    # PEFT's files for it: r and lora_alpha doubled, the init recorded as plain LoRA
    write_adapters(converted, tmp_path / "peft", "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (2 * r, 2 * scale * r, True)


def test_conversion_refusals():
    m = ModuleAdapter(mx.zeros((8, 2)), mx.zeros((2, 4)), 1.0)
    for init in (True, "gaussian", "loftq"):
        with pytest.raises(AdapterError, match="only pissa, pissa_niter_N, olora are converted"):
            convert_to_lora(AdapterSet({"q": m}, init_lora_weights=init), AdapterSet({"q": m}))
    with pytest.raises(AdapterError, match="differ in modules"):
        convert_to_lora(AdapterSet({"q": m}, init_lora_weights="pissa"), AdapterSet({"v": m}))
    other = ModuleAdapter(mx.zeros((8, 2)), mx.zeros((2, 5)), 1.0)
    with pytest.raises(AdapterError, match="not the same module"):
        convert_to_lora(AdapterSet({"q": m}, init_lora_weights="olora"), AdapterSet({"q": other}))


@pytest.mark.parametrize("fmt", ["peft", "mlx-lm"])
@pytest.mark.parametrize("init", [True, "pissa_niter_4", "loftq"])
def test_the_init_is_recorded_in_both_formats(tmp_path, fmt, init):
    m = ModuleAdapter(mx.ones((8, 2)), mx.ones((2, 4)), 2.0)
    write_adapters(AdapterSet({"model.layers.0.q_proj": m}, init_lora_weights=init), tmp_path, fmt)
    config = json.loads(next(tmp_path.glob("*config.json")).read_text())
    assert config.get("init_lora_weights", True) == init
    if fmt == "mlx-lm" and init is True:
        assert "init_lora_weights" not in config  # an mlx-lm file of a default adapter is as before
    assert read_adapters(tmp_path)[0].init_lora_weights == init
