"""The counter-based dropout mask: rate, determinism, independence, and that the op uses it."""

import math

import mlx.core as mx
import numpy as np
import pytest
from mask_spec import spec_bits
from mlx_fused_lora import dropout_mask, fused_lora_linear


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_five_sigma(p):
    n = 512 * 1031
    mask = np.array(dropout_mask(mx.random.key(123), (512, 1031), p))
    kept = (mask != 0).mean()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma, (kept, 1 - p, sigma)
    # kept values are exactly 1/(1-p) in float32, dropped exactly 0
    assert set(np.unique(mask)) == {np.float32(0), np.float32(1) / (np.float32(1) - np.float32(p))}


def test_deterministic_per_key_and_different_across_keys():
    shape = (64, 300)
    key = mx.array([7, 5], dtype=mx.uint32)
    a = dropout_mask(key, shape, 0.3)
    assert mx.array_equal(a, dropout_mask(mx.array([7, 5], dtype=mx.uint32), shape, 0.3))
    # keys differing in the first word only, the second only, and both
    for other in ([8, 5], [7, 6], [5, 7]):
        b = dropout_mask(mx.array(other, dtype=mx.uint32), shape, 0.3)
        agree = (np.array(a != 0) == np.array(b != 0)).mean()
        # independent masks agree on p^2 + (1-p)^2 = 0.58 of elements
        assert abs(agree - 0.58) < 0.02, agree


def test_neighbouring_elements_are_uncorrelated():
    m = np.array(dropout_mask(mx.random.key(9), (256, 1024), 0.5) != 0).astype(np.float64).ravel()
    for lag in (1, 2, 1024):
        c = np.corrcoef(m[:-lag], m[lag:])[0, 1]
        assert abs(c) < 5 / math.sqrt(m.size), (lag, c)


def test_mask_indexes_flat_elements():
    """The mask depends on the flat element index only, not on how x is shaped."""
    key = mx.random.key(1)
    flat = dropout_mask(key, (6, 40), 0.4)
    assert mx.array_equal(dropout_mask(key, (2, 3, 40), 0.4).reshape(6, 40), flat)


def test_p_zero_is_all_ones_and_dtype():
    assert mx.array_equal(dropout_mask(None, (3, 4), 0.0), mx.ones((3, 4)))
    m = dropout_mask(mx.random.key(0), (8, 8), 0.5, dtype=mx.bfloat16)
    assert m.dtype == mx.bfloat16


def test_op_applies_exactly_this_mask():
    """Rows of x that are one-hot probe the mask: the LoRA term of row i sees mask[i, j] * x[i, j]."""
    k, n = 32, 1
    x = mx.eye(k)
    w = mx.zeros((n, k))
    a = mx.ones((k, 1))
    b = mx.ones((1, n))
    key = mx.random.key(42)
    y = fused_lora_linear(x, w, None, a, b, scale=1.0, dropout=0.5, key=key)
    diag = mx.diagonal(dropout_mask(key, (k, k), 0.5))
    assert mx.array_equal(y[:, 0], diag)


@pytest.mark.parametrize("index0", [0, 12345, 2**32 - 37, 2**40 + 3])
def test_hash_follows_its_spec_across_the_32_bit_boundary(index0):
    from mlx_fused_lora import _ext

    count = 100
    index = np.arange(index0, index0 + count, dtype=np.uint64)
    assert np.array_equal(np.array(_ext.testing.dropout_bits(7, 9, index0, count), np.uint32), spec_bits(7, 9, index))
    # the vectorized row kernel (which splits rows at 2^32) keeps exactly these elements
    p = 0.3
    threshold = np.uint32(np.float32(1 - np.float32(p)) * np.float32(2**32))
    kept = np.array(_ext.testing.dropout_row(7, 9, p, index0, count)) != 0
    assert np.array_equal(kept, spec_bits(7, 9, index) < threshold)
