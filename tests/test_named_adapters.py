"""Many adapters on one model: stacked in one op call, switched off for free, hot-swapped, saved by name."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_fused_lora.adapters import (
    AdapterError,
    active_adapters,
    add_adapter,
    add_weighted_adapter,
    disable_adapters,
    fuse_adapters,
    hotswap_adapter,
    list_adapters,
    load_adapters,
    read_adapters,
    save_adapters,
    set_adapter,
)
from mlx_fused_lora.layers import FusedDoRALinear, FusedLoRALinear, lora_layers, named, tree
from mlx_fused_lora.layers import fused_lora_linear as layer_module


class Block(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.q_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims, bias=False)

    def __call__(self, x):
        return x + self.v_proj(mx.tanh(self.q_proj(x)))


class Stack(nn.Module):
    """A tiny model with mlx-lm's layout: ``layers.{i}.q_proj`` / ``v_proj``, and a head."""

    def __init__(self, dims=24, depth=2):
        super().__init__()
        self.layers = [Block(dims) for _ in range(depth)]
        self.head = nn.Linear(dims, 7)

    def __call__(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def stack(seed=0):
    mx.random.seed(seed)
    model = Stack()
    mx.eval(model.parameters())
    return model


def randomize(model, seed=1):
    """Non-zero lora_b everywhere (the padding rows past an adapter's rank stay zero)."""
    key = mx.random.key(seed)
    for _, layer in lora_layers(model):
        for h in named.holders(layer).values():
            key, sub = mx.random.split(key)
            live = (mx.abs(h.lora_a).sum(0) > 0)[:, None]  # zero-padded columns of A
            h.lora_b = 0.3 * mx.random.normal(h.lora_b.shape, key=sub) * live
    mx.eval(model.parameters())


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of the fused op (and its quantized twin) made by the layers."""
    calls = []
    for name in ("fused_lora_linear", "fused_qlora_linear"):
        op = getattr(layer_module, name)

        def counted(*args, _op=op, **kwargs):
            calls.append(args[0].shape)
            return _op(*args, **kwargs)

        monkeypatch.setattr(layer_module, name, counted)
    return calls


def two_adapters(seed=0):
    model = stack(seed)
    add_adapter(model, "default", {"rank": 4, "scale": 2.0, "dropout": 0.1})
    add_adapter(model, "voice", {"rank": 2, "alpha": 3.0, "dropout": 0.1, "keys": ["q_proj"], "max_rank": 3})
    randomize(model)
    return model


def test_stacked_adapters_are_the_sum_of_their_deltas_in_one_op_call(op_calls):
    model = two_adapters()
    layer = model.layers[1].q_proj
    assert isinstance(layer, FusedLoRALinear) and "voice" in layer.adapters
    x = mx.random.normal((5, 24), key=mx.random.key(3))
    model.eval()
    with disable_adapters(model):
        base = layer(x)
    set_adapter(model, "default")
    d1 = layer(x) - base
    set_adapter(model, "voice")
    d2 = layer(x) - base
    set_adapter(model, ["default", "voice"], [0.5, 2.0])
    op_calls.clear()
    both = layer(x)
    assert len(op_calls) == 1, "two adapters must run as one op call"
    np.testing.assert_allclose(both - base, 0.5 * d1 + 2.0 * d2, rtol=1e-5, atol=1e-5)

    # gradients: the plain-MLX formulation of the sum, adapter by adapter
    h = named.holders(layer)
    a1, b1, a2, b2 = h["default"].lora_a, h["default"].lora_b, h["voice"].lora_a, h["voice"].lora_b
    s1, s2 = h["default"].scale, h["voice"].scale
    w, bias = layer.linear.weight, layer.linear.bias

    def reference(a1, b1, a2, b2):
        y = x @ w.T + bias + 0.5 * s1 * (x @ a1) @ b1 + 2.0 * s2 * (x @ a2) @ b2
        return (y**2).sum()

    expected = mx.grad(reference, argnums=(0, 1, 2, 3))(a1, b1, a2, b2)
    grads = nn.value_and_grad(layer, lambda x: (layer(x) ** 2).sum())(x)[1]
    got = dict(tree_flatten(grads))
    assert set(got) == {"lora_a", "lora_b", "adapters.voice.lora_a", "adapters.voice.lora_b"}
    names = ["lora_a", "lora_b", "adapters.voice.lora_a", "adapters.voice.lora_b"]
    for k, e in zip(names, expected, strict=True):
        np.testing.assert_allclose(got[k], e, rtol=1e-4, atol=1e-4, err_msg=k)


def test_only_the_trained_adapters_get_gradients(op_calls):
    model = two_adapters()
    set_adapter(model, ["default", "voice"], trainable=["voice"])
    keys = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert keys == {f"layers.{i}.q_proj.adapters.voice.{t}" for i in (0, 1) for t in ("lora_a", "lora_b")}
    x = mx.random.normal((3, 24))
    grads = dict(tree_flatten(nn.value_and_grad(model, lambda m, x: m(x).sum())(model, x)[1]))
    assert set(grads) == keys and all(mx.abs(g).sum().item() > 0 for g in grads.values())
    # the trained adapter's dropout is the stacked call's (one rate, one mask)
    assert model.layers[0].q_proj.routing.dropout == 0.1


def test_a_module_without_the_adapter_does_not_run_it(op_calls):
    model = stack()
    add_adapter(model, "default", {"rank": 4, "scale": 2.0})
    add_adapter(model, "late", {"rank": 2, "scale": 1.0, "keys": ["v_proj"], "num_layers": 1})
    assert [p for p, layer in lora_layers(model) if "late" in named.holders(layer)] == ["layers.1.v_proj"]
    assert list_adapters(model) == ["default", "late"]
    set_adapter(model, "late")
    op_calls.clear()
    model(mx.ones((2, 24)))
    assert len(op_calls) == 1  # only layers.1.v_proj runs an adapter


def test_disabled_adapters_are_exactly_the_base_and_call_no_op(op_calls):
    base_model = stack()
    x = mx.random.normal((4, 24), key=mx.random.key(5))
    expected = base_model(x)
    model = two_adapters()
    set_adapter(model, ["default", "voice"])
    assert not mx.array_equal(model(x), expected).item()
    op_calls.clear()
    with disable_adapters(model):
        assert mx.array_equal(model(x), expected).item()
    assert op_calls == []
    set_adapter(model, [])  # none active: the same
    assert mx.array_equal(model(x), expected).item() and op_calls == []
    assert active_adapters(model) == []


def test_policy_and_reference_in_one_compiled_function(op_calls):
    """DPO's reference: the same model with adapters off, inside the traced loss."""
    base_model = stack()
    model = two_adapters()
    set_adapter(model, ["default", "voice"])
    model.eval()
    traces = []

    def both(x):
        traces.append(1)
        policy = model(x)
        with disable_adapters(model):
            reference = model(x)
        return policy, reference

    compiled = mx.compile(both, inputs=model.state)
    x = mx.random.normal((4, 24), key=mx.random.key(6))
    op_calls.clear()
    policy, reference = compiled(x)
    assert len(op_calls) == 4  # the traced policy pass, one per adapted projection; none for the reference
    np.testing.assert_allclose(reference, base_model(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(policy, model(x), rtol=1e-6, atol=1e-6)
    compiled(x + 1)
    assert len(traces) == 1 and model.layers[0].q_proj.routing.disabled is False


def adapter_file(tmp_path, model, name, seed, fmt="mlx-lm"):
    randomize(model, seed)
    return save_adapters(model, tmp_path / f"{name}-{seed}", fmt, name=name).parent


def test_hot_swap_changes_outputs_without_a_new_trace(tmp_path):
    model = stack()
    add_adapter(model, "voice", {"rank": 4, "scale": 2.0, "keys": ["q_proj", "v_proj"], "max_rank": 6})
    randomize(model, 1)
    donor = stack()  # another adapter of rank 2, another scale, on fewer modules
    add_adapter(donor, "voice", {"rank": 2, "scale": 0.5, "keys": ["q_proj"]})
    swap_in = adapter_file(tmp_path, donor, "voice", 7)
    model.eval()
    traces = []

    def forward(x):
        traces.append(1)
        return model(x)

    compiled = mx.compile(forward, inputs=model.state)
    x = mx.random.normal((3, 24), key=mx.random.key(2))
    before = compiled(x)
    base = {k: v for k, v in tree_flatten(model.parameters()) if "lora" not in k}
    hotswap_adapter(model, swap_in, "voice")
    after = compiled(x)
    assert len(traces) == 1, "the swap must not retrace the compiled function"
    assert not np.allclose(after, before)
    np.testing.assert_allclose(after, donor(x), rtol=1e-5, atol=1e-5)
    for k, v in tree_flatten(model.parameters()):
        if "lora" not in k:
            assert v is base[k], f"{k} was touched"
    # what cannot be done in place says why
    wide = stack()
    add_adapter(wide, "voice", {"rank": 8, "scale": 1.0, "keys": ["q_proj"]})
    with pytest.raises(ValueError, match="rank 8 > 6.*max_rank >= 8"):
        hotswap_adapter(model, adapter_file(tmp_path, wide, "voice", 3), "voice")
    more = stack()
    add_adapter(more, "voice", {"rank": 2, "scale": 1.0, "keys": ["head"]})
    with pytest.raises(ValueError, match="'head' has no layer of adapter 'voice'"):
        hotswap_adapter(model, adapter_file(tmp_path, more, "voice", 3), "voice")
    np.testing.assert_allclose(compiled(x), after)  # refused swaps changed nothing


@pytest.mark.parametrize("fmt", ["mlx-lm", "peft", "csm-cli"])
def test_save_and_load_by_name_round_trip(fmt, tmp_path):
    model = two_adapters()
    model.eval()
    x = mx.random.normal((3, 24), key=mx.random.key(4))
    outputs = {}
    for choice in (["default"], ["voice"], ["default", "voice"]):
        set_adapter(model, choice)
        outputs[tuple(choice)] = model(x)
    save_adapters(model, tmp_path / "all", fmt)  # PEFT's layout: default at the root, voice/ beside it
    assert (tmp_path / "all" / "voice").is_dir()
    assert read_adapters(tmp_path / "all")[1] == read_adapters(tmp_path / "all" / "voice")[1] == fmt
    fresh = stack()
    load_adapters(fresh, tmp_path / "all")
    load_adapters(fresh, tmp_path / "all", name="voice")
    assert list_adapters(fresh) == ["default", "voice"] and active_adapters(fresh) == [("default", 1.0)]
    fresh.eval()
    for choice, expected in outputs.items():
        set_adapter(fresh, list(choice))
        assert mx.array_equal(fresh(x), expected).item(), choice
    # one adapter alone, in the folder itself
    save_adapters(model, tmp_path / "voice-only", fmt, name="voice")
    other = stack()
    load_adapters(other, tmp_path / "voice-only", name="voice")
    assert list_adapters(other) == ["voice"]
    other.eval()
    assert mx.array_equal(other(x), outputs[("voice",)]).item()


def peft_file(path, tensors):
    path.mkdir()
    mx.save_safetensors(str(path / "adapter_model.safetensors"), tensors)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    return path


def test_peft_file_with_named_adapters_loads_the_one_asked_for(tmp_path):
    """Issue 18, item 3: ``lora_A.weight`` beside ``lora_A.other.weight`` must not mix."""
    model = stack()
    p = "base_model.model.layers.0.q_proj"
    mine = {f"{p}.lora_A.weight": mx.ones((2, 24)), f"{p}.lora_B.weight": mx.ones((24, 2))}
    other = {f"{p}.lora_A.other.weight": 2 * mx.ones((2, 24)), f"{p}.lora_B.other.weight": 3 * mx.ones((24, 2))}
    path = peft_file(tmp_path / "both", {**mine, **other})
    with pytest.warns(UserWarning, match=r"holds adapters \['default', 'other'\]: loaded 'default'"):
        adapters, _ = read_adapters(path)
    assert mx.array_equal(adapters.modules["layers.0.q_proj"].lora_a, mx.ones((24, 2))).item()
    with pytest.warns(UserWarning, match="loaded 'other'"):
        load_adapters(model, path, name="other")
    layer = model.layers[0].q_proj
    assert named.resident_name(layer) == "other" and mx.array_equal(layer.lora_b, 3 * mx.ones((2, 24))).item()
    named_only = peft_file(tmp_path / "named", {**other, **{k.replace("other", "x"): v for k, v in other.items()}})
    with pytest.raises(AdapterError, match=r"holds adapters \['other', 'x'\] and none named 'default'"):
        read_adapters(named_only)
    clash = peft_file(tmp_path / "clash", {**mine, f"{p}.lora_A.default.weight": mx.ones((2, 24))})
    with pytest.raises(AdapterError, match="repeats"):
        read_adapters(clash)


def test_refusals_name_the_cause():
    model = two_adapters()
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        set_adapter(model, "nope")
    with pytest.raises(ValueError, match="already has an adapter named 'voice'"):
        add_adapter(model, "voice", {"rank": 2})
    with pytest.raises(ValueError, match="unknown keys \\['rnak'\\]"):
        add_adapter(model, "x", {"rnak": 2})
    with pytest.raises(ValueError, match="'dropout' must be a number in \\[0, 1\\)"):
        add_adapter(model, "x", {"dropout": 1.5})
    add_adapter(model, "slow", {"rank": 2, "scale": 1.0, "dropout": 0.3})
    with pytest.raises(ValueError, match="different dropout rates"):
        set_adapter(model, ["default", "slow"])
    set_adapter(model, ["default", "slow"], trainable=["slow"])  # one trained rate: fine
    add_adapter(model, "dora", {"rank": 2, "scale": 1.0, "use_dora": True, "keys": ["v_proj"]})
    with pytest.raises(ValueError, match="DoRA adapter 'dora' cannot run stacked"):
        set_adapter(model, ["default", "dora"])
    assert active_adapters(model) == [("default", 1.0), ("slow", 1.0)]  # refused: nothing changed


def test_named_dora_adapter_runs_dora(op_calls):
    model = stack()
    add_adapter(model, "default", {"rank": 4, "scale": 2.0})
    add_adapter(model, "dora", {"rank": 2, "scale": 1.5, "use_dora": True, "keys": ["v_proj"]})
    randomize(model)
    set_adapter(model, "dora")
    layer = model.layers[0].v_proj
    h = layer.adapters["dora"]
    h.m = h.m * 1.1
    reference = FusedDoRALinear.from_base(layer.linear, r=2, scale=1.5)
    reference.lora_a, reference.lora_b, reference.m = h.lora_a, h.lora_b, h.m
    x = mx.random.normal((3, 24))
    np.testing.assert_allclose(layer(x), reference(x), rtol=1e-6, atol=1e-6)


def test_fuse_folds_the_weighted_set_through_the_one_fold(monkeypatch):
    model = two_adapters()
    model.eval()
    set_adapter(model, ["default", "voice"], [1.0, -0.5])
    x = mx.random.normal((3, 24), key=mx.random.key(8))
    expected = model(x)
    folds = []
    fold = named.fold_lora  # the one fold (layers/fold.py), as the layers' modules import it
    for module in (named, tree):
        monkeypatch.setattr(module, "fold_lora", lambda *a, **k: folds.append(a[1].shape[1]) or fold(*a, **k))
    fuse_adapters(model)
    assert sorted(folds) == [4, 4, 4 + 3, 4 + 3] and not lora_layers(model)  # one fold per layer, stacked ranks
    np.testing.assert_allclose(model(x), expected, rtol=1e-4, atol=1e-4)


def test_add_weighted_adapter_cat_is_the_weighted_stack():
    """PEFT's ``cat`` merge into a new adapter computes what the weighted stack computes."""
    model = two_adapters()
    model.eval()
    x = mx.random.normal((3, 24), key=mx.random.key(9))
    set_adapter(model, ["default", "voice"], [0.7, -1.5])
    expected = model(x)
    add_weighted_adapter(model, ["default", "voice"], [0.7, -1.5], "mix", combination_type="cat")
    assert list_adapters(model) == ["default", "voice", "mix"]
    set_adapter(model, "mix")
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already has an adapter named 'mix'"):
        add_weighted_adapter(model, ["default"], [1.0], "mix", combination_type="linear")


def test_a_load_that_cannot_run_changes_nothing(tmp_path):
    """Replacing an active, stacked adapter by a DoRA one is refused before any layer changes."""
    model = two_adapters()
    set_adapter(model, ["default", "voice"])
    donor = stack()
    add_adapter(donor, "voice", {"rank": 2, "scale": 1.0, "keys": ["q_proj"], "use_dora": True})
    path = save_adapters(donor, tmp_path / "dora", name="voice").parent
    layers_before = dict(lora_layers(model))
    with pytest.raises(ValueError, match="DoRA adapter 'voice' cannot run stacked"):
        load_adapters(model, path, name="voice")
    assert all(layer is layers_before[p] for p, layer in lora_layers(model))
    assert "m" not in model.layers[0].q_proj.adapters["voice"]
