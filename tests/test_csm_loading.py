"""CSM checkpoints: the torchtune, mlx and Hugging Face layouts, built from one random model."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_fused_lora.csm import CSM, CheckpointError, CSMConfig, apply_lora, load_csm, save_csm
from mlx_fused_lora.csm.layouts import detect_layout, permute_rows_from_hf, permute_rows_to_hf
from mlx_fused_lora.csm.model import llama3_rope_frequencies

LAYOUTS = ("torchtune", "mlx", "hf")


@pytest.fixture(scope="module")
def model():
    mx.random.seed(7)
    m = CSM(CSMConfig.tiny())
    # non-trivial norm scales, so a norm loaded into the wrong slot would show
    m.update(
        {
            "backbone": {"norm": {"weight": 1 + 0.1 * mx.random.normal((64,))}},
            "decoder": {"norm": {"weight": 1 + 0.1 * mx.random.normal((32,))}},
        }
    )
    mx.eval(m.parameters())
    return m


@pytest.fixture(scope="module")
def frames(model):
    cfg = model.config
    K = cfg.audio_num_codebooks
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.audio_vocab_size, (2, 6, K + 1)).astype(np.int32)
    mask = np.ones((2, 6, K + 1), np.float32)
    mask[:, ::2, :K] = 0  # text frames
    mask[:, 1::2, K] = 0  # audio frames
    return mx.array(tokens), mx.array(mask)


def outputs(m, frames):
    tokens, mask = frames
    K = m.config.audio_num_codebooks
    h = m(tokens, mask)
    logits = m.codebook_logits(h[:, :-1], tokens[:, 1:, :K])
    return np.array(h), np.array(logits)


def params(m):
    return {k: np.array(v) for k, v in tree_flatten(m.parameters())}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_loads_to_identical_outputs(model, frames, layout, tmp_path):
    save_csm(model, tmp_path, layout=layout)
    keys = mx.load(str(tmp_path / "model.safetensors")).keys()
    assert detect_layout(keys) == layout
    loaded = load_csm(tmp_path)
    assert loaded.checkpoint_layout == layout
    h, logits = outputs(model, frames)
    h2, logits2 = outputs(loaded, frames)
    np.testing.assert_array_equal(h2, h)
    np.testing.assert_array_equal(logits2, logits)
    ref = params(model)
    got = params(loaded)
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_layout_key_names(model, tmp_path):
    names = {}
    for layout in LAYOUTS:
        save_csm(model, tmp_path / layout, layout=layout)
        names[layout] = set(mx.load(str(tmp_path / layout / "model.safetensors")))
    assert {
        "backbone.layers.0.attn.q_proj.weight",
        "backbone.layers.1.attn.output_proj.weight",
        "decoder.layers.0.mlp.w1.weight",
        "decoder.layers.0.mlp.w2.weight",
        "decoder.layers.0.mlp.w3.weight",
        "backbone.layers.0.sa_norm.scale",
        "backbone.layers.0.mlp_norm.scale",
        "backbone.norm.scale",
        "decoder.norm.scale",
        "text_embeddings.weight",
        "audio_embeddings.weight",
        "projection.weight",
        "codebook0_head.weight",
        "audio_head",
    } <= names["torchtune"]
    assert {
        "backbone.layers.0.self_attn.o_proj.weight",
        "backbone.layers.0.mlp.gate_proj.weight",
        "backbone.layers.0.input_layernorm.weight",
        "decoder.norm.weight",
    } <= names["mlx"]
    assert {
        "backbone_model.layers.0.self_attn.q_proj.weight",
        "depth_decoder.model.layers.1.post_attention_layernorm.weight",
        "backbone_model.norm.weight",
        "depth_decoder.model.norm.weight",
        "embed_text_tokens.weight",
        "lm_head.weight",
        "depth_decoder.model.inputs_embeds_projector.weight",
        "depth_decoder.codebooks_head.weight",
        "depth_decoder.model.embed_tokens.weight",
    } <= names["hf"]
    # the tied backbone audio table is stored only on the depth decoder, as Transformers does
    assert "backbone_model.embed_tokens.embed_audio_tokens.weight" not in names["hf"]
    assert len(names["torchtune"]) == len(names["mlx"]) == len(names["hf"])


def hf_permute_reference(w, n_heads):
    """Transformers' convert_csm permutation, written out in numpy."""
    out, dim = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, dim).transpose(0, 2, 1, 3).reshape(out, dim)


def test_hf_qk_are_permuted_for_rotate_half(model, tmp_path):
    save_csm(model, tmp_path, layout="hf")
    hf = mx.load(str(tmp_path / "model.safetensors"))
    cfg = model.config
    wq = np.array(model.backbone.layers[0].self_attn.q_proj.weight)
    wk = np.array(model.decoder.layers[1].self_attn.k_proj.weight)
    hf_q = np.array(hf["backbone_model.layers.0.self_attn.q_proj.weight"])
    hf_k = np.array(hf["depth_decoder.model.layers.1.self_attn.k_proj.weight"])
    np.testing.assert_array_equal(hf_q, hf_permute_reference(wq, cfg.backbone.num_heads))
    np.testing.assert_array_equal(hf_k, hf_permute_reference(wk, cfg.decoder.num_kv_heads))
    assert not np.array_equal(hf_q, wq)
    # v and o are not permuted
    np.testing.assert_array_equal(
        np.array(hf["backbone_model.layers.0.self_attn.v_proj.weight"]),
        np.array(model.backbone.layers[0].self_attn.v_proj.weight),
    )
    np.testing.assert_array_equal(np.array(permute_rows_from_hf(mx.array(hf_q), 4)), wq)
    np.testing.assert_array_equal(np.array(permute_rows_to_hf(mx.array(wq), 4)), hf_q)

    # Why the permutation: rotate-half RoPE on the permuted q/k gives the same attention
    # scores as interleaved RoPE on the original ones.
    fl = cfg.backbone
    hd, H = fl.head_dim, fl.num_heads
    x = np.random.default_rng(0).normal(size=(5, fl.embed_dim)).astype(np.float32)
    inv = np.array(llama3_rope_frequencies(hd, fl.rope_base, fl.rope_scaling))
    theta = np.arange(5)[:, None] * inv[None]
    cos, sin = np.cos(theta), np.sin(theta)

    def interleaved(q):
        out = np.empty_like(q)
        out[..., 0::2] = q[..., 0::2] * cos - q[..., 1::2] * sin
        out[..., 1::2] = q[..., 0::2] * sin + q[..., 1::2] * cos
        return out

    def rotate_half(q):
        c, s = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
        rot = np.concatenate([-q[..., hd // 2 :], q[..., : hd // 2]], -1)
        return q * c + rot * s

    q_orig = interleaved((x @ wq.T).reshape(5, H, hd).transpose(1, 0, 2))
    q_hf = rotate_half((x @ hf_q.T).reshape(5, H, hd).transpose(1, 0, 2))
    scores_orig = q_orig @ q_orig.transpose(0, 2, 1)
    scores_hf = q_hf @ q_hf.transpose(0, 2, 1)
    np.testing.assert_allclose(scores_hf, scores_orig, rtol=1e-4, atol=1e-4)


def test_hf_tied_audio_embedding(model, frames, tmp_path):
    save_csm(model, tmp_path, layout="hf")
    weights = mx.load(str(tmp_path / "model.safetensors"))
    tied = weights["depth_decoder.model.embed_tokens.weight"]
    # both copies present and equal: loads
    both = dict(weights, **{"backbone_model.embed_tokens.embed_audio_tokens.weight": tied})
    mx.save_safetensors(str(tmp_path / "model.safetensors"), both)
    np.testing.assert_array_equal(outputs(load_csm(tmp_path), frames)[0], outputs(model, frames)[0])
    # both present and different: refused, naming both
    both["backbone_model.embed_tokens.embed_audio_tokens.weight"] = tied + 1
    mx.save_safetensors(str(tmp_path / "model.safetensors"), both)
    with pytest.raises(CheckpointError, match="embed_audio_tokens.*depth_decoder.model.embed_tokens"):
        load_csm(tmp_path)


def test_round_trip_is_exact_and_keeps_the_layout(model, tmp_path):
    save_csm(model, tmp_path / "a", layout="hf")
    loaded = load_csm(tmp_path / "a")
    save_csm(loaded, tmp_path / "b")  # layout remembered
    a = mx.load(str(tmp_path / "a" / "model.safetensors"))
    b = mx.load(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert mx.array_equal(a[k], b[k]).item(), k
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == json.loads(
        (tmp_path / "b" / "config.json").read_text()
    )
    assert CSM(CSMConfig.tiny()).checkpoint_layout == "torchtune"  # new models


def test_config_sources(model, frames, tmp_path):
    # hf config.json carries rope_parameters and shapes
    save_csm(model, tmp_path / "hf", layout="hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "llama3"
    assert cfg["depth_decoder_config"]["num_attention_heads"] == model.config.decoder.num_heads
    assert CSMConfig.from_dict(cfg).backbone == model.config.backbone
    # a single file without config.json: shapes identify the (registered) flavours
    save_csm(model, tmp_path / "solo" / "weights.safetensors", layout="torchtune")
    (tmp_path / "solo" / "config.json").unlink()
    loaded = load_csm(tmp_path / "solo" / "weights.safetensors")
    assert loaded.config.backbone == model.config.backbone
    np.testing.assert_array_equal(outputs(loaded, frames)[1], outputs(model, frames)[1])
    # the original CLI's five-argument config
    assert CSMConfig.from_dict(CSMConfig.csm_1b().to_dict()) == CSMConfig.csm_1b()
    assert CSMConfig.csm_1b().to_dict()["backbone_flavor"] == "llama-1B"


def test_dtype_cast(model, tmp_path):
    save_csm(model, tmp_path)
    loaded = load_csm(tmp_path, dtype=mx.bfloat16)
    assert {v.dtype for _, v in tree_flatten(loaded.parameters())} == {mx.bfloat16}


@pytest.mark.parametrize(
    "layout,edit,pattern",
    [
        (
            "torchtune",
            lambda w: w.update({"backbone.layers.0.attn.bogus.weight": mx.zeros((2,))}),
            r"unknown keys.*backbone\.layers\.0\.attn\.bogus\.weight",
        ),
        (
            "torchtune",
            lambda w: w.update({"backbone.layers.5.attn.q_proj.weight": mx.zeros((2,))}),
            r"unknown keys.*backbone\.layers\.5\.attn\.q_proj\.weight",
        ),
        (
            "torchtune",
            lambda w: w.pop("decoder.layers.1.mlp.w2.weight"),
            r"missing keys.*decoder\.layers\.1\.mlp\.w2\.weight",
        ),
        ("hf", lambda w: w.pop("lm_head.weight"), r"missing keys.*lm_head\.weight"),
        (
            "mlx",
            lambda w: w.update({"projection.weight": mx.zeros((32, 63))}),
            r"shape mismatch for projection\.weight: expected \(32, 64\), got \(32, 63\)",
        ),
    ],
)
def test_bad_checkpoint_names_the_key(model, tmp_path, layout, edit, pattern):
    save_csm(model, tmp_path, layout=layout)
    weights = mx.load(str(tmp_path / "model.safetensors"))
    edit(weights)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    with pytest.raises(CheckpointError, match=pattern):
        load_csm(tmp_path)


def test_unrecognised_layout_and_missing_files(tmp_path):
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"foo.bar": mx.zeros((1,))})
    with pytest.raises(CheckpointError, match="cannot tell the checkpoint layout.*foo.bar"):
        load_csm(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_csm(tmp_path / "nowhere")


def test_save_refuses_a_model_with_lora(tmp_path):
    m = CSM(CSMConfig.tiny())
    apply_lora(m, ["q_proj"], r=2, alpha=4)
    with pytest.raises(ValueError, match="LoRA layers.*merge_lora"):
        save_csm(m, tmp_path)
