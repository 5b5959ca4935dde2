"""mlx-lm integration: FusedLoRALinear as a drop-in for mlx-lm's LoRALinear.

Everything runs on tiny random mlx-lm Llamas; nothing is downloaded. mlx-lm's own
functions are the reference: ``mlx_lm.tuner.utils.linear_to_lora_layers`` (with
its real ``LoRALinear``), ``load_adapters``, the trainer and the ``mlx_lm.lora`` CLI.
"""

import json
import math
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

pytest.importorskip("mlx_lm")

import mlx_fused_lora  # noqa: E402
import mlx_lm.tuner.utils as tuner_utils  # noqa: E402
from mlx_fused_lora import FusedLoRALinear, lm_lora, patch_mlx_lm  # noqa: E402
from mlx_fused_lora.layers.fused_dora_linear import FusedDoRALinear  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.tuner.dora import DoRALinear  # noqa: E402
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear  # noqa: E402
from mlx_lm.tuner.trainer import TrainingArgs, default_loss, iterate_batches, train  # noqa: E402

LLAMA = dict(
    model_type="llama",
    hidden_size=64,
    num_hidden_layers=3,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=128,
    tie_word_embeddings=False,
)
LORA_TYPES = (LoRALinear, FusedLoRALinear, DoRALinear, FusedDoRALinear, LoRAEmbedding)


def mlx_lm_classes(monkeypatch):
    """mlx-lm's own classes under every name patch_mlx_lm replaces, for this test only."""
    for module, name in lm_lora.PATCHED_NAMES:
        cls = getattr(sys.modules[module], name)
        monkeypatch.setattr(sys.modules[module], name, getattr(cls, "original", cls))


@pytest.fixture
def real_mlx_lm(monkeypatch):
    """mlx-lm's tuner with its own LoRALinear and DoRALinear; whatever a test patches is undone after it."""
    mlx_lm_classes(monkeypatch)
    return tuner_utils


def make_llama(seed=0, **overrides):
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs(**{**LLAMA, **overrides}))
    mx.eval(model.parameters())
    return model


def twin(model, **overrides):
    """A second model with the same architecture and the same base weights."""
    other = make_llama(seed=123, **overrides)
    other.load_weights(tree_flatten(model.parameters()))
    mx.eval(other.parameters())
    return other


def lora_modules(model):
    return {path: m for path, m in model.named_modules() if isinstance(m, LORA_TYPES)}


def shapes(tree):
    return {k: tuple(v.shape) for k, v in tree_flatten(tree)}


def randomize_adapters(model, seed=7, std=0.05):
    """Give every trainable (adapter) parameter random values, lora_b included."""
    mx.random.seed(seed)
    new = tree_map(lambda p: std * mx.random.normal(p.shape, dtype=p.dtype), model.trainable_parameters())
    model.update(new)
    mx.eval(model.parameters())


def token_batch(seed=3, batch=2, length=12, vocab=LLAMA["vocab_size"]):
    mx.random.seed(seed)
    tokens = mx.random.randint(0, vocab, shape=(batch, length))
    lengths = mx.array([[0, length - 1]] * batch)
    return tokens, lengths


def assert_trees_close(a, b, rtol, atol):
    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].shape == fb[k].shape, k
        scale = max(float(mx.abs(fb[k]).max()), 1e-12)
        err = float(mx.abs(fa[k] - fb[k]).max())
        assert err <= atol + rtol * scale, f"{k}: max abs err {err:.3g}, max |ref| {scale:.3g}"


def convert_both(real, config, num_layers, use_dora=False, prepare=None, **overrides):
    """(mlx-lm's conversion, ours) of two identical frozen copies of one model."""
    ref = make_llama(**overrides)
    ours = twin(ref, **overrides)
    for m in (ref, ours):
        if prepare is not None:
            prepare(m)  # e.g. quantize the base (QLoRA)
        m.freeze()
    mx.random.seed(11)
    real.linear_to_lora_layers(ref, num_layers, config, use_dora=use_dora)
    mx.random.seed(11)
    mlx_fused_lora.linear_to_lora_layers(ours, num_layers, config, use_dora=use_dora)
    return ref, ours


# --------------------------------------------------------------------------- 1. conversion


@pytest.mark.parametrize(
    "keys, num_layers, use_dora",
    [
        (None, 3, False),  # default keys, every block
        (None, 2, False),  # fewer blocks than the depth
        (None, -1, False),  # the CLI's "all"
        (None, 0, False),  # mlx-lm's max(num_layers, 0): also every block
        (["self_attn.q_proj", "self_attn.v_proj"], 1, False),
        # keys outside the blocks: a linear head and an embedding (mlx-lm's LoRAEmbedding)
        (["mlp.down_proj", "lm_head", "model.embed_tokens"], 2, False),
        (None, 2, True),  # DoRA: FusedDoRALinear where mlx-lm builds its DoRALinear
    ],
)
def test_linear_to_lora_layers_converts_like_mlx_lm(real_mlx_lm, keys, num_layers, use_dora):
    config = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    if keys is not None:
        config["keys"] = keys
    ref, ours = convert_both(real_mlx_lm, config, num_layers, use_dora=use_dora)

    ref_mods, our_mods = lora_modules(ref), lora_modules(ours)
    assert ref_mods, "mlx-lm converted nothing: the case tests nothing"
    assert ref_mods.keys() == our_mods.keys()
    for path, r in ref_mods.items():
        o = our_mods[path]
        if type(r) is LoRALinear:
            assert type(o) is FusedLoRALinear, path
            assert o.scale == r.scale and abs(o.dropout - (1 - r.dropout._p_1)) < 1e-12
            assert o.linear is not None and type(o.linear) is type(r.linear)
        elif type(r) is DoRALinear:
            assert type(o) is FusedDoRALinear, path
            assert o.scale == r.scale and o.linear is not None and type(o.linear) is type(r.linear)
        else:
            assert type(o) is type(r), path
    # Which layers: the last num_layers blocks only.
    n_blocks = len(ref.layers) if num_layers <= 0 else num_layers
    adapted_blocks = {int(p.split(".")[2]) for p in ref_mods if p.startswith("model.layers.")}
    assert adapted_blocks == set(range(len(ref.layers) - n_blocks, len(ref.layers)))

    assert shapes(ours.trainable_parameters()) == shapes(ref.trainable_parameters())
    assert shapes(ours.parameters()) == shapes(ref.parameters())
    # Same initialisation (same RNG draws): lora_a identical, lora_b zeros.
    assert_trees_close(ours.trainable_parameters(), ref.trainable_parameters(), rtol=0, atol=0)


def test_linear_to_lora_layers_requires_scale(real_mlx_lm):
    model = make_llama()
    with pytest.raises(KeyError, match="scale"):
        mlx_fused_lora.linear_to_lora_layers(model, 2, {"rank": 4, "dropout": 0.0})
    with pytest.raises(KeyError, match="alpha"):
        mlx_fused_lora.linear_to_lora_layers(model, 2, {"rank": 4, "alpha": 16, "dropout": 0.0})
    assert not lora_modules(model), "a failed conversion must leave the model untouched"
    with pytest.raises(KeyError, match="scale"):  # as mlx-lm does
        real_mlx_lm.linear_to_lora_layers(model, 2, {"rank": 4, "dropout": 0.0})


# --------------------------------------------------------------------------- 2. parity


@pytest.mark.parametrize("base", ["fp32", "q4"])
def test_logits_and_gradients_match_mlx_lm(real_mlx_lm, base):
    config = {"rank": 8, "scale": 2.0, "dropout": 0.0}
    quantize = (lambda m: nn.quantize(m, group_size=64, bits=4)) if base == "q4" else None
    ref, ours = convert_both(real_mlx_lm, config, num_layers=2, prepare=quantize)
    randomize_adapters(ref)
    # mlx-lm's LoRA parameters go into the fused model unchanged (strict: same names, shapes).
    ours.load_weights(tree_flatten(ref.parameters()), strict=True)
    mx.eval(ours.parameters())
    assert any(type(m) is FusedLoRALinear for m in ours.modules())
    if base == "q4":
        assert isinstance(ours.layers[-1].self_attn.q_proj.linear, nn.QuantizedLinear)

    tokens, lengths = token_batch()
    for m in (ref, ours):
        m.train()  # training mode, p = 0: the path the trainer takes
    ref_logits, our_logits = ref(tokens), ours(tokens)
    assert_trees_close(our_logits, ref_logits, rtol=1e-4, atol=1e-5)
    # The adapters matter: the base model alone gives different logits.
    base = make_llama()  # same seed: the same base weights
    if quantize is not None:
        quantize(base)
    assert float(mx.abs(base(tokens) - ref_logits).max()) > 1e-2

    (ref_loss, _), ref_grads = nn.value_and_grad(ref, default_loss)(ref, tokens, lengths)
    (our_loss, _), our_grads = nn.value_and_grad(ours, default_loss)(ours, tokens, lengths)
    assert abs(float(our_loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert shapes(our_grads) == shapes(ref.trainable_parameters())
    assert all(float(mx.abs(g).max()) > 0 for _, g in tree_flatten(ref_grads))
    assert_trees_close(our_grads, ref_grads, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- 3. adapters


def save_mlx_lm_adapters(model, path, num_layers, lora_parameters):
    """What mlx-lm's trainer writes: trainable parameters + the run's arguments."""
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    config = {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": lora_parameters}
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_mlx_lm_adapters_load_into_fused_model(real_mlx_lm, tmp_path):
    lora_parameters = {"rank": 4, "scale": 8.0, "dropout": 0.05}
    ref, _ = convert_both(real_mlx_lm, lora_parameters, num_layers=2)
    randomize_adapters(ref)
    save_mlx_lm_adapters(ref, tmp_path / "a", 2, lora_parameters)

    fused = make_llama()
    patch_mlx_lm()
    assert issubclass(FusedLoRALinear, tuner_utils.LoRALinear)  # the name now builds ours
    real_mlx_lm.load_adapters(fused, str(tmp_path / "a"))
    mods = lora_modules(fused)
    assert mods.keys() == lora_modules(ref).keys()
    assert all(type(m) is FusedLoRALinear for m in mods.values())
    assert all(m.dropout == 0.05 and m.scale == 8.0 for m in mods.values())

    tokens, _ = token_batch()
    ref.eval(), fused.eval()
    ref_logits = ref(tokens)
    assert_trees_close(fused(tokens), ref_logits, rtol=1e-4, atol=1e-5)
    # mlx-lm's fuse path (mlx_lm.fuse calls m.fuse() on every module that has it).
    for m in (ref, fused):
        fused_layers = [(n, mod.fuse()) for n, mod in m.named_modules() if hasattr(mod, "fuse")]
        m.update_modules(tree_unflatten(fused_layers))
        assert not lora_modules(m)
    assert_trees_close(fused(tokens), ref(tokens), rtol=1e-4, atol=1e-5)
    assert_trees_close(fused(tokens), ref_logits, rtol=1e-3, atol=1e-4)

    # And back: adapters saved from the fused model load into plain mlx-lm.
    ours = make_llama()
    ours.freeze()
    patch_mlx_lm()
    real_mlx_lm.linear_to_lora_layers(ours, 2, lora_parameters)
    randomize_adapters(ours, seed=9)
    save_mlx_lm_adapters(ours, tmp_path / "b", 2, lora_parameters)
    lm_lora.unpatch_mlx_lm()
    plain = make_llama()
    real_mlx_lm.load_adapters(plain, str(tmp_path / "b"))
    assert all(type(m) is LoRALinear for m in lora_modules(plain).values())
    ours.eval(), plain.eval()
    assert_trees_close(ours(tokens), plain(tokens), rtol=1e-4, atol=1e-5)


def test_remove_lora_layers_after_patch(real_mlx_lm):
    model = make_llama()
    base_linear = model.layers[-1].self_attn.q_proj
    patch_mlx_lm()
    patch_mlx_lm()  # idempotent
    real_mlx_lm.linear_to_lora_layers(model, 1, {"rank": 2, "scale": 1.0, "dropout": 0.0})
    assert type(model.layers[-1].self_attn.q_proj) is FusedLoRALinear
    real_mlx_lm.remove_lora_layers(model)
    assert not lora_modules(model)
    assert model.layers[-1].self_attn.q_proj is base_linear


# --------------------------------------------------------------------------- 4. trainer


def synthetic_dataset(n=8, length=24, vocab=LLAMA["vocab_size"]):
    """Learnable sequences in mlx-lm's processed form: (tokens, prompt offset)."""
    data = []
    for i in range(n):
        start, step = 5 + 7 * i, 1 + i % 3
        data.append(([(start + step * t) % vocab for t in range(length)], 0))
    return data


def train_with_mlx_lm(tuner, adapter_file, iters=24, dropout=0.1, check_dropout=None):
    """mlx-lm's conversion + trainer on a tiny Llama; the loss on one fixed batch before and after."""
    model = make_llama(num_hidden_layers=2)
    model.freeze()
    mx.random.seed(5)
    # What mlx_lm.lora.train_model does: mlx-lm's own conversion, then its trainer.
    tuner.linear_to_lora_layers(model, 2, {"rank": 8, "scale": 10.0, "dropout": dropout})
    data = synthetic_dataset()
    batch, lengths = next(iterate_batches(data, batch_size=len(data), max_seq_length=64))

    def loss_on_fixed_batch():
        model.eval()
        loss, _ = default_loss(model, batch, lengths)
        return float(loss)

    if check_dropout is not None:
        check_dropout(model, batch)
    initial = loss_on_fixed_batch()
    reports = []

    class Callback:
        def on_train_loss_report(self, info):
            reports.append(info["train_loss"])

        def on_val_loss_report(self, info):
            pass

    args = TrainingArgs(
        batch_size=4,
        iters=iters,
        steps_per_report=8,
        steps_per_eval=1000,
        steps_per_save=1000,
        max_seq_length=64,
        adapter_file=str(adapter_file),
    )
    mx.random.seed(0)
    train(
        model=model,
        optimizer=optim.Adam(learning_rate=1e-3),
        train_dataset=data,
        args=args,
        training_callback=Callback(),
    )
    return model, initial, loss_on_fixed_batch(), reports


def dropout_is_live_in_training_only(model, batch):
    """A fresh mask per call in training mode, none in eval mode (needs lora_b != 0 to show)."""
    mods = lora_modules(model)
    assert len(mods) == 2 * 7
    assert all(type(m) is FusedLoRALinear and m.dropout == 0.1 for m in mods.values())
    init = model.trainable_parameters()
    randomize_adapters(model, seed=2, std=0.02)
    model.train()
    assert float(mx.abs(model(batch[:2]) - model(batch[:2])).max()) > 0
    model.eval()
    assert float(mx.abs(model(batch[:2]) - model(batch[:2])).max()) == 0
    model.update(init)  # back to mlx-lm's initialisation: lora_b = 0


def test_mlx_lm_trainer_trains_fused_layers(real_mlx_lm, tmp_path):
    # Plain mlx-lm first, as the yardstick (its dropout masks differ, so only roughly).
    _, plain_initial, plain_final, _ = train_with_mlx_lm(real_mlx_lm, tmp_path / "plain.safetensors")

    patch_mlx_lm()
    adapter_file = tmp_path / "adapters.safetensors"
    model, initial, final, reports = train_with_mlx_lm(
        real_mlx_lm, adapter_file, check_dropout=dropout_is_live_in_training_only
    )

    assert all(type(m) is FusedLoRALinear for m in lora_modules(model).values())
    assert initial == pytest.approx(plain_initial, rel=1e-5)  # same start
    assert len(reports) == 3 and all(math.isfinite(r) for r in reports)
    assert final < 0.7 * initial, (initial, final, reports)
    assert abs(final - plain_final) < 0.15 * plain_initial, (final, plain_final)
    saved = mx.load(str(adapter_file))
    assert saved.keys() == dict(tree_flatten(model.trainable_parameters())).keys()


# --------------------------------------------------------------------------- 5. CLI


def write_tiny_model_dir(path, n_layers=2):
    """config.json + random model.safetensors + a word-level tokenizer mlx-lm loads offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    config = {**LLAMA, "num_hidden_layers": n_layers}
    (path / "config.json").write_text(json.dumps(config))
    model = make_llama(num_hidden_layers=n_layers)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))

    words = "the quick brown fox jumps over a lazy dog and cat runs to sleep now".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    return model, words


def write_text_data(path, words, n_train=8, n_valid=4, n_test=4):
    path.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        lines = [json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(10))}) for i in range(n)]
        (path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def test_lm_lora_cli_trains_end_to_end(real_mlx_lm, tmp_path):
    model, words = write_tiny_model_dir(tmp_path / "model")
    write_text_data(tmp_path / "data", words)
    adapters = tmp_path / "adapters"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1"}
    cmd = [
        sys.executable,
        "-m",
        "mlx_fused_lora.lm_lora",
        "--model",
        str(tmp_path / "model"),
        "--train",
        "--data",
        str(tmp_path / "data"),
        "--iters",
        "3",
        "--batch-size",
        "2",
        "--num-layers",
        "1",
        "--val-batches",
        "1",
        "--steps-per-report",
        "1",
        "--learning-rate",
        "1e-3",
        "--adapter-path",
        str(adapters),
        "--grad-checkpoint",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    saved = mx.load(str(adapters / "adapters.safetensors"))
    # Exactly the names plain mlx-lm gives the same run.
    model.freeze()
    real_mlx_lm.linear_to_lora_layers(model, 1, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    expected = shapes(model.trainable_parameters())
    assert {k: tuple(v.shape) for k, v in saved.items()} == expected
    assert all(k.startswith("model.layers.1.") and k.rsplit(".", 1)[1] in ("lora_a", "lora_b") for k in saved)
    assert any(float(mx.abs(v).max()) > 0 for k, v in saved.items() if k.endswith("lora_b")), "no training happened"
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["num_layers"] == 1 and config["lora_parameters"]["scale"] == 20.0

    # --test alone: the CLI rebuilds the layers through mlx-lm's load_adapters.
    cmd = [
        sys.executable,
        "-m",
        "mlx_fused_lora.lm_lora",
        "--model",
        str(tmp_path / "model"),
        "--test",
        "--data",
        str(tmp_path / "data"),
        "--batch-size",
        "2",
        "--test-batches",
        "1",
        "--adapter-path",
        str(adapters),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Test loss" in proc.stdout


def test_lm_lora_main_uses_fused_layers_in_process(real_mlx_lm, tmp_path, monkeypatch):
    """main(argv) drives mlx_lm.lora with FusedLoRALinear layers, and leaves sys.argv alone."""
    import mlx_lm.lora

    _, words = write_tiny_model_dir(tmp_path / "model")
    write_text_data(tmp_path / "data", words)
    seen = {}
    real_train = mlx_lm.lora.train

    def spy_train(model, **kwargs):
        seen["types"] = {type(m) for m in lora_modules(model).values()}
        return real_train(model=model, **kwargs)

    monkeypatch.setattr(mlx_lm.lora, "train", spy_train)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv_before = list(sys.argv)
    lm_lora.main(
        [
            "--model",
            str(tmp_path / "model"),
            "--train",
            "--data",
            str(tmp_path / "data"),
            "--iters",
            "1",
            "--batch-size",
            "2",
            "--num-layers",
            "2",
            "--val-batches",
            "1",
            "--adapter-path",
            str(tmp_path / "adapters"),
        ]
    )
    assert seen["types"] == {FusedLoRALinear}
    assert sys.argv == argv_before
    assert (tmp_path / "adapters" / "adapters.safetensors").exists()

    with pytest.raises(SystemExit) as exc:
        lm_lora.main(["--help"])
    assert exc.value.code == 0
    assert sys.argv == argv_before


def test_python_m_lm_lora_prints_no_runpy_warning():
    """The package does not import lm_lora, so runpy never finds it in sys.modules first."""
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-m", "mlx_fused_lora.lm_lora", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()  # mlx_lm.lora's own parser answered
    assert "found in sys.modules" not in proc.stderr and "RuntimeWarning" not in proc.stderr, proc.stderr
    probe = "import sys, mlx_fused_lora, mlx_fused_lora.layers; print('mlx_fused_lora.lm_lora' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- named adapters


def test_named_adapters_keep_mlx_lm_parameters_and_files_bit_exact(real_mlx_lm, tmp_path):
    """One adapter: exactly mlx-lm's parameters, and a round trip through mlx-lm's own loader
    that is bit-exact, also after a second adapter was added and deleted again."""
    from mlx_fused_lora.adapters import add_adapter, delete_adapter, load_adapters, save_adapters

    config = {"rank": 4, "scale": 2.5, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}
    ref = make_llama()
    ref.freeze()
    real_mlx_lm.linear_to_lora_layers(ref, 2, config)
    ours = make_llama()  # the same seed: the same base weights as ref
    add_adapter(ours, "default", {**config, "num_layers": 2})
    assert shapes(ours.parameters()) == shapes(ref.parameters())
    assert shapes(ours.trainable_parameters()) == shapes(ref.trainable_parameters())
    add_adapter(ours, "other", {"rank": 2, "scale": 1.0})
    assert "model.layers.2.self_attn.q_proj.adapters.other.lora_a" in shapes(ours.parameters())
    delete_adapter(ours, "other")
    assert shapes(ours.parameters()) == shapes(ref.parameters())
    assert shapes(ours.trainable_parameters()) == shapes(ref.trainable_parameters())
    randomize_adapters(ours)
    save_adapters(ours, tmp_path, "mlx-lm")
    theirs = real_mlx_lm.load_adapters(make_llama(), str(tmp_path))  # mlx-lm's loader: model.load_weights
    expected = dict(tree_flatten(ours.trainable_parameters()))
    got = {k: v for k, v in tree_flatten(theirs.parameters()) if ".lora_" in k}
    assert expected.keys() == got.keys()
    for k in expected:
        assert expected[k].dtype == got[k].dtype and mx.array_equal(expected[k], got[k]).item(), k
    back = load_adapters(make_llama(), tmp_path)  # and our loader reads the same file to the same bits
    for k, v in tree_flatten(back.trainable_parameters()):
        assert mx.array_equal(v, expected[k]).item(), k
    tokens, _ = token_batch()
    assert_trees_close(back(tokens), theirs(tokens), rtol=1e-5, atol=1e-5)
