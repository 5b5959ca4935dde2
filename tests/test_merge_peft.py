"""Our weighted merges against PEFT's own ``add_weighted_adapter`` on the same adapters.

Skipped where torch or peft is missing (the ``peft`` extra). dare's masks are random in
both: PEFT's ``random_pruning`` is replaced, for the test, by one that applies the very
masks our merge draws (from the documented key order), so the rest of PEFT's dare runs as is.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_fused_lora.adapters import AdapterSet, ModuleAdapter, merge_adapters
from mlx_fused_lora.adapters.merge import module_key
from mlx_fused_lora.bench import peft_peer

pytestmark = pytest.mark.skipif(not peft_peer.available(), reason="needs torch and peft (pip install '.[peft]')")

SHAPES = {"q": (16, 12), "v": (16, 20)}  # module: (in, out)


def peft_model(configs):
    """A two-Linear torch model with PEFT adapters ``a0, a1, ...`` of ``configs`` (LoraConfig kwargs)."""
    torch = peft_peer.import_torch()
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, (k, n) in SHAPES.items():
                setattr(self, name, torch.nn.Linear(k, n, bias=False))

    model = None
    for i, kwargs in enumerate(configs):
        config = LoraConfig(target_modules=list(SHAPES), init_lora_weights=False, **kwargs)
        if model is None:
            model = get_peft_model(Net(), config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
    return model


def layer(model, name):
    return getattr(model.base_model.model, name)


def ours_from_peft(model, n, use_rslora):
    """The adapters ``a0..a{n-1}`` of ``model`` as AdapterSets (each module's scale as PEFT has it)."""
    sets = []
    for i in range(n):
        modules = {}
        for name in SHAPES:
            lin = layer(model, name)
            a = mx.array(lin.lora_A[f"a{i}"].weight.detach().numpy().T.copy())
            b = mx.array(lin.lora_B[f"a{i}"].weight.detach().numpy().T.copy())
            modules[name] = ModuleAdapter(a, b, float(lin.scaling[f"a{i}"]))
        sets.append(AdapterSet(modules, use_rslora=use_rslora))
    return sets


def peft_tensors(model, name, adapter="merged"):
    lin = layer(model, name)
    a = lin.lora_A[adapter].weight.detach().numpy().T
    b = lin.lora_B[adapter].weight.detach().numpy().T
    return a, b


def use_our_dare_masks(monkeypatch, ours, seed, density):
    """PEFT's random pruning, with the masks our merge draws for the same tensor."""
    import peft.utils.merge_utils as merge_utils

    torch = peft_peer.import_torch()
    table = []
    for name in SHAPES:
        mods = [s.modules[name] for s in ours]
        keys = mx.random.split(module_key(seed, name), 2 * len(mods))
        for i, m in enumerate(mods):
            for side, t in enumerate((m.lora_a, m.lora_b)):
                mask = np.array(mx.random.bernoulli(density, t.shape, key=keys[2 * i + side]))
                table.append((torch.from_numpy(np.array(t).T.copy()), torch.from_numpy(mask.T.astype(np.float32))))

    def random_pruning(tensor, density, rescale):
        (mask,) = [mask for t, mask in table if torch.equal(t, tensor)]
        return tensor * mask / density if rescale else tensor * mask

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)


@pytest.mark.parametrize(
    "method, density, sign_method",
    [
        ("linear", None, "total"),
        ("cat", None, "total"),
        ("ties", 0.5, "total"),
        ("ties", 0.6, "frequency"),
        ("magnitude_prune", 0.4, "total"),
        ("dare_linear", 0.5, "total"),
        ("dare_ties", 0.7, "frequency"),
    ],
)
def test_merged_tensors_equal_peft_add_weighted_adapter(monkeypatch, method, density, sign_method):
    torch = peft_peer.import_torch()
    torch.manual_seed(0)
    model = peft_model([{"r": 4, "lora_alpha": 8}, {"r": 4, "lora_alpha": 2}, {"r": 4, "lora_alpha": 4}])
    ours = ours_from_peft(model, 3, use_rslora=False)
    weights = [0.7, -1.2, 0.4]
    seed = 17 if method.startswith("dare") else None
    if seed is not None:
        use_our_dare_masks(monkeypatch, ours, seed, density)
    model.base_model.add_weighted_adapter(
        ["a0", "a1", "a2"],
        weights,
        "merged",
        combination_type=method,
        density=density,
        majority_sign_method=sign_method,
    )
    merged = merge_adapters(ours, weights, method, density=density, majority_sign_method=sign_method, seed=seed)
    for name in SHAPES:
        a, b = peft_tensors(model, name)
        assert float(layer(model, name).scaling["merged"]) == merged.modules[name].scale == 1.0
        np.testing.assert_allclose(np.array(merged.modules[name].lora_a), a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.array(merged.modules[name].lora_b), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("svd_rank", [None, 2, 8])
def test_svd_delta_equals_peft_with_rank_patterns(svd_rank):
    torch = peft_peer.import_torch()
    torch.manual_seed(1)
    model = peft_model([{"r": 4, "lora_alpha": 8}, {"r": 4, "lora_alpha": 6, "rank_pattern": {"v": 6}}])
    ours = ours_from_peft(model, 2, use_rslora=False)
    weights = [1.5, -0.5]
    model.base_model.add_weighted_adapter(["a0", "a1"], weights, "merged", combination_type="svd", svd_rank=svd_rank)
    merged = merge_adapters(ours, weights, "svd", svd_rank=svd_rank)
    for name in SHAPES:
        peft_delta = layer(model, name).get_delta_weight("merged").detach().numpy().T
        m = merged.modules[name]
        assert m.r == (svd_rank or 6)
        ours_delta = m.scale * np.array(m.lora_a) @ np.array(m.lora_b)
        np.testing.assert_allclose(ours_delta, peft_delta, rtol=1e-4, atol=1e-4)


def test_rslora_tensors_equal_peft_and_only_ours_keep_the_delta():
    # PEFT folds each rsLoRA scale into the tensors like us, but keeps use_rslora on the
    # result (scale sqrt(r) instead of 1: peft#3761); ours has scale 1.
    torch = peft_peer.import_torch()
    torch.manual_seed(2)
    model = peft_model([{"r": 4, "lora_alpha": 8, "use_rslora": True}, {"r": 4, "lora_alpha": 3, "use_rslora": True}])
    ours = ours_from_peft(model, 2, use_rslora=True)
    assert ours[0].modules["q"].scale == pytest.approx(8 / math.sqrt(4))
    weights = [1.0, 0.5]
    model.base_model.add_weighted_adapter(["a0", "a1"], weights, "merged", combination_type="cat")
    merged = merge_adapters(ours, weights, "cat")
    for name in SHAPES:
        a, b = peft_tensors(model, name)
        m = merged.modules[name]
        np.testing.assert_allclose(np.array(m.lora_a), a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.array(m.lora_b), b, rtol=1e-5, atol=1e-6)
        exact = sum(
            w * s.modules[name].scale * np.array(s.modules[name].lora_a) @ np.array(s.modules[name].lora_b)
            for s, w in zip(ours, weights, strict=True)
        )
        np.testing.assert_allclose(m.scale * np.array(m.lora_a) @ np.array(m.lora_b), exact, rtol=1e-4, atol=1e-5)
