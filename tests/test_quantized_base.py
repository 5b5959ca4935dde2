"""The CPU quantized base product (csrc/cpu/quantized_base.h): x @ W.T and dY @ W for an
affine-quantized W, a tile of W's rows dequantized at a time into BLAS GEMMs, held to
mx.dequantize + matmul and to mx.quantized_matmul."""

import mlx.core as mx
import pytest
from mlx_fused_lora._extension import _ext
from mlx_fused_lora.ops import fused_qlora_linear, reference

F32 = mx.float32
# Two paths: up to 16 rows of x skip the BLAS (each thread dequantizes its own rows or
# column groups of W); more go through BLAS GEMMs a tile of W at a time. K = 2048 makes
# the tile 128 rows (1 MiB of float32), so N = 301 is three tiles, the last one partial;
# K = 128 one tile.
SHAPES = [(37, 2048, 301), (7, 2048, 301), (1, 128, 33), (20, 128, 96)]


def quantized(n, k, group_size, bits, scales_dtype=F32, seed=0):
    mx.random.seed(seed)
    w, scales, biases = mx.quantize(mx.random.normal((n, k)).astype(scales_dtype), group_size=group_size, bits=bits)
    return w, scales, biases


def dequantized(w, scales, biases, group_size, bits):
    """W in float32, from float32 scales: the exact values the quantization holds."""
    return mx.dequantize(w, scales.astype(F32), biases.astype(F32), group_size=group_size, bits=bits)


def ours(x, w, scales, biases, group_size, bits, transpose):
    return _ext.quantized_base_matmul(
        x, w, scales, biases, group_size=group_size, bits=bits, transpose=transpose, stream=mx.cpu
    )


def assert_close(a, b, rtol, what):
    a, b = a.astype(F32), b.astype(F32)
    err = mx.abs(a - b).max().item() if a.size else 0.0
    bound = rtol * (mx.abs(b).max().item() if b.size else 0.0) + 1e-6
    assert err <= bound, f"{what}: max |diff| {err:.3g} > {bound:.3g}"


# rounding of the output dtype (float32: of sums over K = 2048 in another order),
# relative to the largest entry
RTOL = {F32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [F32, mx.float16, mx.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_both_products_match_dequantize_and_matmul(bits, group_size, dtype, m, k, n):
    w, scales, biases = quantized(n, k, group_size, bits)
    dense = dequantized(w, scales, biases, group_size, bits)
    mx.random.seed(1)
    x, dy = mx.random.normal((m, k)).astype(dtype), mx.random.normal((m, n)).astype(dtype)
    y = ours(x, w, scales, biases, group_size, bits, transpose=True)
    dx = ours(dy, w, scales, biases, group_size, bits, transpose=False)
    assert (y.shape, y.dtype, dx.shape, dx.dtype) == ((m, n), dtype, (m, k), dtype)
    assert_close(y, x.astype(F32) @ dense.T, RTOL[dtype], "x @ W.T")
    assert_close(dx, dy.astype(F32) @ dense, RTOL[dtype], "dY @ W")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_both_products_match_mlx_quantized_matmul(bits, group_size, m, k, n):
    w, scales, biases = quantized(n, k, group_size, bits)
    mx.random.seed(2)
    x, dy = mx.random.normal((m, k)), mx.random.normal((m, n))
    q = dict(group_size=group_size, bits=bits)
    assert_close(
        ours(x, w, scales, biases, transpose=True, **q), mx.quantized_matmul(x, w, scales, biases, **q), 1e-5, "fwd"
    )
    expected = mx.quantized_matmul(dy, w, scales, biases, transpose=False, **q)
    assert_close(ours(dy, w, scales, biases, transpose=False, **q), expected, 1e-5, "bwd")


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 6])
def test_the_other_bit_widths_unpack_as_mlx_packs_them(bits):
    """3, 5 and 6 bits cross byte boundaries in MLX's little-endian bit stream."""
    w, scales, biases = quantized(37, 256, 64, bits)
    mx.random.seed(3)
    x = mx.random.normal((5, 256))
    assert_close(ours(x, w, scales, biases, 64, bits, True), x @ dequantized(w, scales, biases, 64, bits).T, 2e-6, "y")


@pytest.mark.parametrize("scales_dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
def test_half_precision_scales_as_a_half_precision_layer_holds_them(scales_dtype):
    w, scales, biases = quantized(40, 256, 64, 4, scales_dtype=scales_dtype)
    assert scales.dtype == scales_dtype
    mx.random.seed(4)
    x = mx.random.normal((6, 256))
    assert_close(ours(x, w, scales, biases, 64, 4, True), x @ dequantized(w, scales, biases, 64, 4).T, 2e-6, "y")


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
def test_a_16_bit_x_longer_than_one_row_block(dtype):
    """A 16-bit x is widened 256 rows at a time here (2 MiB / 2048 columns): 300 rows are
    two blocks, the second partial."""
    w, scales, biases = quantized(130, 2048, 64, 4)
    dense = dequantized(w, scales, biases, 64, 4)
    mx.random.seed(5)
    x, dy = mx.random.normal((300, 2048)).astype(dtype), mx.random.normal((300, 130)).astype(dtype)
    assert_close(ours(x, w, scales, biases, 64, 4, True), x.astype(F32) @ dense.T, RTOL[dtype], "x @ W.T")
    assert_close(ours(dy, w, scales, biases, 64, 4, False), dy.astype(F32) @ dense, RTOL[dtype], "dY @ W")


@pytest.mark.parametrize("m, n", [(0, 64), (3, 0), (0, 0)])
def test_empty_dimensions_give_the_empty_product(m, n):
    k = 128
    w = mx.zeros((n, k * 4 // 32), dtype=mx.uint32)
    scales = biases = mx.ones((n, k // 64))
    x, dy = mx.ones((m, k)), mx.ones((m, n))
    y = ours(x, w, scales, biases, 64, 4, True)
    dx = ours(dy, w, scales, biases, 64, 4, False)
    assert y.shape == (m, n) and dx.shape == (m, k)
    # An empty sum over N is zeros, not uninitialized memory.
    assert mx.array_equal(dx, mx.zeros((m, k))).item()


def test_the_derivatives_are_those_of_the_dequantized_product():
    """jvp along x, scales and biases, and vjp of x, scales and biases (the latter through
    MLX's quantized_matmul) against the same function of a dense W."""
    group_size, bits = 64, 4
    w, scales, biases = quantized(48, 128, group_size, bits)
    mx.random.seed(6)
    x, tx = mx.random.normal((5, 128)), mx.random.normal((5, 128))
    ts, tb = mx.random.normal(scales.shape), mx.random.normal(biases.shape)

    def dense_product(x, s, b):
        return x @ mx.dequantize(w, s, b, group_size=group_size, bits=bits).T

    def our_product(x, s, b):
        return ours(x, w, s, b, group_size, bits, True)

    _, (t_ours,) = mx.jvp(our_product, [x, scales, biases], [tx, ts, tb])
    _, (t_dense,) = mx.jvp(dense_product, [x, scales, biases], [tx, ts, tb])
    assert_close(t_ours, t_dense, 1e-5, "jvp")
    cot = mx.random.normal((5, 48))
    _, g_ours = mx.vjp(our_product, [x, scales, biases], [cot])
    _, g_dense = mx.vjp(dense_product, [x, scales, biases], [cot])
    for a, b, name in zip(g_ours, g_dense, ("x", "scales", "biases"), strict=True):
        assert_close(a, b, 1e-5, f"d{name}")


def test_no_dequantized_copy_of_the_whole_weight():
    """Peak memory of x @ W.T beyond its inputs and output: one tile of W (1 MiB of
    float32 at K = 2048), far below the 16 MiB a dequantized W would take."""
    n = k = 2048
    w, scales, biases = quantized(n, k, 64, 4)
    x = mx.random.normal((64, k))
    mx.eval(w, scales, biases, x)
    for transpose, inp in ((True, x), (False, mx.random.normal((64, n))), (True, x[:4])):
        mx.eval(inp)
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        out = ours(inp, w, scales, biases, 64, 4, transpose)
        mx.eval(out)
        extra = mx.get_peak_memory() - before - out.nbytes
        assert extra <= 1.25 * 2**20, f"transpose={transpose}: {extra / 2**20:.2f} MiB beyond the output"


@pytest.mark.parametrize("m", [40, 9])
def test_fused_qlora_linear_over_several_tiles_matches_the_reference(m):
    """The whole op (forward and gradients, with dropout) where W is four tiles (K = 1024),
    through the BLAS path (40 rows) and the direct one (9 rows)."""
    group_size, bits, p = 64, 4, 0.1
    w, scales, biases = quantized(1000, 1024, group_size, bits)
    mx.random.seed(7)
    x = mx.random.normal((m, 1024))
    a, b = 0.05 * mx.random.normal((1024, 8)), 0.05 * mx.random.normal((8, 1000))
    bias, key = mx.random.normal((1000,)), mx.random.key(3)
    mask = _ext.dropout_mask(key, [m, 1024], p, F32, stream=mx.cpu)
    probe = mx.random.normal((m, 1000))
    q = dict(group_size=group_size, bits=bits)

    def fused(x, a, b):
        y = fused_qlora_linear(x, w, scales, biases, bias, a, b, scale=2.0, dropout=p, key=key, **q)
        return (y * probe).sum()

    def oracle(x, a, b):
        dense = dequantized(w, scales, biases, **q)
        return (reference.lora_linear(x, dense, bias, a, b, 2.0, mask) * probe).sum()

    (v, g), (v_ref, g_ref) = (mx.value_and_grad(f, argnums=(0, 1, 2))(x, a, b) for f in (fused, oracle))
    assert abs(v.item() - v_ref.item()) <= 1e-4 * abs(v_ref.item()) + 1e-3
    for got, want, name in zip(g, g_ref, ("x", "lora_a", "lora_b"), strict=True):
        assert_close(got, want, 1e-5, f"d{name}")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(bits=7), "bits must be"),
        (dict(group_size=48), "group_size must be"),
        (dict(x_cols=100), "x must be (M, K) = (M, 128)"),
        (dict(transpose=False), "x must be (M, N) = (M, 16)"),
    ],
)
def test_bad_input_is_named(kwargs, words):
    w, scales, biases = quantized(16, 128, 64, 4)
    x = mx.ones((2, kwargs.pop("x_cols", 128)))
    args = dict(group_size=64, bits=4, transpose=True) | kwargs
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        _ext.quantized_base_matmul(x, w, scales, biases, **args)
