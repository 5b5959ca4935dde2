"""Weighted adapter merges (adapters/merge.py): each method against numpy restatements of
PEFT's formulas and hand-checked cases; rsLoRA, rank/alpha patterns, missing modules, DoRA,
bad arguments. PEFT's own ``add_weighted_adapter`` is tests/test_merge_peft.py's."""

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_fused_lora.adapters import AdapterSet, MergeArgumentError, ModuleAdapter, merge_adapters, merge_module
from mlx_fused_lora.adapters.merge import module_key
from mlx_fused_lora.adapters.registry import read_adapters, write_adapters


def module(rng, in_dims, r, out_dims, scale, magnitude=False):
    a = mx.array(rng.normal(size=(in_dims, r)).astype(np.float32))
    b = mx.array(rng.normal(size=(r, out_dims)).astype(np.float32))
    m = mx.array(rng.uniform(0.5, 2.0, size=(out_dims,)).astype(np.float32)) if magnitude else None
    return ModuleAdapter(a, b, scale, magnitude=m)


def delta(m: ModuleAdapter) -> np.ndarray:
    return m.scale * np.array(m.lora_a, dtype=np.float64) @ np.array(m.lora_b, dtype=np.float64)


def weighted_delta(mods, weights):
    return sum(w * delta(m) for m, w in zip(mods, weights, strict=True))


def hand(*columns):
    """A rank-1 ``lora_a`` (in, 1) from its entries; ``lora_b`` is then (1, 1) of one."""
    return ModuleAdapter(mx.array([[float(v)] for v in columns]), mx.array([[1.0]]), 1.0)


# --- numpy restatements of PEFT's merge_utils (on A and B apart) -----------------------


def np_magnitude_prune(t, density):
    if density >= 1:
        return t
    k = int(density * t.size)
    keep = np.zeros(t.size)
    keep[np.argsort(-np.abs(t.reshape(-1)), kind="stable")[:k]] = 1
    return t * keep.reshape(t.shape)


def np_combine(tensors, weights, method, density, sign_method, masks):
    if method in ("ties", "magnitude_prune"):
        tensors = [np_magnitude_prune(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [t * m / density for t, m in zip(tensors, masks, strict=True)]
    stacked = np.stack(tensors)
    weighted = np.array(weights).reshape(-1, 1, 1) * stacked
    if method not in ("ties", "dare_ties"):
        return weighted.sum(0)
    votes = stacked.sum(0) if sign_method == "total" else np.sign(stacked).sum(0)
    agree = np.sign(stacked) == np.where(votes >= 0, 1, -1)
    return (weighted * agree).sum(0) / np.maximum(agree.sum(0), 1)


def np_per_factor(mods, weights, method, density=None, sign_method="total", key=None):
    c = [w * m.scale for m, w in zip(mods, weights, strict=True)]
    wa = [math.copysign(math.sqrt(abs(x)), x) for x in c]
    wb = [math.sqrt(abs(x)) for x in c]
    masks = [[None] * len(mods), [None] * len(mods)]
    if method.startswith("dare") and density < 1:  # the documented key order: A_i, B_i per adapter
        keys = mx.random.split(key, 2 * len(mods))
        for i, m in enumerate(mods):
            for side, t in enumerate((m.lora_a, m.lora_b)):
                masks[side][i] = np.array(mx.random.bernoulli(density, t.shape, key=keys[2 * i + side]))
    a = np_combine([np.array(m.lora_a, np.float64) for m in mods], wa, method, density, sign_method, masks[0])
    b = np_combine([np.array(m.lora_b, np.float64) for m in mods], wb, method, density, sign_method, masks[1])
    return a, b


# --- cat and svd: the exact weighted delta, and its best rank-k approximation ----------


def test_cat_is_the_exact_weighted_sum_with_each_modules_own_scale():
    rng = np.random.default_rng(0)
    mods = [module(rng, 24, 2, 20, 0.5), module(rng, 24, 4, 20, 8 / math.sqrt(4)), module(rng, 24, 3, 20, 3.0)]
    weights = [0.7, -1.3, 0.25]
    merged = merge_module(mods, weights, "cat")
    assert merged.r == 9 and merged.scale == 1.0 and merged.alpha == 9.0
    assert merged.lora_a.dtype == merged.lora_b.dtype == mx.float32
    np.testing.assert_allclose(delta(merged), weighted_delta(mods, weights), rtol=1e-5, atol=1e-5)


def test_svd_full_rank_is_exact_and_a_lower_rank_is_the_best_approximation():
    rng = np.random.default_rng(1)
    mods = [module(rng, 40, 3, 32, 2.0), module(rng, 40, 5, 32, 0.5)]
    weights = [1.0, -0.6]
    exact = weighted_delta(mods, weights)
    np.testing.assert_allclose(delta(merge_module(mods, weights, "svd", svd_rank=8)), exact, rtol=1e-4, atol=1e-4)
    u, s, vt = np.linalg.svd(exact)
    for k in (1, 3, 5):
        merged = merge_module(mods, weights, "svd", svd_rank=k)
        assert merged.r == k
        best = (u[:, :k] * s[:k]) @ vt[:k]  # Eckart-Young: the best rank-k approximation
        np.testing.assert_allclose(delta(merged), best, rtol=1e-4, atol=1e-4)
        a = np.array(merged.lora_a, np.float64)  # PEFT's split: A orthonormal, B = S Vᵀ
        np.testing.assert_allclose(a.T @ a, np.eye(k), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(np.array(merged.lora_b), axis=1), s[:k], rtol=1e-4)
    # the default rank is the largest input rank
    assert merge_module(mods, weights, "svd").r == 5


def test_svd_any_rank_above_the_deltas_rank_is_exact_and_trainable():
    rng = np.random.default_rng(2)
    mods = [module(rng, 30, 2, 18, 1.0), module(rng, 30, 3, 18, 2.0)]
    merged = merge_module(mods, [0.5, 0.5], "svd", svd_rank=12)  # the delta has rank 5
    assert merged.r == 12
    np.testing.assert_allclose(delta(merged), weighted_delta(mods, [0.5, 0.5]), rtol=1e-4, atol=1e-4)
    a = np.array(merged.lora_a, np.float64)  # further directions of A are orthonormal, not zero
    np.testing.assert_allclose(a.T @ a, np.eye(12), atol=1e-5)
    assert np.all(np.array(merged.lora_b)[5:] == 0)
    sets = [AdapterSet({"m": m}) for m in mods]  # through merge_adapters the further directions are fixed
    first, again = (merge_adapters(sets, [0.5, 0.5], "svd", svd_rank=12).modules["m"] for _ in range(2))
    assert np.array_equal(np.array(first.lora_a), np.array(again.lora_a))
    # a rank above min(in, out) is capped there, as PEFT's full SVD caps it
    assert merge_module(mods, [0.5, 0.5], "svd", svd_rank=64).r == 18


def test_svd_never_forms_the_dense_delta_for_a_wide_module():
    # in < Σr (a QR of a wide factor): still exact
    rng = np.random.default_rng(3)
    mods = [module(rng, 4, 3, 50, 1.0), module(rng, 4, 3, 50, 1.0)]
    merged = merge_module(mods, [1.0, 1.0], "svd", svd_rank=6)
    assert merged.r == 4
    np.testing.assert_allclose(delta(merged), weighted_delta(mods, [1.0, 1.0]), rtol=1e-4, atol=1e-4)


# --- the methods on A and B (PEFT's task-arithmetic family) ------------------------------


@pytest.mark.parametrize(
    "method, density, sign_method",
    [
        ("linear", None, "total"),
        ("magnitude_prune", 0.4, "total"),
        ("ties", 0.5, "total"),
        ("ties", 0.7, "frequency"),
        ("dare_linear", 0.6, "total"),
        ("dare_ties", 0.5, "frequency"),
    ],
)
def test_per_factor_methods_match_peft_formulas(method, density, sign_method):
    rng = np.random.default_rng(4)
    mods = [module(rng, 16, 4, 12, 2.0), module(rng, 16, 4, 12, 0.25), module(rng, 16, 4, 12, 1.0)]
    weights = [0.8, -1.5, 0.3]
    seed = 11 if method.startswith("dare") else None
    adapters = [AdapterSet({"layers.0.q_proj": m}) for m in mods]
    merged = merge_adapters(
        adapters, weights, method, density=density, majority_sign_method=sign_method, seed=seed
    ).modules["layers.0.q_proj"]
    key = module_key(seed, "layers.0.q_proj") if seed is not None else None
    a, b = np_per_factor(mods, weights, method, density, sign_method, key)
    np.testing.assert_allclose(np.array(merged.lora_a), a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(merged.lora_b), b, rtol=1e-5, atol=1e-6)
    assert merged.scale == 1.0 and merged.r == 4


def test_linear_is_task_arithmetic_on_a_and_b_with_square_root_weights():
    # by hand: c = w·s = 4 and -1 → A weights 2, -1 and B weights 2, 1
    m1 = ModuleAdapter(mx.array([[1.0], [2.0]]), mx.array([[3.0, 1.0]]), 2.0)
    m2 = ModuleAdapter(mx.array([[1.0], [0.0]]), mx.array([[1.0, 1.0]]), 0.5)
    merged = merge_module([m1, m2], [2.0, -2.0], "linear")
    assert np.array(merged.lora_a).tolist() == [[1.0], [4.0]]  # 2·[1, 2] - 1·[1, 0]
    assert np.array(merged.lora_b).tolist() == [[7.0, 3.0]]  # 2·[3, 1] + 1·[1, 1]


def test_ties_hand_checked():
    # density 0.5 keeps int(0.5·size) entries of each factor. A: [3, 0, 2, 0] and
    # [0, -2, 4, 0]; elected signs (total): +, -, +, + (a zero sum elects +); the kept
    # entries that agree, averaged: [3 | -2 | (2 + 4) / 2 | none] → [3, -2, 3, 0].
    # B: [2, 0] and [0, 3], both +: [2, 3].
    m1 = ModuleAdapter(mx.array([[3.0], [-1.0], [2.0], [0.5]]), mx.array([[2.0, 1.0]]), 1.0)
    m2 = ModuleAdapter(mx.array([[-1.0], [-2.0], [4.0], [0.25]]), mx.array([[1.0, 3.0]]), 1.0)
    merged = merge_module([m1, m2], [1.0, 1.0], "ties", density=0.5)
    assert np.array(merged.lora_a).reshape(-1).tolist() == [3.0, -2.0, 3.0, 0.0]
    assert np.array(merged.lora_b).tolist() == [[2.0, 3.0]]


def test_ties_total_and_frequency_elect_differently_by_hand():
    # one entry, three adapters: 5, -1, -1. total: sum 3 → + → only 5 kept → 5;
    # frequency: one + and two - → - → the two -1 kept → -2 / 2 = -1.
    mods = [hand(5), hand(-1), hand(-1)]
    total = merge_module(mods, [1.0, 1.0, 1.0], "ties", density=1.0, majority_sign_method="total")
    frequency = merge_module(mods, [1.0, 1.0, 1.0], "ties", density=1.0, majority_sign_method="frequency")
    assert np.array(total.lora_a).item() == 5.0 and np.array(frequency.lora_a).item() == -1.0
    # weights apply after the election: 4 = c → A weights 2, 2, 2 → the kept mean doubles
    assert np.array(merge_module(mods, [4.0] * 3, "ties", density=1.0).lora_a).item() == 10.0


def test_magnitude_prune_hand_checked():
    # density 0.5 keeps int(0.5·size) entries of A and of B apart: the two largest of
    # |[1, -6, 2, 5]| → [0, -6, 0, 5], the larger of |[1, -3]| → [0, -3]; c = 9 → both ·3
    m = ModuleAdapter(mx.array([[1.0], [-6.0], [2.0], [5.0]]), mx.array([[1.0, -3.0]]), 1.0)
    merged = merge_module([m], [9.0], "magnitude_prune", density=0.5)
    assert np.array(merged.lora_a).reshape(-1).tolist() == [0.0, -18.0, 0.0, 15.0]
    assert np.array(merged.lora_b).tolist() == [[0.0, -9.0]]
    # a one-entry factor keeps int(0.5) = 0 entries, as in PEFT: that module's delta is gone
    assert np.array(merge_module([hand(2, 1)], [1.0], "magnitude_prune", density=0.5).lora_b).tolist() == [[0.0]]


def test_dare_hand_checked_and_seeded():
    # density 0.5: every entry is dropped or doubled; c = 1 → weights 1
    values = [2.0, -4.0, 6.0, 8.0, -1.0, 3.0, 5.0, -7.0]
    adapters = [AdapterSet({"m": hand(*values)})]
    merged = merge_adapters(adapters, [1.0], "dare_linear", density=0.5, seed=5)
    got = np.array(merged.modules["m"].lora_a).reshape(-1)
    assert all(g in (0.0, 2 * v) for g, v in zip(got, values, strict=True)), got
    again = merge_adapters(adapters, [1.0], "dare_linear", density=0.5, seed=5)
    assert np.array_equal(np.array(again.modules["m"].lora_a), np.array(merged.modules["m"].lora_a))
    # on a large factor the kept fraction is the density (binomial sd 0.006 at n = 6400)
    rng = np.random.default_rng(6)
    big = [AdapterSet({"m": module(rng, 80, 40, 80, 1.0)})]
    a0 = np.array(big[0].modules["m"].lora_a)
    kept = {
        seed: np.array(merge_adapters(big, [1.0], "dare_ties", density=0.3, seed=seed).modules["m"].lora_a) != 0
        for seed in (1, 2)
    }
    assert abs(kept[1].mean() - 0.3) < 0.03 and abs(kept[2].mean() - 0.3) < 0.03
    assert not np.array_equal(kept[1], kept[2])  # another seed, other masks
    np.testing.assert_allclose(
        np.array(merge_adapters(big, [1.0], "dare_ties", density=0.3, seed=1).modules["m"].lora_a)[kept[1]],
        a0[kept[1]] / 0.3,
        rtol=1e-6,
    )


# --- what PEFT gets wrong: rsLoRA, rank/alpha patterns, DoRA -----------------------------


def rslora_patterned(rng, seed_scale):
    """A PEFT adapter with rsLoRA, a rank_pattern and an alpha_pattern, written and read back."""
    modules = {
        "model.layers.0.self_attn.q_proj": ModuleAdapter(*_ab(rng, 16, 4, 16), 8 / math.sqrt(4), 8.0),
        "model.layers.0.self_attn.v_proj": ModuleAdapter(*_ab(rng, 16, 8, 12), seed_scale / math.sqrt(8), seed_scale),
        "model.layers.1.self_attn.q_proj": ModuleAdapter(*_ab(rng, 16, 4, 16), 8 / math.sqrt(4), 8.0),
    }
    return AdapterSet(modules, dropout=0.1, use_rslora=True)


def _ab(rng, in_dims, r, out_dims):
    return (
        mx.array(rng.normal(size=(in_dims, r)).astype(np.float32)),
        mx.array(rng.normal(size=(r, out_dims)).astype(np.float32)),
    )


def test_rslora_and_rank_alpha_patterns_merge_with_each_modules_own_scale(tmp_path):
    rng = np.random.default_rng(7)
    for i, alpha in enumerate((32.0, 4.0)):
        write_adapters(rslora_patterned(rng, alpha), tmp_path / f"in{i}", "peft")
    sources = [read_adapters(tmp_path / f"in{i}")[0] for i in range(2)]
    config_v_scale = [32.0 / math.sqrt(8), 4.0 / math.sqrt(8)]  # alpha_pattern / sqrt(rank_pattern)
    assert [s.modules["model.layers.0.self_attn.v_proj"].scale for s in sources] == pytest.approx(config_v_scale)
    weights = [0.6, 0.4]
    for method, kwargs in (("cat", {}), ("svd", {"svd_rank": 16})):
        merged = merge_adapters(sources, weights, method, **kwargs)
        assert merged.use_rslora is False and merged.dropout == 0.1
        for path in sources[0].modules:
            expected = weighted_delta([s.modules[path] for s in sources], weights)
            np.testing.assert_allclose(delta(merged.modules[path]), expected, rtol=1e-4, atol=1e-4)
        for fmt in ("peft", "mlx-lm"):  # the merged adapter's files say what it is
            write_adapters(merged, tmp_path / f"{method}-{fmt}", fmt)
            back, _ = read_adapters(tmp_path / f"{method}-{fmt}")
            for path, m in merged.modules.items():
                np.testing.assert_allclose(delta(back.modules[path]), delta(m), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_per_factor_merges_keep_each_modules_rank_and_reload(method, tmp_path):
    # peft#3737: PEFT writes rank_pattern={} for these, so its result cannot be reloaded
    rng = np.random.default_rng(14)
    sources = [rslora_patterned(rng, 16.0), rslora_patterned(rng, 2.0)]
    merged = merge_adapters(sources, [0.3, 0.9], method, density=0.5 if method == "ties" else None)
    assert {p: m.r for p, m in merged.modules.items()} == {p: m.r for p, m in sources[0].modules.items()}
    write_adapters(merged, tmp_path / "merged", "peft")
    back, _ = read_adapters(tmp_path / "merged")
    for path, m in merged.modules.items():
        assert back.modules[path].r == m.r and back.modules[path].scale == 1.0
        assert np.array_equal(np.array(back.modules[path].lora_a), np.array(m.lora_a))


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_one_rslora_adapter_at_weight_one_merges_into_itself(method):
    # peft#3761's check: PEFT's result is sqrt(r) times too large with rsLoRA
    rng = np.random.default_rng(8)
    source = rslora_patterned(rng, 16.0)
    merged = merge_adapters([source], [1.0], method)
    for path, m in source.modules.items():
        np.testing.assert_allclose(delta(merged.modules[path]), delta(m), rtol=1e-4, atol=1e-5)


def test_a_module_missing_from_an_adapter_is_a_zero_delta_there():
    rng = np.random.default_rng(9)
    shared = [module(rng, 8, 2, 6, 1.0), module(rng, 8, 2, 6, 2.0)]
    only_b = module(rng, 10, 2, 4, 0.5)
    a1 = AdapterSet({"q": shared[0]})
    a2 = AdapterSet({"q": shared[1], "v": only_b})
    for method in ("cat", "linear", "svd"):
        merged = merge_adapters([a1, a2], [0.5, 3.0], method)
        assert set(merged.modules) == {"q", "v"}
        np.testing.assert_allclose(delta(merged.modules["v"]), 3.0 * delta(only_b), rtol=1e-4, atol=1e-5)
    ties = merge_adapters([a1, a2], [0.5, 3.0], "ties", density=0.5).modules["v"]
    alone = merge_module([only_b], [3.0], "ties", density=0.5)
    assert np.array_equal(np.array(ties.lora_a), np.array(alone.lora_a))


def test_dora_adapters_are_refused_naming_why():
    rng = np.random.default_rng(10)
    lora = AdapterSet({"q": module(rng, 8, 2, 6, 1.0)})
    dora = AdapterSet({"q": module(rng, 8, 2, 6, 1.0, magnitude=True)})
    for adapters in ([dora], [lora, dora]):
        with pytest.raises(MergeArgumentError, match=r"adapters\[\d\] is a DoRA adapter: .*base weight W") as e:
            merge_adapters(adapters, [1.0] * len(adapters), "cat")
        assert e.value.argument == "adapters"
    with pytest.raises(MergeArgumentError, match="adapter 0 is DoRA"):
        merge_module([dora.modules["q"]], [1.0], "cat")


# --- bad input: one error naming the argument ------------------------------------------


def _two():
    rng = np.random.default_rng(11)
    return [AdapterSet({"q": module(rng, 8, 2, 6, 1.0)}), AdapterSet({"q": module(rng, 8, 2, 6, 1.0)})]


@pytest.mark.parametrize(
    "kwargs, argument, message",
    [
        ({"weights": [1.0]}, "weights", "1 weights for 2 adapters"),
        ({"weights": [1.0, float("nan")]}, "weights", "finite"),
        ({"weights": "12"}, "weights", "sequence of numbers"),
        ({"combination_type": "mean"}, "combination_type", "one of"),
        ({"combination_type": "ties"}, "density", "required by ties"),
        ({"combination_type": "dare_linear", "density": 0.0}, "density", r"\(0, 1\], got 0.0"),
        ({"combination_type": "magnitude_prune", "density": 1.5}, "density", r"\(0, 1\], got 1.5"),
        ({"combination_type": "linear", "density": 0.5}, "density", "not linear"),
        ({"combination_type": "svd", "svd_rank": 0}, "svd_rank", ">= 1, got 0"),
        ({"combination_type": "cat", "svd_rank": 4}, "svd_rank", "not cat"),
        (
            {"combination_type": "ties", "density": 0.5, "majority_sign_method": "mean"},
            "majority_sign_method",
            "one of",
        ),
        ({"combination_type": "svd", "seed": 3}, "seed", "not svd"),
        ({"combination_type": "dare_ties", "density": 0.5, "seed": -1}, "seed", r"\[0, 2\*\*63\)"),
    ],
)
def test_bad_arguments_are_refused_naming_them(kwargs, argument, message):
    call = {"weights": [1.0, 1.0], "combination_type": "cat", **kwargs}
    with pytest.raises(MergeArgumentError, match=message) as e:
        merge_adapters(_two(), call.pop("weights"), call.pop("combination_type"), **call)
    assert e.value.argument == argument


def test_incompatible_adapters_are_refused_naming_the_module():
    rng = np.random.default_rng(12)
    a = AdapterSet({"layers.3.q": module(rng, 8, 2, 6, 1.0)})
    with pytest.raises(MergeArgumentError, match=r"layers.3.q: linear .* got ranks \[2, 4\] \(cat and svd"):
        merge_adapters([a, AdapterSet({"layers.3.q": module(rng, 8, 4, 6, 1.0)})], [1, 1], "linear")
    with pytest.raises(MergeArgumentError, match=r"layers.3.q: .*different shapes .*\[\(8, 6\), \(9, 6\)\]"):
        merge_adapters([a, AdapterSet({"layers.3.q": module(rng, 9, 2, 6, 1.0)})], [1, 1], "cat")
    with pytest.raises(MergeArgumentError, match=r"adapters\[1\] is a dict"):
        merge_adapters([a, {}], [1, 1], "cat")
    with pytest.raises(MergeArgumentError, match="at least one adapter"):
        merge_adapters([], [], "cat")


def test_numpy_weights_ranks_and_seeds_are_accepted():
    adapters = _two()
    expected = merge_adapters(adapters, [0.5, 2.0], "dare_linear", density=0.5, seed=4).modules["q"]
    got = merge_adapters(adapters, np.array([0.5, 2.0]), "dare_linear", density=np.float32(0.5), seed=np.int64(4))
    assert np.array_equal(np.array(got.modules["q"].lora_a), np.array(expected.lora_a))
    assert merge_adapters(adapters, (1, 1), "svd", svd_rank=np.int64(3)).modules["q"].r == 3


# --- properties over ranks, shapes and weights -----------------------------------------


@st.composite
def module_sets(draw):
    in_dims, out_dims = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    n = draw(st.integers(1, 3))
    ranks = draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    scales = draw(st.lists(st.floats(0.05, 8.0), min_size=n, max_size=n))
    weights = draw(st.lists(st.floats(-2.0, 2.0), min_size=n, max_size=n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return [module(rng, in_dims, r, out_dims, s) for r, s in zip(ranks, scales, strict=True)], weights


@settings(max_examples=25, deadline=None)
@given(module_sets(), st.integers(1, 30))
def test_cat_and_svd_give_the_weighted_delta_property(case, svd_rank):
    mods, weights = case
    exact = weighted_delta(mods, weights)
    tol = 1e-4 * max(1.0, np.abs(exact).max())
    cat = merge_module(mods, weights, "cat")
    assert cat.r == sum(m.r for m in mods)
    np.testing.assert_allclose(delta(cat), exact, atol=tol)
    svd = merge_module(mods, weights, "svd", svd_rank=svd_rank)
    in_dims, out_dims = exact.shape
    assert svd.r == min(svd_rank, in_dims, out_dims)
    s = np.linalg.svd(exact, compute_uv=False)
    # the error of the best rank-k approximation is the first dropped singular value
    dropped = s[svd.r] if svd.r < len(s) else 0.0
    assert np.linalg.norm(delta(svd) - exact, 2) <= dropped + tol


@settings(max_examples=20, deadline=None)
@given(module_sets())
def test_linear_matches_the_formula_property(case):
    mods, weights = case
    mods = [ModuleAdapter(m.lora_a[:, :1], m.lora_b[:1], m.scale) for m in mods]  # one rank
    merged = merge_module(mods, weights, "linear")
    a, b = np_per_factor(mods, weights, "linear")
    np.testing.assert_allclose(np.array(merged.lora_a), a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(merged.lora_b), b, rtol=1e-5, atol=1e-5)


# --- the CLI -----------------------------------------------------------------------------


@pytest.fixture
def adapter_dirs(tmp_path):
    rng = np.random.default_rng(13)
    write_adapters(rslora_patterned(rng, 16.0), tmp_path / "a", "peft")
    mods = {
        "model.layers.0.self_attn.q_proj": module(rng, 16, 4, 16, 3.0),
        "model.layers.0.self_attn.v_proj": module(rng, 16, 2, 12, 0.5),
    }
    write_adapters(AdapterSet(mods, num_layers=2), tmp_path / "b", "mlx-lm")
    return tmp_path / "a", tmp_path / "b"


def test_cli_merges_adapter_files_of_any_format(adapter_dirs, tmp_path, capsys):
    from mlx_fused_lora.cli import main

    a, b = adapter_dirs
    out = tmp_path / "merged"
    assert main(["merge-adapters", str(a), str(b), "--weights", "0.5", "-2", "--method", "cat", "--out", str(out)]) == 0
    assert "merged 2 adapters (cat, 3 modules, rank 4..10) -> peft" in capsys.readouterr().out
    merged, fmt = read_adapters(out)
    sources = [read_adapters(a)[0], read_adapters(b)[0]]
    assert fmt == "peft" and set(merged.modules) == set(sources[0].modules)
    for path, m in merged.modules.items():
        parts = [(s.modules[path], w) for s, w in zip(sources, (0.5, -2.0), strict=True) if path in s.modules]
        expected = weighted_delta([p for p, _ in parts], [w for _, w in parts])
        np.testing.assert_allclose(delta(m), expected, rtol=1e-5, atol=1e-5)
    out2 = tmp_path / "merged2"
    argv = [str(a), str(a), "--weights", "1", "1", "--method", "dare_ties", "--density", "0.5", "--seed", "3"]
    assert main(["merge-adapters", *argv, "--out", str(out2), "--format", "mlx-lm"]) == 0
    assert read_adapters(out2)[1] == "mlx-lm"
    argv = [str(a), str(b), "--weights", "1", "1", "--method", "svd", "--svd-rank", "3"]
    assert main(["merge-adapters", *argv, "--out", str(tmp_path / "merged3")]) == 0
    assert {m.r for m in read_adapters(tmp_path / "merged3")[0].modules.values()} == {3}


@pytest.mark.parametrize(
    "args, names",
    [
        (["--weights", "1", "--method", "cat"], "argument --weights: got 1 weights for 2 adapters"),
        (["--weights", "1", "x", "--method", "cat"], "argument --weights: invalid float value: 'x'"),
        (["--weights", "1", "1", "--method", "mean"], "argument --method: invalid choice: 'mean'"),
        (["--weights", "1", "1", "--method", "ties"], "argument --density: density is required by ties"),
        (["--weights", "1", "1", "--method", "ties", "--density", "2"], "argument --density: density must be in"),
        (["--weights", "1", "1", "--method", "svd", "--svd-rank", "0"], "argument --svd-rank: svd_rank must be"),
        (["--weights", "1", "1", "--method", "cat", "--seed", "1"], "argument --seed: seed applies to"),
        (["--weights", "1", "1", "--method", "linear"], "argument ADAPTER: model.layers.0.self_attn.v_proj: linear"),
        (["--weights", "1", "1", "--method", "cat", "--format", "onnx"], "argument --format: invalid choice"),
        (["--weights", "1", "inf", "--method", "cat"], "argument --weights: weights must be finite"),
    ],
)
def test_cli_bad_arguments_are_one_line_naming_them(adapter_dirs, tmp_path, capsys, args, names):
    from mlx_fused_lora.adapters.merge_cli import main

    a, b = adapter_dirs
    assert main([str(a), str(b), *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("merge-adapters: error: ") and names in err, err
    assert not (tmp_path / "out").exists()


def test_cli_unreadable_input_and_missing_out_are_one_line(adapter_dirs, tmp_path, capsys):
    from mlx_fused_lora.adapters.merge_cli import main

    a, _ = adapter_dirs
    assert main([str(a), str(tmp_path / "nowhere"), "--weights", "1", "1", "--method", "cat", "--out", "o"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err, err
    assert main([str(a), "--weights", "1", "--method", "cat"]) == 2
    err = capsys.readouterr().err
    assert err == "merge-adapters: error: the following arguments are required: --out\n"


README_COMMANDS = "tested-by: tests/test_merge.py (the README merge commands)"


def test_readme_merge_commands_run(tmp_path, monkeypatch, capsys):
    import re
    import shlex
    from pathlib import Path

    from mlx_fused_lora.cli import main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(rf"<!-- {re.escape(README_COMMANDS)} -->\n```bash\n(.*?)```", readme, re.S)
    assert block, "README has no block marked " + README_COMMANDS
    rng = np.random.default_rng(15)
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    for name in ("speaker_a", "speaker_b"):
        write_adapters(AdapterSet({p: module(rng, 24, 4, 24, 2.0) for p in paths}), tmp_path / name, "mlx-lm")
    monkeypatch.chdir(tmp_path)
    lines = [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 2 and all(argv[:2] == ["mlx-fused-lora", "merge-adapters"] for argv in lines)
    for argv in lines:
        assert main(argv[1:]) == 0, capsys.readouterr().err
    svd, fmt = read_adapters(tmp_path / "merged")
    assert fmt == "mlx-lm" and {m.r for m in svd.modules.values()} == {16}  # above the delta's rank 8: exact
    sources = [read_adapters(tmp_path / name)[0] for name in ("speaker_a", "speaker_b")]
    for p in paths:
        expected = weighted_delta([s.modules[p] for s in sources], [0.6, 0.4])
        np.testing.assert_allclose(delta(svd.modules[p]), expected, rtol=1e-4, atol=1e-4)
    assert read_adapters(tmp_path / "merged_ties")[1] == "peft"
