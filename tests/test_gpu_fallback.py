"""The lean fallback (ops/backends/reference.py) of GPUs without (working) kernels, run on
the CPU stream: its device mask bit for bit against the CPU extension's, the op against
reference.py, and its peak memory against mlx-lm's LoRA layer."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mask_spec import spec_mask
from mlx_fused_lora.ops import layout, reference
from mlx_fused_lora.ops.backends import cpu
from mlx_fused_lora.ops.backends import reference as lean

KEY = mx.array(np.array([123456789, 987654321], dtype=np.uint32))


def bits(a):
    return np.array(a.astype(mx.float32)).view(np.uint32)


@pytest.mark.parametrize("shape", [(37, 150), (3, 5, 7), (11,), (1, 1), (0, 4)], ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.999])
def test_the_device_mask_is_the_cpu_mask_bit_for_bit(shape, p):
    want = cpu.dropout_mask(KEY, shape, p, mx.float32)
    got = lean.device_dropout_mask(KEY, shape, p)
    assert got.shape == want.shape and np.array_equal(bits(got), bits(want))


def test_the_device_mask_past_2_to_the_32():
    """Rows whose flat indices pass 2^32 (row 5000 of 2^20 columns): the carry into the
    high word, as lora_dropout.h computes it (tests/mask_spec.py)."""
    cols, row0 = 2**20, 5000
    got = lean.mask_rows(KEY, row0, 2, cols, 0.5, mx.float32)
    indices = np.arange(2 * cols, dtype=np.uint64) + np.uint64(row0 * cols)
    assert (indices >> np.uint64(32)).min() > 0
    want = spec_mask(*np.array(KEY), indices, 0.5).reshape(2, cols)
    assert np.array_equal(bits(got), want.view(np.uint32))


def test_the_compiled_device_mask_a_gpu_runs_is_the_cpu_mask():
    """On a GPU the mask is one fused kernel (mx.compile); MLX's CPU compile runs the
    same trace here (a C++ compiler, seconds, cached by MLX under /tmp)."""
    got = lean._compiled_mask_rows(mx.float32)(KEY, mx.array(3, dtype=mx.uint64), 5, 150, 0.1)
    want = cpu.dropout_mask(KEY, (8, 150), 0.1, mx.float32)[3:]
    assert np.array_equal(bits(got), bits(want))


def make(dtype, m=37, k=150, n=70, r=16, seed=0):
    rng = np.random.default_rng(seed)

    def arr(shape, scale=1.0):
        return mx.array((scale * rng.standard_normal(shape)).astype(np.float32))

    x, w, b = arr((m, k)).astype(dtype), arr((n, k), 0.1).astype(dtype), arr((n,)).astype(dtype)
    return x, w, b, arr((k, r), 0.1), arr((r, n), 0.5), arr((m, n)).astype(dtype)


def rel_err(got, want):
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    return np.abs(got - want).max() / max(1.0, np.abs(want).max())


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-5), (mx.bfloat16, 2e-2), (mx.float16, 5e-3)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("blocks", [1, 4])
def test_the_lean_op_matches_reference(monkeypatch, dtype, tol, p, blocks):
    """Forward and every gradient (the frozen weight's too), against the float32 oracle
    with the CPU's mask; `blocks` > 1 generates the mask a block of rows at a time."""
    x, w, b, a, bb, ct = make(dtype)
    monkeypatch.setattr(lean, "STEP_ELEMENTS", -(-x.shape[0] // blocks) * x.shape[1])
    mask = cpu.dropout_mask(KEY, x.shape, p, mx.float32) if p > 0 else None

    def fused(x, w, b, a, bb):
        return lean.lean_lora_linear(layout.op_inputs(x, w, b, a, bb, KEY, p), 1.7, p)

    def plain(x, w, b, a, bb):
        return reference.lora_linear(x, w, b, a, bb, 1.7, mask)

    got = mx.vjp(fused, [x, w, b, a, bb], [ct])
    want = mx.vjp(plain, [x, w, b, a, bb], [ct])
    for g, wv in zip([*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        assert g.dtype == wv.dtype and g.shape == wv.shape
        assert rel_err(g, wv) < tol
    assert len(lean.row_blocks(x, KEY, p)) == blocks


def test_the_lean_quantized_op_matches_reference():
    x, w, _, a, bb, ct = make(mx.bfloat16, k=128)
    q = dict(zip(["weight", "scales", "biases"], mx.quantize(w, group_size=64, bits=4), strict=True))
    mask = cpu.dropout_mask(KEY, x.shape, 0.2, mx.float32)
    inputs = layout.q_op_inputs(x, q["weight"], q["scales"], q["biases"], None, a, bb, KEY, 0.2)
    y = lean.lean_qlora_linear(inputs, 1.3, 0.2, group_size=64, bits=4)
    want = reference.qlora_linear(x, *q.values(), None, a, bb, 1.3, mask, group_size=64, bits=4)
    assert rel_err(y, want) < 2e-2
    grads = mx.grad(lambda a, bb: (lean.lean_qlora_linear(inputs._replace(lora_a=a, lora_b=bb), 1.3, 0.2, group_size=64, bits=4) * ct).sum(), argnums=(0, 1))(a, bb)  # fmt: skip
    want_grads = mx.grad(lambda a, bb: (reference.qlora_linear(x, *q.values(), None, a, bb, 1.3, mask, group_size=64, bits=4) * ct).sum(), argnums=(0, 1))(a, bb)  # fmt: skip
    for g, wv in zip(grads, want_grads, strict=True):
        assert rel_err(g, wv) < 2e-2


def peak_mib(loss, params):
    """Peak memory of loss and gradient, MiB above what was allocated before, with MLX's
    evaluation made serial (a memory limit below what is in use): what the step needs,
    not how many operations MLX keeps in flight."""
    mx.synchronize()
    mx.clear_cache()
    limit = mx.set_memory_limit(1)
    try:
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        grads = mx.grad(loss)(params)
        mx.eval(grads)
        return (mx.get_peak_memory() - before) / 2**20
    finally:
        mx.set_memory_limit(limit)


def lean_step(layer, ab, key, h, p):
    return lean.lean_lora_linear(layout.op_inputs(h, layer.linear.weight, None, *ab.values(), key, p), 2.0, p)


def mlx_lm_step(layer, ab, key, h, p):
    layer.update(ab)
    return layer(h)


def old_fallback_step(layer, ab, key, h, p):
    mask = cpu.dropout_mask(key, h.shape, p, mx.float32)
    return reference.lora_linear(h, layer.linear.weight, None, *ab.values(), 2.0, mask)


def stack_peak(step, x, depth, r, p):
    """peak_mib of a stack of `depth` bf16 mlx-lm LoRALinear layers, each run by `step`."""
    from mlx_lm.tuner.lora import LoRALinear

    layers = []
    for _ in range(depth):
        base = nn.Linear(x.shape[1], x.shape[1], bias=False)
        base.set_dtype(mx.bfloat16)
        layers.append(LoRALinear.from_base(base, r=r, dropout=p, scale=2.0))
    keys = [mx.random.key(i) for i in range(depth)]
    params = [{"lora_a": layer.lora_a, "lora_b": layer.lora_b} for layer in layers]
    mx.eval([layer.parameters() for layer in layers], keys)

    def loss(params):
        h = x
        for layer, ab, key in zip(layers, params, keys, strict=True):
            h = step(layer, ab, key, h, p)
        return h.astype(mx.float32).sum()

    return peak_mib(loss, params)


def test_the_fallback_needs_less_memory_than_mlx_lm_and_keeps_no_float32_copy():
    """A stack of bf16 layers with float32 adapters (mlx-lm's default), dropout 0.1,
    trained on the CPU stream by the fallback forced here: its peak stays below mlx-lm's
    LoRALinear (which keeps its dropped x and, for the float32 adapters, a float32 copy
    of it per layer) and well below the old fallback (the float32 oracle with an explicit
    mask, which kept float32 copies of x and W per layer)."""
    x = mx.random.normal((2048, 512), key=mx.random.key(0)).astype(mx.bfloat16)
    mx.eval(x)
    steps = {"lean": lean_step, "mlx-lm": mlx_lm_step, "old fallback": old_fallback_step}
    peaks = {name: [stack_peak(step, x, depth, 16, 0.1) for depth in (1, 3)] for name, step in steps.items()}
    print(peaks)
    per_layer = {name: (v[1] - v[0]) / 2 for name, v in peaks.items()}
    x_f32_mib = x.size * 4 / 2**20
    assert peaks["lean"][1] < 0.9 * peaks["mlx-lm"][1] and peaks["lean"][1] < 0.7 * peaks["old fallback"][1]
    assert per_layer["lean"] < per_layer["mlx-lm"]
    assert per_layer["lean"] < per_layer["old fallback"] - x_f32_mib


def mixed_make(dtype, m=37, k=150, n=70, r=8, count=3, seed=1):
    x, w, b, _, _, ct = make(dtype, m, k, n, r, seed)
    keys = mx.random.split(mx.random.key(seed), 2)
    a = mx.random.normal((count, k, r), key=keys[0]) * 0.1
    bb = mx.random.normal((count, r, n), key=keys[1]) * 0.5
    ids = mx.array((np.arange(m) % (count + 1) - 1).astype(np.int32))  # -1, 0, 1, 2, ...
    return x, w, b, a, bb, ct, ids


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-5), (mx.bfloat16, 2e-2)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("blocks", [1, 4])
def test_the_lean_mixed_op_matches_reference(monkeypatch, dtype, tol, p, blocks):
    """The mixed slots through the same recomputing function (mask regenerated, x's
    dtype), forward and every gradient, the scales' too, against the float32 oracle."""
    x, w, b, a, bb, ct, ids = mixed_make(dtype)
    monkeypatch.setattr(lean, "STEP_ELEMENTS", -(-x.shape[0] // blocks) * x.shape[1])
    scales = mx.array([1.5, -0.5, 2.0])
    mask = cpu.dropout_mask(KEY, x.shape, p, mx.float32) if p > 0 else None

    def fused(x, b, a, bb, scales):
        return lean.lean_lora_linear(layout.mixed_op_inputs(x, w, b, a, bb, KEY, p, scales, ids), 1.0, p)

    def plain(x, b, a, bb, scales):
        return reference.lora_linear(x, w, b, a, bb, scales, mask, ids)

    primals = [x, b, a, bb, scales]
    got, want = mx.vjp(fused, primals, [ct]), mx.vjp(plain, primals, [ct])
    for g, wv in zip([*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        assert g.dtype == wv.dtype and g.shape == wv.shape
        assert rel_err(g, wv) < tol


def test_the_lean_quantized_mixed_op_matches_reference():
    x, w, _, a, bb, ct, ids = mixed_make(mx.bfloat16, k=128)
    q = dict(zip(["weight", "scales", "biases"], mx.quantize(w, group_size=64, bits=4), strict=True))
    mask = cpu.dropout_mask(KEY, x.shape, 0.2, mx.float32)
    scales = mx.array([1.0, 0.5, 2.0])
    slots = layout.q_mixed_op_inputs(x, *q.values(), None, a, bb, KEY, 0.2, scales, ids)

    def fused(a, bb, scales):
        return lean.lean_qlora_linear(slots._replace(lora_a=a, lora_b=bb, lora_scales=scales), 1.0, 0.2, group_size=64, bits=4)  # fmt: skip

    def plain(a, bb, scales):
        return reference.qlora_linear(x, *q.values(), None, a, bb, scales, mask, group_size=64, bits=4, adapter_ids=ids)

    got, want = mx.vjp(fused, [a, bb, scales], [ct]), mx.vjp(plain, [a, bb, scales], [ct])
    for g, wv in zip([*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        assert rel_err(g, wv) < 2e-2


def test_the_lean_mixed_fallback_keeps_no_float32_copy():
    """A stack of bf16 layers with 4 stacked float32 adapters each and dropout 0.1: each
    layer of the lean mixed path adds less to the peak than one of the fallback it
    replaces (the float32 oracle with the stored mask, which kept float32 copies of x, W
    and the mask for the backward) by more than x's float32 copy."""
    m, k, count = 1024, 512, 4
    x = mx.random.normal((m, k), key=mx.random.key(0)).astype(mx.bfloat16)
    ids = mx.array((np.arange(m) * 7 % (count + 1) - 1).astype(np.int32))
    weights = [(mx.random.normal((k, k), key=mx.random.key(i)) / 20).astype(mx.bfloat16) for i in range(3)]
    keys = [mx.random.key(10 + i) for i in range(3)]
    params = [{"a": mx.random.normal((count, k, 16)) * 0.05, "b": mx.zeros((count, 16, k)), "s": mx.ones((count,))}] * 3
    mx.eval(x, ids, weights, keys, params)

    def lean_layer(h, w, p, key):
        return lean.lean_lora_linear(layout.mixed_op_inputs(h, w, None, p["a"], p["b"], key, 0.1, p["s"], ids), 1.0, 0.1)  # fmt: skip

    def old_layer(h, w, p, key):
        mask = cpu.dropout_mask(key, h.shape, 0.1, mx.float32)
        return reference.lora_linear(h, w, None, p["a"], p["b"], p["s"], mask, ids)

    def peak(layer, depth):
        def loss(params):
            h = x
            for w, p, key in zip(weights[:depth], params, keys, strict=False):
                h = layer(h, w, p, key)
            return h.astype(mx.float32).sum()

        return peak_mib(loss, params[:depth])

    per_layer = {name: (peak(layer, 3) - peak(layer, 1)) / 2 for name, layer in (("lean", lean_layer), ("old", old_layer))}  # fmt: skip
    print(per_layer)
    assert per_layer["lean"] < per_layer["old"] - x.size * 4 / 2**20
