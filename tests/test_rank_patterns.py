"""Per-module rank and alpha (issue 24): `module_rank_alpha` resolves PEFT's rank_pattern /
alpha_pattern keys with the matcher the PEFT reader uses, and what it gives round-trips."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_fused_lora.adapters import AdapterSet, ModuleAdapter, read_adapters, write_adapters
from mlx_fused_lora.bench import peft_peer
from mlx_fused_lora.layers import lora_scale, module_rank_alpha
from mlx_fused_lora.layers.patterns import PatternError

PATHS = [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")] + [
    f"model.layers.{i}.mlp.down_proj" for i in range(3)
]
RANK_PATTERN = {"v_proj": 4, "layers.1.self_attn.v_proj": 2, "^model.layers.\\d+.mlp.down_proj$": 16}
ALPHA_PATTERN = {"down_proj": 8.0, "model\\.layers\\.2\\.self_attn\\.q_proj": 32.0}


def expected(path):
    """The (rank, alpha) a reader of the patterns above expects, written out by hand."""
    rank = (
        16 if "down_proj" in path else 2 if path == "model.layers.1.self_attn.v_proj" else 4 if "v_proj" in path else 8
    )
    alpha = 8.0 if "down_proj" in path else 32.0 if path == "model.layers.2.self_attn.q_proj" else 16.0
    return rank, alpha


@pytest.mark.parametrize("use_rslora", [False, True])
def test_patterns_give_each_module_its_rank_and_scale(use_rslora):
    for path in PATHS:
        rank, alpha = module_rank_alpha(path, 8, 16.0, RANK_PATTERN, ALPHA_PATTERN)
        assert (rank, alpha) == expected(path), path
        want = alpha / (rank**0.5 if use_rslora else rank)
        assert lora_scale(rank, alpha, use_rslora) == pytest.approx(want)
    assert module_rank_alpha("model.layers.0.self_attn.q_proj", 8, 16.0) == (8, 16.0)  # no patterns
    assert module_rank_alpha("a.b.not_v_proj", 8, 16.0, {"v_proj": 4}) == (8, 16.0)  # whole components only


@pytest.mark.parametrize("fmt", ["peft", "mlx-lm"])
def test_the_resolved_ranks_and_scales_round_trip_through_the_formats(tmp_path, fmt):
    modules = {}
    for i, path in enumerate(PATHS):
        rank, alpha = module_rank_alpha(path, 8, 16.0, RANK_PATTERN, ALPHA_PATTERN)
        a = mx.random.normal((32, rank), key=mx.random.key(i))
        modules[path] = ModuleAdapter(a, mx.ones((rank, 24)), lora_scale(rank, alpha), alpha)
    write_adapters(AdapterSet(modules), tmp_path, fmt)
    back = read_adapters(tmp_path)[0].modules
    for path in PATHS:
        rank, alpha = expected(path)
        assert (back[path].r, back[path].scale) == (rank, alpha / rank), path
    if fmt == "peft":  # PEFT's own config resolves to the same ranks and alphas with our matcher
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        for path in PATHS:
            resolved = module_rank_alpha(
                path, config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]
            )
            assert resolved == expected(path), path


@pytest.mark.parametrize(
    "rank_pattern, alpha_pattern, message",
    [
        ({"(q|v)_proj": 4}, None, "rank_pattern key '\\(q\\|v\\)_proj' is not a module path"),
        ({"q_proj": 0}, None, "rank_pattern: the value of 'q_proj' must be an integer >= 1, got 0"),
        ({"q_proj": 2.5}, None, "must be an integer >= 1, got 2.5"),
        ({"q_proj": True}, None, "must be an integer >= 1, got True"),
        (None, {"q_proj": float("nan")}, "alpha_pattern: the value of 'q_proj' must be a finite number"),
        (None, {"q_proj": "big"}, "must be a finite number, got 'big'"),
        (["q_proj"], None, "rank_pattern must be a dict of module-path patterns, got list"),
        ({"x" * 600: 2}, None, "at most 512"),
    ],
)
def test_bad_patterns_are_refused_naming_the_field_and_key(rank_pattern, alpha_pattern, message):
    with pytest.raises(PatternError, match=message):
        module_rank_alpha("model.layers.0.self_attn.q_proj", 8, 16.0, rank_pattern, alpha_pattern)


def peft_ranks_and_scales(adapter_dir, modules) -> dict:
    """PEFT's own reading of a PEFT adapter folder: {path: (r, scaling, its delta s·(B A)ᵀ in our
    layout)} for ``modules`` ({path: (in, out)}), loaded onto a torch module tree of those paths."""
    torch = peft_peer.import_torch()
    from peft import PeftModel

    root = torch.nn.Module()
    for path, (in_dims, out_dims) in modules.items():
        parent = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, torch.nn.Linear(in_dims, out_dims, bias=False))
    model = PeftModel.from_pretrained(root, str(adapter_dir))
    out = {}
    for path in modules:
        layer = model.base_model.model.get_submodule(path)
        a, b = (w["default"].weight.detach().numpy() for w in (layer.lora_A, layer.lora_B))
        out[path] = (a.shape[0], float(layer.scaling["default"]), layer.scaling["default"] * (b @ a).T)
    return out


def check_in_peft(adapter_dir, adapters):
    """PEFT loads the folder with every module's rank and scale, and the same delta as ours."""
    shapes = {p: (m.lora_a.shape[0], m.lora_b.shape[1]) for p, m in adapters.modules.items()}
    for path, (r, scaling, delta) in peft_ranks_and_scales(adapter_dir, shapes).items():
        m = adapters.modules[path]
        assert (r, scaling) == (m.r, pytest.approx(m.scale)), path
        np.testing.assert_allclose(delta, m.scale * np.array(m.lora_a @ m.lora_b), rtol=1e-5, atol=1e-6)


def expected_csm(path):
    """The (rank, alpha) the finetune run below gives a module, written out by hand."""
    rank = 2 if path == "decoder.layers.1.self_attn.q_proj" else 4 if "v_proj" in path else 8
    return rank, 64.0 if "up_proj" in path else 16.0


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """``finetune`` with patterns from flags, and from a config file's maps; the second's adapter
    converted to PEFT's format: {"flags": dir, "file": dir, "peft": dir}."""
    from mlx_fused_lora.adapters import convert_adapter
    from mlx_fused_lora.train.csm.cli import main as finetune
    from train_helpers import finetune_args, write_tiny_run

    tmp = tmp_path_factory.mktemp("patterns")
    root, model_dir, audio = write_tiny_run(tmp, 4)
    config = tmp / "run.yaml"
    config.write_text("rank_pattern: {v_proj: 4, decoder.layers.1.self_attn.q_proj: 2}\nalpha_pattern: {up_proj: 64}\n")
    common = ["--max-steps", "2", "--val-every", "0", "--target-modules", "q_proj", "v_proj", "up_proj"]
    flags = ["--rank-pattern", "v_proj=4", "decoder.layers.1.self_attn.q_proj=2", "--alpha-pattern", "up_proj=64"]
    dirs = {"flags": tmp / "flags", "file": tmp / "file", "peft": tmp / "peft"}
    for name, extra in (("flags", flags), ("file", ["-c", str(config)])):
        assert finetune(finetune_args(model_dir, audio, dirs[name], *common, *extra)) == 0
    convert_adapter(dirs["file"], dirs["peft"], "peft")
    assert finetune(finetune_args(model_dir, audio, tmp / "typo", *common, "--rank-pattern", "v_prj=4")) == 1
    return dirs


def test_finetune_patterns_from_flags_and_a_config_file_reach_every_module(finetuned):
    for name in ("flags", "file", "peft"):
        adapters = read_adapters(finetuned[name])[0]
        assert len(adapters.modules) == 12
        for path, m in adapters.modules.items():
            rank, alpha = expected_csm(path)
            assert (m.r, m.scale) == (rank, alpha / rank), (name, path)


@pytest.mark.skipif(not peft_peer.available(), reason="needs torch and peft (pip install '.[peft]')")
def test_finetune_patterns_load_in_peft(finetuned):
    check_in_peft(finetuned["peft"], read_adapters(finetuned["peft"])[0])
