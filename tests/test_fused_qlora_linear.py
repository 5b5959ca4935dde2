"""The quantized-base op (fused_qlora_linear) against mlx-lm-style plain MLX over the
same nn.QuantizedLinear, reference.py with the dequantized weight, and its checks."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_fused_lora.ops import dropout_mask, fused_qlora_linear, reference

TOL = {mx.float32: 2e-5, mx.float16: 4e-3, mx.bfloat16: 3e-2}


def rel_err(actual, expected):
    actual = np.array(actual.astype(mx.float32))
    expected = np.array(expected.astype(mx.float32))
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-6))


def make(k, n, r, dtype, bits, group_size, bias=True, lead=(3, 5), seed=0):
    mx.random.seed(seed)
    q = nn.QuantizedLinear(k, n, bias=bias, group_size=group_size, bits=bits)
    q.set_dtype(dtype)  # scales, biases and bias in the model's dtype, as mlx-lm loads them
    x = mx.random.normal((*lead, k)).astype(dtype)
    a = mx.random.normal((k, r)) / k**0.5  # float32 adapters, as mlx-lm keeps them
    b = mx.random.normal((r, n)) / r**0.5
    return q, x, a, b


def op(q, scale, p, key):
    def f(x, a, b, bias=None):
        bias = q.get("bias") if bias is None else bias
        return fused_qlora_linear(
            x,
            q.weight,
            q.scales,
            q.biases,
            bias,
            a,
            b,
            group_size=q.group_size,
            bits=q.bits,
            scale=scale,
            dropout=p,
            key=key,
        )

    return f


def mlx_lm_lora(q, scale, mask):
    """mlx-lm's LoRALinear over the same QuantizedLinear, with our mask as its dropout."""

    def f(x, a, b, bias=None):
        dropped = x if mask is None else x * mask.astype(x.dtype)
        return q(x) + (scale * ((dropped @ a) @ b)).astype(x.dtype)

    return f


def dequantized_reference(q, scale, mask):
    w = mx.dequantize(q.weight, q.scales, q.biases, group_size=q.group_size, bits=q.bits)

    def f(x, a, b, bias=None):
        return reference.lora_linear(x, w.astype(x.dtype), q.get("bias"), a, b, scale, mask)

    return f


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize("group_size,k,n,r", [(64, 128, 48, 8), (32, 96, 37, 3), (128, 256, 20, 16)])
def test_forward_and_grads_match_mlx_lm_and_reference(bits, p, dtype, group_size, k, n, r):
    q, x, a, b = make(k, n, r, dtype, bits, group_size)
    key = mx.random.key(5)
    mask = dropout_mask(key, x.shape, p) if p > 0 else None
    fused = op(q, 1.5, p, key)
    y = fused(x, a, b)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], n)
    ct = mx.random.normal(y.shape, key=mx.random.key(9))
    grads = mx.grad(lambda x, a, b: (fused(x, a, b).astype(mx.float32) * ct).sum(), argnums=(0, 1, 2))(x, a, b)
    for peer in (mlx_lm_lora(q, 1.5, mask), dequantized_reference(q, 1.5, mask)):
        assert rel_err(y, peer(x, a, b)) < TOL[dtype]
        peer_grads = mx.grad(
            lambda x, a, b, peer=peer: (peer(x, a, b).astype(mx.float32) * ct).sum(), argnums=(0, 1, 2)
        )(x, a, b)
        for name, g, g_peer, primal in zip(("x", "lora_a", "lora_b"), grads, peer_grads, (x, a, b), strict=True):
            assert g.dtype == primal.dtype, name
            assert rel_err(g, g_peer) < TOL[dtype], name


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_bias_grad_no_bias_and_qlora_reference(p):
    q, x, a, b = make(64, 24, 4, mx.float32, 4, 32)
    key = mx.random.key(1)
    mask = dropout_mask(key, x.shape, p) if p > 0 else None
    fused = op(q, 0.7, p, key)
    ct = mx.random.normal((*x.shape[:-1], 24), key=mx.random.key(4))
    db = mx.grad(lambda bias: (fused(x, a, b, bias) * ct).sum())(q.bias)
    assert rel_err(db, ct.reshape(-1, 24).sum(axis=0)) < 1e-5
    y = fused_qlora_linear(
        x, q.weight, q.scales, q.biases, None, a, b, group_size=32, bits=4, scale=0.7, dropout=p, key=key
    )
    y_ref = reference.qlora_linear(x, q.weight, q.scales, q.biases, None, a, b, 0.7, mask, group_size=32, bits=4)
    assert rel_err(y, y_ref) < TOL[mx.float32]


def test_scales_and_biases_grads_are_mlx_own_when_asked():
    q, x, a, b = make(64, 16, 2, mx.float32, 4, 64)
    key = mx.random.key(2)

    def fused(scales, biases):
        return fused_qlora_linear(
            x, q.weight, scales, biases, None, a, b, group_size=64, bits=4, scale=1.0, dropout=0.1, key=key
        ).sum()

    def plain(scales, biases):
        return mx.quantized_matmul(x, q.weight, scales, biases, group_size=64, bits=4).sum()

    for g, g_plain in zip(
        mx.grad(fused, (0, 1))(q.scales, q.biases), mx.grad(plain, (0, 1))(q.scales, q.biases), strict=True
    ):
        assert rel_err(g, g_plain) < 1e-5


def test_compiled_takes_new_keys():
    q, x, a, b = make(64, 16, 4, mx.float32, 8, 64)

    def f(x, a, b, key):
        return op(q, 2.0, 0.3, key)(x, a, b)

    cf = mx.compile(f)
    for seed in (0, 1):
        assert rel_err(cf(x, a, b, mx.random.key(seed)), f(x, a, b, mx.random.key(seed))) < 1e-6
    assert not mx.array_equal(cf(x, a, b, mx.random.key(0)), cf(x, a, b, mx.random.key(1)))


def test_no_dequantized_weight_in_forward_or_backward():
    """Peak memory of forward + backward stays far below one dequantized float32 copy
    of the weight (16 MiB here): the base products are MLX's quantized matmul."""
    k = n = 2048
    q, x, a, b = make(k, n, 8, mx.float32, 4, 64, bias=False, lead=(4,))
    grad = mx.grad(lambda x, a, b: op(q, 2.0, 0.1, mx.random.key(0))(x, a, b).sum(), argnums=(0, 1, 2))
    mx.eval(q.parameters(), x, a, b, grad(x, a, b))
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(grad(x, a, b))
    assert mx.get_peak_memory() - before < (k * n * 4) // 4


BAD = [
    # (keyword, value, text the message must contain besides the argument name)
    ("bits", 7, "7"),
    ("bits", 4.0, "4.0"),
    ("group_size", 16, "16"),
    ("group_size", 128, "a divisor of K = x.shape[-1] = 64"),
    ("weight", mx.zeros((16, 8)), "float32 array of shape (16, 8)"),
    ("weight", mx.zeros((16, 16), dtype=mx.uint32), "(N, 8) uint32"),
    ("scales", mx.zeros((16, 2)), "(16, 1)"),
    ("biases", mx.zeros((16,)), "1-D"),
    ("scales", mx.zeros((16, 1), dtype=mx.int32), "int32"),
    ("lora_a", mx.zeros((63, 2)), "(63, 2)"),
    ("lora_b", mx.zeros((2, 15)), "(2, 15)"),
    ("bias", mx.zeros((15,)), "(15,)"),
    ("scale", 1e39, "inf in float32"),
    ("dropout", 0.99999999, "0.99999999"),
]


@pytest.mark.parametrize("arg,value,detail", BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD)])
def test_bad_quantization_parameters_are_named(arg, value, detail):
    q, x, a, b = make(64, 16, 2, mx.float32, 4, 64)
    kwargs = dict(
        x=x,
        weight=q.weight,
        scales=q.scales,
        biases=q.biases,
        bias=q.bias,
        lora_a=a,
        lora_b=b,
        group_size=64,
        bits=4,
        scale=1.0,
        dropout=0.1,
        key=mx.random.key(0),
    )
    kwargs[arg] = value
    with pytest.raises(ValueError) as info:
        fused_qlora_linear(**kwargs)
    msg = str(info.value)
    assert msg.startswith("fused_qlora_linear:") and f"`{arg}`" in msg and "must be" in msg and detail in msg, msg


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_jvp_matches_reference(p):
    """Forward mode through the Onto primitive's jvp (x, lora_a, lora_b, bias)."""
    q, x, a, b = make(64, 24, 3, mx.float32, 4, 32)
    key = mx.random.key(1)
    mask = dropout_mask(key, x.shape, p) if p > 0 else None
    primals = [x, a, b, q.bias]
    tangents = [mx.random.normal(t.shape, key=mx.random.key(40 + i)) for i, t in enumerate(primals)]
    _, (ty,) = mx.jvp(lambda x, a, b, bias: op(q, 0.9, p, key)(x, a, b, bias), primals, tangents)
    _, (ty_ref,) = mx.jvp(
        lambda x, a, b, bias: reference.qlora_linear(
            x, q.weight, q.scales, q.biases, bias, a, b, 0.9, mask, group_size=32, bits=4
        ),
        primals,
        tangents,
    )
    assert rel_err(ty, ty_ref) < TOL[mx.float32]


@pytest.mark.parametrize("m,k,n", [(0, 64, 8), (3, 64, 0), (3, 0, 8)])
def test_empty_dimensions_do_not_crash(m, k, n):
    """MLX 0.32.4's quantized_matmul dies of SIGFPE on an empty dimension; the op gives
    the empty product (y = bias for K = 0) and gradients of the right shapes."""
    x = mx.random.normal((m, k))
    weight = mx.zeros((n, k * 4 // 32), dtype=mx.uint32)
    scales = biases = mx.zeros((n, k // 32))
    bias = mx.ones((n,))
    a, b = mx.ones((k, 2)), mx.ones((2, n))

    def f(x, a, b):
        return fused_qlora_linear(x, weight, scales, biases, bias, a, b, group_size=32, bits=4, scale=1.0)

    assert mx.array_equal(f(x, a, b), mx.ones((m, n)))
    grads = mx.grad(lambda *args: f(*args).sum(), argnums=(0, 1, 2))(x, a, b)
    assert [g.shape for g in grads] == [(m, k), (k, 2), (2, n)]
    mx.eval(grads)
