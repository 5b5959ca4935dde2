"""Untrusted adapter and checkpoint files (issue 12): all-or-nothing loads, no regex on
config strings, errors naming the field or tensor."""

import json
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_fused_lora.adapters import AdapterError, load_adapters, read_adapters, save_adapters
from mlx_fused_lora.adapters.cli import main as convert_main
from mlx_fused_lora.csm import CSM, CheckpointError, CSMConfig, apply_lora, load_csm, save_csm
from mlx_fused_lora.layers import lora_layers
from mlx_fused_lora.layers.patterns import PatternError, parse_pattern

TARGETS = ["q_proj", "v_proj", "up_proj", "codebook0_head", "projection"]


def base_csm():
    mx.random.seed(21)
    m = CSM(CSMConfig.tiny())
    mx.eval(m.parameters())
    return m


def adapted_csm(seed=4, r=4):
    m = base_csm()
    apply_lora(m, TARGETS, r=r, alpha=8.0)
    key = mx.random.key(seed)
    for _, layer in lora_layers(m):
        key, sub = mx.random.split(key)
        layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape, key=sub)
    mx.eval(m.parameters())
    return m


def snapshot(m):
    return {k: np.array(v) for k, v in tree_flatten(m.parameters())}, {n: layer.scale for n, layer in lora_layers(m)}


def assert_unchanged(m, before):
    params, scales = snapshot(m)
    assert params.keys() == before[0].keys()
    for k in params:
        np.testing.assert_array_equal(params[k], before[0][k], err_msg=k)
    assert scales == before[1]


def edit_weights(d, name, edit):
    w = mx.load(str(d / name))
    edit(w)
    mx.save_safetensors(str(d / name), w)


def edit_config(d, name, edit):
    cfg = json.loads((d / name).read_text())
    edit(cfg)
    (d / name).write_text(json.dumps(cfg))


# -- item 4: all or nothing --

BAD_MODULE = [
    # (what, edit(weights, path of the module read last), error, match)
    ("shape", lambda w, last: w.update({f"{last}.lora_b": mx.zeros((4, 7))}), ValueError, r"\(4, 7\)"),
    (
        "NaN",
        lambda w, last: w.update({f"{last}.lora_a": mx.full(w[f"{last}.lora_a"].shape, np.nan)}),
        AdapterError,
        "non-finite",
    ),
    (
        "int32",
        lambda w, last: w.update({f"{last}.lora_a": w[f"{last}.lora_a"].astype(mx.int32)}),
        AdapterError,
        "int32",
    ),
]


@pytest.mark.parametrize("what, edit, error, match", BAD_MODULE, ids=[b[0] for b in BAD_MODULE])
def test_a_failed_load_into_a_lora_model_changes_nothing(tmp_path, what, edit, error, match):
    save_adapters(adapted_csm(seed=9), tmp_path, format="mlx-lm")  # other values than the target's
    # Spoil the module read last, so a loader that assigns as it goes would have changed
    # every other module before failing.
    last = list(read_adapters(tmp_path)[0].modules)[-1]
    edit_weights(tmp_path, "adapters.safetensors", lambda w: edit(w, last))
    target = adapted_csm(seed=4, r=2)
    before = snapshot(target)
    with pytest.raises(error, match=match):
        load_adapters(target, tmp_path)
    assert_unchanged(target, before)


def test_an_unknown_module_after_good_ones_changes_nothing(tmp_path):
    save_adapters(adapted_csm(seed=9), tmp_path, format="mlx-lm")
    good = mx.load(str(tmp_path / "adapters.safetensors"))
    for i in range(20):  # a name the file lists after some good module
        w = {**good, f"zzz{i}.lora_a": mx.zeros((64, 4)), f"zzz{i}.lora_b": mx.zeros((4, 8))}
        mx.save_safetensors(str(tmp_path / "adapters.safetensors"), w)
        if list(read_adapters(tmp_path)[0].modules).index(f"zzz{i}") > 0:
            break
    else:
        pytest.fail("no unknown module name came after a good one")
    target = adapted_csm(seed=4, r=2)
    before = snapshot(target)
    with pytest.raises(AdapterError, match=f"adapter module 'zzz{i}' is not in the model"):
        load_adapters(target, tmp_path)
    assert_unchanged(target, before)


def test_a_failed_load_into_a_plain_model_adds_no_lora_layer(tmp_path):
    save_adapters(adapted_csm(), tmp_path, format="peft")
    edit_weights(
        tmp_path,
        "adapter_model.safetensors",
        lambda w: w.update({"base_model.model.projection.lora_B.weight": mx.zeros((31, 4))}),
    )
    target = base_csm()
    before = snapshot(target)
    with pytest.raises(ValueError, match="projection"):
        load_adapters(target, tmp_path)
    assert not lora_layers(target)
    assert_unchanged(target, before)


def test_a_good_load_replaces_every_module(tmp_path):
    source = adapted_csm(seed=9)
    save_adapters(source, tmp_path, format="mlx-lm")
    target = load_adapters(adapted_csm(seed=4, r=2), tmp_path)
    got = dict(lora_layers(target))
    for name, layer in lora_layers(source):
        assert mx.array_equal(got[name].lora_b, layer.lora_b).item(), name
        assert got[name].lora_a.shape[1] == 4 and got[name].scale == layer.scale


# -- item 7: PEFT patterns never run as regexes --


def peft_dir(tmp_path, rank_pattern=None, alpha_pattern=None):
    m = base_csm()
    apply_lora(m, ["q_proj"], r=4, alpha=8.0)
    apply_lora(m, ["v_proj"], r=2, alpha=8.0)
    d = tmp_path / "peft"
    save_adapters(m, d, format="peft")

    def edit(cfg):
        if rank_pattern is not None:  # q_proj takes the defaults, v_proj a pattern
            cfg.update(r=4, lora_alpha=8.0, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern or {})

    edit_config(d, "adapter_config.json", edit)
    return d


def test_a_catastrophic_regex_key_is_refused_at_once(tmp_path):
    d = peft_dir(tmp_path, rank_pattern={"(.*)*x": 4})
    # In a subprocess with a deadline: a regex engine would backtrack for hours here.
    code = (
        "import sys\nfrom mlx_fused_lora.adapters import read_adapters\n"
        "try:\n    read_adapters(sys.argv[1])\nexcept ValueError as e:\n    print(e)\n"
    )
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 120
    assert "rank_pattern key '(.*)*x' is not a module path" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize(
    "pattern",
    [
        {"v_proj": 2},
        {"self_attn.v_proj": 2},
        {"layers.\\d+.self_attn.v_proj": 2},
        {"layers\\.[0-9]+\\.self_attn\\.v_proj$": 2},
        {f"^{s}.layers.{i}.self_attn.v_proj": 2 for s in ("backbone", "decoder") for i in range(2)},
    ],
)
def test_pattern_keys_match_module_path_suffixes(tmp_path, pattern):
    adapters, _ = read_adapters(peft_dir(tmp_path, rank_pattern=pattern, alpha_pattern={"v_proj": 3.0}))
    for path, m in adapters.modules.items():
        expect_r, alpha = (2, 3.0) if path.endswith("v_proj") else (4, 8.0)
        assert (m.r, m.alpha, m.scale) == (expect_r, alpha, alpha / expect_r), path


def test_pattern_semantics():
    assert parse_pattern("q_proj", "rank_pattern", "cfg").matches("model.layers.0.self_attn.q_proj")
    assert not parse_pattern("proj", "rank_pattern", "cfg").matches("model.layers.0.self_attn.q_proj")
    assert not parse_pattern("^self_attn.q_proj", "rank_pattern", "cfg").matches("layers.0.self_attn.q_proj")
    assert parse_pattern("layers.\\d+.q", "rank_pattern", "cfg").matches("a.layers.17.q")
    assert not parse_pattern("layers.\\d+.q", "rank_pattern", "cfg").matches("a.layers.x7.q")


@pytest.mark.parametrize("key", ["(q|k)_proj", "q_proj.*", "[", "a..b", "x" * 600, ""])
def test_a_malformed_or_huge_pattern_key_names_the_key(key):
    with pytest.raises(PatternError, match="rank_pattern key"):
        parse_pattern(key, "rank_pattern", "adapter_config.json")


def test_the_longest_matching_key_wins(tmp_path):
    pattern = {"v_proj": 9, "backbone.layers.0.self_attn.v_proj": 2, "layers.1.self_attn.v_proj": 2}
    d = peft_dir(tmp_path, rank_pattern={**pattern, "decoder.layers.0.self_attn.v_proj": 2})
    assert {m.r for p, m in read_adapters(d)[0].modules.items() if p.endswith("v_proj")} == {2}


# -- item 9: errors that name the field, the expected and the actual --

PEFT_FIELDS = [
    ("lora_alpha", "abc", r"'lora_alpha' must be a number finite in float32.*, got str 'abc'"),
    ("r", 4.5, r"'r' must be an integer >= 1, got float 4.5"),
    ("use_rslora", "yes", r"'use_rslora' must be true or false, got str 'yes'"),
    ("rank_pattern", ["q_proj"], r"'rank_pattern' must be an object or null, got list"),
    ("alpha_pattern", {"v_proj": "big"}, r"alpha_pattern: field 'v_proj' must be a number finite in float32.*got str"),
    ("lora_dropout", 1.5, r"'lora_dropout' must be in \[0, 1\), got 1.5"),
]


@pytest.mark.parametrize("field, value, match", PEFT_FIELDS, ids=[f[0] for f in PEFT_FIELDS])
def test_peft_config_field_types(tmp_path, field, value, match):
    d = peft_dir(tmp_path)
    edit_config(d, "adapter_config.json", lambda cfg: cfg.update({field: value}))
    with pytest.raises(AdapterError, match=r"adapter_config\.json.*" + match):
        read_adapters(d)


MLX_FIELDS = [
    (lambda c: c.update(lora_parameters=[1, 2]), r"'lora_parameters' must be an object, got list"),
    (
        lambda c: c["lora_parameters"].update(scale="abc"),
        r"lora_parameters: field 'scale' must be a number finite in float32.*, got str 'abc'",
    ),
    (lambda c: c["lora_parameters"].update(dropout=None), r"'dropout' must be a finite number, got NoneType"),
    (lambda c: c.update(num_layers="3"), r"'num_layers' must be an integer or null, got str '3'"),
    (
        lambda c: c.update(scale_pattern={"q": [1]}),
        r"scale_pattern: field 'q' must be a number finite in float32.*got list",
    ),
    (lambda c: c.update(fine_tune_type=3), r"'fine_tune_type' must be a string, got int 3"),
]


@pytest.mark.parametrize(
    "fmt, config", [("mlx-lm", "adapter_config.json"), ("csm-cli", "fine_tuned_model_metadata.json")]
)
@pytest.mark.parametrize("edit, match", MLX_FIELDS)
def test_mlx_lm_config_field_types(tmp_path, fmt, config, edit, match):
    save_adapters(adapted_csm(), tmp_path, format=fmt)
    edit_config(tmp_path, config, edit)
    with pytest.raises(AdapterError, match=config.replace(".", r"\.") + ".*" + match):
        read_adapters(tmp_path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda w: w.update({"base_model.model.projection.lora_A.weight": mx.zeros((4, 64), mx.int32)}), "int32"),
        (lambda w: w.update({"base_model.model.projection.lora_B.weight": mx.full((32, 4), np.inf)}), "non-finite"),
        (lambda w: w.update({"base_model.model.projection.lora_B.weight": mx.zeros((32, 4, 1))}), "a matrix"),
    ],
)
def test_peft_tensors_are_checked_naming_the_key(tmp_path, edit, match):
    save_adapters(adapted_csm(), tmp_path, format="peft")
    edit_weights(tmp_path, "adapter_model.safetensors", edit)
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors.*projection\.lora_[AB]\.weight.*" + match):
        read_adapters(tmp_path)


def test_convert_adapter_cli_gives_one_line(tmp_path, capsys):
    d = peft_dir(tmp_path, rank_pattern={"(.*)*x": 4})
    assert convert_main([str(d), str(tmp_path / "out"), "--to", "mlx-lm"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("convert-adapter: error:") and "(.*)*x" in err and "\n" not in err


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda w: w.update({"text_embeddings.weight": w["text_embeddings.weight"].astype(mx.int32)}),
            r"text_embeddings\.weight is int32",
        ),
        (
            lambda w: w.update({"projection.weight": mx.full(w["projection.weight"].shape, np.nan)}),
            r"non-finite.*projection\.weight",
        ),
    ],
)
def test_load_csm_refuses_integer_or_non_finite_tensors(tmp_path, edit, match):
    save_csm(base_csm(), tmp_path, layout="mlx")
    edit_weights(tmp_path, "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=match):
        load_csm(tmp_path)


def test_an_unwritable_output_is_one_line_naming_the_file(tmp_path, capsys):
    save_adapters(adapted_csm(), tmp_path / "in", format="mlx-lm")
    (tmp_path / "out" / "adapter_model.safetensors").mkdir(parents=True)  # a directory where the file goes
    assert convert_main([str(tmp_path / "in"), str(tmp_path / "out"), "--to", "peft"]) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot write" in err and "adapter_model.safetensors" in err and "\n" not in err


def test_load_csm_and_save_csm_name_the_file_they_cannot_read_or_write(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors"):
        load_csm(tmp_path)
    (tmp_path / "out" / "model.safetensors").mkdir(parents=True)
    with pytest.raises(OSError, match=r"cannot write .*out/model\.safetensors"):
        save_csm(base_csm(), tmp_path / "out")


@pytest.mark.parametrize(
    "text, match", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object, got list")]
)
def test_a_config_that_is_not_a_json_object_names_the_file(tmp_path, text, match):
    save_adapters(adapted_csm(), tmp_path, format="peft")
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match=r"adapter_config\.json.*" + match):
        read_adapters(tmp_path)
