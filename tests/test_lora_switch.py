"""Mixture-of-experts LoRA: FusedLoRASwitchLinear against mlx-lm's LoRASwitchLinear on the same
weights (forward, gradients, fuse, dropout mask, adapter files), on its own and in a tiny
random Mixtral built through ``linear_to_lora_layers`` and ``patch_mlx_lm``; nothing is downloaded."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

pytest.importorskip("mlx_lm")

import mlx_lm.tuner.utils as tuner_utils  # noqa: E402
from mlx_fused_lora import FusedLoRASwitchLinear, dropout_mask, linear_to_lora_layers, lm_lora  # noqa: E402
from mlx_fused_lora.adapters import save_adapters  # noqa: E402
from mlx_fused_lora.layers.fused_lora_switch_linear import switch_lora_product  # noqa: E402
from mlx_lm.models import mixtral  # noqa: E402
from mlx_lm.models.switch_layers import SwitchLinear  # noqa: E402
from mlx_lm.tuner.lora import LoRASwitchLinear  # noqa: E402
from test_mlx_lm_integration import mlx_lm_classes  # noqa: E402

E, K, N, R = 5, 64, 40, 3


def close(a, b, tol):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    assert a.shape == b.shape
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-6)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def pair(quantized=False, bias=True, seed=0):
    """(mlx-lm's layer, ours) on one base with the same nonzero adapters."""
    mx.random.seed(seed)
    base = SwitchLinear(K, N, E, bias=bias)
    if bias:
        base.bias = mx.random.normal(base.bias.shape)
    if quantized:
        base = base.to_quantized(group_size=32, bits=4)
    theirs = LoRASwitchLinear.from_base(base, r=R, scale=1.5)
    theirs.lora_b = mx.random.normal(theirs.lora_b.shape) / R
    ours = FusedLoRASwitchLinear.from_base(base, r=R, scale=1.5)
    ours.lora_a, ours.lora_b = theirs.lora_a, theirs.lora_b
    return theirs, ours


def routed(sort, dtype=mx.float32, tokens=(3, 5), k=2):
    """x and expert indices as SwitchGLU passes them: (..., 1, 1, K) with (..., k) indices, or
    (sorted, mlx-lm's path for 64+ pairs) one row per (token, expert) pair ordered by expert."""
    x = mx.random.normal((*tokens, 1, 1, K), key=mx.random.key(1)).astype(dtype)
    idx = mx.random.randint(0, E, (*tokens, k), key=mx.random.key(2)).astype(mx.uint32)
    if not sort:
        return x, idx
    rows = mx.broadcast_to(x, (*tokens, k, 1, K)).reshape(-1, 1, K)
    order = mx.argsort(idx.flatten())
    return rows[order], idx.flatten()[order]


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "4-bit"])
@pytest.mark.parametrize("sort", [False, True], ids=["unsorted", "sorted"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_forward_and_gradients_match_mlx_lm(quantized, sort, dtype):
    theirs, ours = pair(quantized)
    x, idx = routed(sort, dtype)
    tol = 2e-5 if dtype == mx.float32 else 2e-2
    ct = mx.random.normal(theirs(x, idx, sort).shape, key=mx.random.key(3))

    def loss(layer, x):
        return (layer(x, idx, sorted_indices=sort).astype(mx.float32) * ct).sum()

    y_theirs, y_ours = theirs(x, idx, sort), ours(x, idx, sort)
    assert y_ours.dtype == y_theirs.dtype
    close(y_ours, y_theirs, tol)
    for layer in (theirs, ours):
        layer.freeze(keys=["linear"])
    g_theirs = dict(tree_flatten(nn.value_and_grad(theirs, loss)(theirs, x)[1]))
    g_ours = dict(tree_flatten(nn.value_and_grad(ours, loss)(ours, x)[1]))
    assert set(g_ours) == set(g_theirs) == {"lora_a", "lora_b"}
    for key in g_theirs:
        close(g_ours[key], g_theirs[key], tol)
    close(mx.grad(lambda x: loss(ours, x))(x), mx.grad(lambda x: loss(theirs, x))(x), tol)


def test_dropout_is_the_ops_mask_per_token_and_expert():
    """In training, each (token, expert) row gets the op's mask for the key, x's other rows and
    the base untouched: against the formula with that mask, forward and the adapters' gradients."""
    theirs, ours = pair()
    x, idx = routed(sort=False)
    key, p = mx.random.key(7), 0.3
    y = theirs.linear(x, idx)
    rows = mx.broadcast_to(x, (*idx.shape, 1, K))
    mask = dropout_mask(key, rows.shape, p)

    def fused(a, b):
        return switch_lora_product(y, x, idx, a, b, scale=1.5, dropout=p, key=key)

    def formula(a, b):
        h = mx.gather_mm(rows * mask, a.swapaxes(-1, -2), rhs_indices=idx)
        return y + 1.5 * mx.gather_mm(h, b.swapaxes(-1, -2), rhs_indices=idx)

    close(fused(ours.lora_a, ours.lora_b), formula(ours.lora_a, ours.lora_b), 2e-5)
    grads = [
        mx.grad(lambda a, b, f=f: (f(a, b) ** 2).sum(), argnums=(0, 1))(ours.lora_a, ours.lora_b)
        for f in (fused, formula)
    ]
    for g_fused, g_formula in zip(*grads, strict=True):
        close(g_fused, g_formula, 2e-5)
    ours.train()
    mx.random.seed(5)
    a = ours(x, idx)
    mx.random.seed(5)
    assert mx.array_equal(a, ours(x, idx)).item() and not mx.array_equal(a, theirs(x, idx)).item()


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "4-bit"])
def test_fuse_matches_mlx_lm(quantized):
    theirs, ours = pair(quantized)
    for dequantize in (True, False) if quantized else (False,):
        f_theirs, f_ours = theirs.fuse(dequantize=dequantize), ours.fuse(dequantize=dequantize)
        assert type(f_ours) is type(f_theirs)
        assert set(dict(tree_flatten(f_ours.parameters()))) == set(dict(tree_flatten(f_theirs.parameters())))
        x, idx = routed(sort=False)
        close(f_ours(x, idx), f_theirs(x, idx), 1e-5 if not quantized or dequantize else 2e-2)
    close(ours.fuse()(x, idx), ours(x, idx), 1e-5 if not quantized else 0.25)


def test_constructor_draws_like_mlx_lm():
    mx.random.seed(3)
    theirs = LoRASwitchLinear(K, N, E, r=R, scale=2.0)
    mx.random.seed(3)
    ours = FusedLoRASwitchLinear(K, N, E, r=R, scale=2.0)
    assert (
        mx.array_equal(theirs.lora_a, ours.lora_a).item()
        and mx.array_equal(theirs.linear.weight, ours.linear.weight).item()
    )
    assert ours.lora_b.shape == theirs.lora_b.shape and ours.num_experts == E
    with pytest.raises(ValueError, match="FusedLoRASwitchLinear: `r` must be >= 1"):
        FusedLoRASwitchLinear(K, N, E, r=0)


MIXTRAL = dict(
    model_type="mixtral",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
)
CONFIG = {"rank": 4, "scale": 2.0, "dropout": 0.0}


def mixtral_model(seed=0):
    mx.random.seed(seed)
    model = mixtral.Model(mixtral.ModelArgs(**MIXTRAL))
    model.freeze()
    return model


@pytest.fixture
def unpatched(monkeypatch):
    mlx_lm_classes(monkeypatch)


def test_tiny_mixtral_trains_saves_and_loads_like_mlx_lm(unpatched, tmp_path):
    """mlx-lm's model with its layers and ours (built by our conversion and by mlx-lm's under
    patch_mlx_lm) on the same weights: same loss and gradients; the adapters ours saves as mlx-lm's
    trainer does load with mlx-lm's own load_adapters into its own layers (and, patched, into ours),
    with the same logits."""
    theirs, ours, patched = mixtral_model(), mixtral_model(), mixtral_model()
    mx.random.seed(9)
    tuner_utils.linear_to_lora_layers(theirs, 2, CONFIG)
    mx.random.seed(9)
    linear_to_lora_layers(ours, 2, CONFIG)
    lm_lora.patch_mlx_lm()
    mx.random.seed(9)
    tuner_utils.linear_to_lora_layers(patched, 2, CONFIG)
    lm_lora.unpatch_mlx_lm()
    switch = [p for p, m in ours.named_modules() if isinstance(m, FusedLoRASwitchLinear)]
    assert len(switch) == 6 and all(isinstance(dict(patched.named_modules())[p], FusedLoRASwitchLinear) for p in switch)
    assert all(isinstance(dict(theirs.named_modules())[p], LoRASwitchLinear) for p in switch)
    adapters = tree_flatten(theirs.trainable_parameters())
    trained = {k: mx.random.normal(v.shape, key=mx.random.key(i)) / 4 for i, (k, v) in enumerate(adapters)}
    tokens = mx.random.randint(0, 64, (2, 40), key=mx.random.key(4))  # 80 tokens x 2 experts: the sorted path

    def loss(model, tokens):
        return nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean()

    results = []
    for model in (theirs, ours, patched):  # nonzero adapters, the same everywhere
        model.load_weights(list(trained.items()), strict=False)
        results.append(nn.value_and_grad(model, loss)(model, tokens))
    (l_theirs, g_theirs), *rest = results
    for l_ours, g_ours in rest:
        close(l_ours, l_theirs, 1e-5)
        g_ours, g_theirs_flat = dict(tree_flatten(g_ours)), dict(tree_flatten(g_theirs))
        assert g_ours.keys() == g_theirs_flat.keys()
        for k in g_theirs_flat:
            close(g_ours[k], g_theirs_flat[k], 1e-4)

    # mlx-lm's trainer's files, from our model; mlx-lm's own loader into its own layers
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), dict(tree_flatten(ours.trainable_parameters())))
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": CONFIG})
    )
    loaded = mixtral_model()
    tuner_utils.load_adapters(loaded, str(tmp_path))
    assert isinstance(dict(loaded.named_modules())[switch[0]], LoRASwitchLinear)
    close(loaded(tokens), ours(tokens), 1e-5)
    lm_lora.patch_mlx_lm()  # and the same files through mlx-lm's loader into fused layers
    fused = mixtral_model()
    tuner_utils.load_adapters(fused, str(tmp_path))
    lm_lora.unpatch_mlx_lm()
    assert isinstance(dict(fused.named_modules())[switch[0]], FusedLoRASwitchLinear)
    close(fused(tokens), loaded(tokens), 1e-5)
    with pytest.raises(ValueError, match="mixture-of-experts LoRA layer"):
        save_adapters(ours, tmp_path / "ours")
