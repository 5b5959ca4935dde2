"""Mixed-adapter batches through a model's layers (`adapters.mixed_batch`): each sequence or token
on its own named adapter equals running it alone with that adapter, forward and every gradient;
one op call per layer; LoRA, DoRA and QLoRA; float32, float16 and bfloat16, dropout on and off; one
adapter, unused ones (exact zero gradients), the empty batch; compiled with the ids as an input; errors named."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_fused_lora.adapters import (
    adapter_ids,
    add_adapter,
    disable_adapters,
    list_adapters,
    mixed_batch,
    set_adapter,
    using_adapters,
)
from mlx_fused_lora.layers import PlainLoRALinear, lora_layers, mixed, named
from mlx_fused_lora.layers import fused_lora_linear as layer_module
from test_named_adapters import Stack, randomize

NAMES = ["alice", "bob", "carol"]


def three_voices(dora=False, quantized=None, dropout=0.0):
    """alice (r 4, every projection), bob (r 2, q_proj only), carol (r 3, v_proj; DoRA if asked),
    all with nonzero lora_b (`randomize`); the base 4-bit quantized in mode ``quantized`` if given."""
    mx.random.seed(0)
    model = Stack(dims=32)
    if quantized:
        nn.quantize(
            model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear) and "head" not in p
        )
    add_adapter(model, "alice", {"rank": 4, "scale": 2.0, "dropout": dropout})
    add_adapter(model, "bob", {"rank": 2, "scale": 0.5, "dropout": dropout, "keys": ["q_proj"]})
    add_adapter(model, "carol", {"rank": 3, "scale": 1.5, "dropout": dropout, "keys": ["v_proj"], "use_dora": dora})
    randomize(model)
    return model


def close(a, b, tol=2e-5):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    assert a.shape == b.shape
    assert np.abs(a - b).max(initial=0) <= tol * max(np.abs(b).max(initial=0), 1e-6)


def adapter_grads(model, loss, *args):
    return dict(tree_flatten(nn.value_and_grad(model, loss)(model, *args)[1]))


@pytest.mark.parametrize("kind", ["lora", "dora", "qlora", "mxfp4"])
def test_each_sequence_equals_its_adapter_alone_forward_and_gradients(kind):
    """mxfp4: a quantization mode without a fused op (plain MLX with the op's mask)."""
    quantized = {"qlora": "affine", "mxfp4": "mxfp4"}.get(kind)
    model = three_voices(dora=kind == "dora", quantized=quantized)
    x = mx.random.normal((5, 6, 32), key=mx.random.key(2))
    names = ["bob", "alice", None, "carol", "bob"]  # repeats, the base, every adapter
    ct = mx.random.normal((5, 6, 7), key=mx.random.key(3))

    def loss(model, x, rows=slice(None)):
        return (model(x[rows]) * ct[rows]).sum()

    with mixed_batch(model, names, trainable=NAMES):  # all three train, DoRA ones too
        y = model(x)
        g_mixed = adapter_grads(model, loss, x)
    assert len(g_mixed) == (18 if kind == "dora" else 16)  # every adapter of every layer, m too
    g_alone = {k: mx.zeros_like(v) for k, v in g_mixed.items()}
    for name in set(names):
        rows = mx.array([i for i, n in enumerate(names) if n == name])
        with using_adapters(model, [] if name is None else name):
            close(y[rows], model(x[rows]))
        if name is None:
            continue
        set_adapter(model, name)  # trained alone: its gradients from its rows only
        for k, v in adapter_grads(model, loss, x, rows).items():
            g_alone[k] = g_alone[k] + v
    assert any(".m" in k for k in g_mixed) == (kind == "dora")
    for k in g_mixed:
        close(g_mixed[k], g_alone[k], 5e-5)


def test_ids_per_token_and_one_op_call_per_layer(monkeypatch):
    model = three_voices()
    calls = []
    for name in ("fused_lora_linear", "fused_qlora_linear"):
        op = getattr(layer_module, name)
        monkeypatch.setattr(layer_module, name, lambda *a, _op=op, **k: calls.append(1) or _op(*a, **k))
    x = mx.random.normal((2, 4, 32), key=mx.random.key(2))
    ids = mx.array([[0, 1, -1, 2], [2, 2, 0, 1]], dtype=mx.int32)
    with mixed_batch(model, ids):
        y = model(x)
    assert len(calls) == len(lora_layers(model)) == 4
    for b in range(2):
        for t in range(4):
            name = None if int(ids[b, t]) < 0 else NAMES[int(ids[b, t])]
            # causal-free model: each token alone
            with using_adapters(model, [] if name is None else name):
                close(y[b, t], model(x[b, t]))


def test_compiled_with_the_ids_as_an_input_and_the_eval_stack_reused(monkeypatch):
    model = three_voices()
    model.eval()
    traces = []

    def forward(x, ids):
        traces.append(1)
        with mixed_batch(model, ids):
            return model(x)

    compiled = mx.compile(forward)
    x = mx.random.normal((3, 2, 32), key=mx.random.key(2))
    for ids in ([0, 1, 2], [2, -1, 0]):
        ids = mx.array(ids, dtype=mx.int32)
        close(compiled(x, ids), forward(x, ids))
    assert len(traces) == 3  # one trace, then two eager calls for the comparison
    stacks = []
    monkeypatch.setattr(mixed, "stack_adapters", lambda *a, _f=mixed.stack_adapters: stacks.append(1) or _f(*a))
    with mixed_batch(model, ["carol", "alice", "bob"]):
        first = model(x)
        assert mx.array_equal(model(x), first).item()
        assert len(stacks) == 4  # once per layer, when the block began
        layer = model.layers[0].q_proj
        holder = named.holders(layer)["alice"]
        holder.lora_b = holder.lora_b * 2  # a swap inside the block: a new array, restacked
        changed = model(x)
    assert len(stacks) == 5  # the changed layer alone restacked
    assert not mx.allclose(changed[1], first[1]).item()  # alice's row sees her new adapter
    assert mx.array_equal(changed[0], first[0]).item() and mx.array_equal(changed[2], first[2]).item()
    with using_adapters(model, "alice"):
        close(changed[1], model(x[1]))


def test_dropout_is_one_mask_and_rate_per_layer():
    model = three_voices(dropout=0.2)
    model.train()
    x = mx.random.normal((3, 2, 32), key=mx.random.key(2))
    with mixed_batch(model, ["alice", "bob", "carol"], trainable=NAMES):
        mx.random.seed(4)
        a = model(x)
        mx.random.seed(4)
        b = model(x)
        c = model(x)
    assert mx.array_equal(a, b).item() and not mx.array_equal(a, c).item()
    named.holders(model.layers[0].q_proj)["bob"].dropout = 0.3
    with pytest.raises(ValueError, match="different dropout rates"), mixed_batch(model, [0, 1, 2], trainable=NAMES):
        model(x)


def test_base_rows_disabled_and_adapter_ids():
    model = three_voices()
    x = mx.random.normal((2, 3, 32), key=mx.random.key(2))
    with disable_adapters(model):
        base = model(x)
        with mixed_batch(model, ["alice", "bob"]):
            assert mx.array_equal(model(x), base).item()
    with mixed_batch(model, [None, None]):
        close(model(x), base)
    assert adapter_ids(model, ["carol", None, "alice"]).tolist() == [2, -1, 0]
    assert list_adapters(model) == NAMES
    with mixed_batch(model, mx.array([1, 0], dtype=mx.uint8)):
        with using_adapters(model, "bob"):
            expected = model(x[0])
    with mixed_batch(model, mx.array([1, 0], dtype=mx.uint8)):
        close(model(x)[0], expected)


def test_errors_are_named():
    model = three_voices()
    x = mx.random.normal((2, 3, 32), key=mx.random.key(2))
    with pytest.raises(KeyError, match="no adapter named 'dave'"):
        with mixed_batch(model, ["alice", "dave"]):
            pass
    with pytest.raises(ValueError, match="`adapter_ids` must be an integer array"):
        with mixed_batch(model, mx.array([0.0, 1.0])):
            pass
    with pytest.raises(ValueError, match=r"layers.0.q_proj: mixed_batch's adapter_ids have shape \(3,\)"):
        with mixed_batch(model, ["alice", "bob", "carol"]):
            model(x)
    with pytest.raises(ValueError, match="no one weight to fold"), mixed_batch(model, ["alice", "bob"]):
        model.layers[0].q_proj.fuse()
    with mixed_batch(model, mx.array([0, 3], dtype=mx.int32)):
        y = model(x)
    with pytest.raises(RuntimeError, match=r"adapter_ids must be in \[-1, [23]\)"):  # a layer holding 2: its range
        mx.eval(y)
    plain = Stack()
    plain.layers[0].q_proj = PlainLoRALinear.from_base(plain.layers[0].q_proj, r=2)
    with pytest.raises(TypeError, match="layers.0.q_proj is a PlainLoRALinear"), mixed_batch(plain, mx.array([0, 0])):
        pass


TOL = {mx.float32: 5e-5, mx.float16: 4e-3, mx.bfloat16: 3e-2}


def every_projection(kind, dtype, dropout):
    """alice (r 4), bob (r 2), carol (r 3; DoRA for ``kind`` dora) on every projection, so a
    row's layers draw their dropout keys alike mixed and alone; the base in ``dtype``."""
    mx.random.seed(0)
    model = Stack(dims=32)
    model.set_dtype(dtype)
    if kind == "qlora":
        nn.quantize(
            model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear) and "head" not in p
        )
    for name, rank, scale in zip(NAMES, (4, 2, 3), (2.0, 0.5, 1.5), strict=True):
        add_adapter(
            model,
            name,
            {"rank": rank, "scale": scale, "dropout": dropout, "use_dora": kind == "dora" and name == "carol"},
        )
    randomize(model)
    return model


@pytest.mark.parametrize("kind", ["lora", "dora", "qlora"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_mixed_equals_each_row_alone_across_dtypes_and_dropout(kind, dtype, p):
    """Training mode, the same seed mixed and alone: the same key per layer, so the same mask;
    bob's rows repeat, carol's never come (her gradients: exact zeros), row 1 is the base."""
    model = every_projection(kind, dtype, p)
    model.train()
    x = mx.random.normal((4, 5, 32), key=mx.random.key(2)).astype(dtype)
    names = ["bob", None, "alice", "bob"]
    ct = mx.random.normal((4, 5, 7), key=mx.random.key(3)).astype(dtype)

    def loss(model, rows):
        mx.random.seed(5)  # the layers' dropout keys
        return (model(x)[rows].astype(mx.float32) * ct[rows]).sum()

    everyone = mx.arange(4)
    with mixed_batch(model, names, trainable=NAMES):
        mx.random.seed(5)
        y = model(x)
        g_mixed = adapter_grads(model, loss, everyone)
    assert y.dtype == dtype
    with disable_adapters(model):
        close(y[1], model(x)[1], TOL[dtype])
    g_alone = {k: mx.zeros_like(v) for k, v in g_mixed.items()}
    for name in ("alice", "bob"):
        rows = mx.array([i for i, n in enumerate(names) if n == name])
        set_adapter(model, name)  # alone, on the whole batch (the same mask), its rows taken
        mx.random.seed(5)
        close(y[rows], model(x)[rows], TOL[dtype])
        for k, v in adapter_grads(model, loss, rows).items():
            g_alone[k] = g_alone[k] + v
    carol = [k for k in g_mixed if ".carol." in k]
    assert len(carol) == (12 if kind == "dora" else 8)  # lora_a, lora_b (and m) of 4 layers
    for k in g_mixed:
        if k in carol:
            assert mx.array_equal(g_mixed[k], mx.zeros_like(g_mixed[k])).item(), k  # unused: exact zeros
        else:
            close(g_mixed[k], g_alone[k], 4 * TOL[dtype])


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_one_adapter_and_the_empty_batch(dora):
    mx.random.seed(0)
    model = Stack(dims=32)
    add_adapter(model, "solo", {"rank": 4, "scale": 2.0, "use_dora": dora})
    randomize(model)
    x = mx.random.normal((3, 5, 32), key=mx.random.key(2))
    with mixed_batch(model, mx.array([0, -1, 0], dtype=mx.int32)):
        y = model(x)
    close(y[::2], model(x[::2]))
    with disable_adapters(model):
        close(y[1], model(x[1]))

    def loss(model, x):
        with mixed_batch(model, mx.zeros((x.shape[0],), dtype=mx.int32)):
            return model(x).sum()

    empty = mx.zeros((0, 5, 32))
    with mixed_batch(model, mx.zeros((0,), dtype=mx.int32)):
        assert model(empty).shape == (0, 5, 7)
    grads = adapter_grads(model, loss, empty)
    assert len(grads) == (12 if dora else 8)
    assert all(mx.array_equal(g, mx.zeros_like(g)).item() for g in grads.values())
