"""Every bad input raises a ValueError naming the argument, before any kernel runs."""

import math

import mlx.core as mx
import pytest
from mlx_fused_lora import FusedLoRALinear, dropout_mask, fused_lora_linear

K, N, R = 16, 12, 4


def good():
    return dict(
        x=mx.zeros((3, K)),
        weight=mx.zeros((N, K)),
        bias=mx.zeros((N,)),
        lora_a=mx.zeros((K, R)),
        lora_b=mx.zeros((R, N)),
        scale=2.0,
        dropout=0.1,
        key=mx.random.key(0),
    )


def call(**kw):
    args = good()
    args.update(kw)
    return fused_lora_linear(
        args["x"],
        args["weight"],
        args["bias"],
        args["lora_a"],
        args["lora_b"],
        scale=args["scale"],
        dropout=args["dropout"],
        key=args["key"],
    )


BAD = [
    # (argument, bad value, text the message must contain besides the argument name)
    ("x", mx.zeros(()), "0-d"),
    ("x", mx.zeros((3, K), dtype=mx.int32), "int32"),
    ("x", [[1.0] * K], "list"),
    ("weight", mx.zeros((N, K + 1)), f"({N}, {K + 1})"),
    ("weight", mx.zeros((N * K,)), "1-D"),
    ("weight", mx.zeros((N, K), dtype=mx.float16), "float16"),
    ("bias", mx.zeros((N + 1,)), f"({N + 1},)"),
    ("bias", mx.zeros((N,), dtype=mx.bfloat16), "bfloat16"),
    ("lora_a", mx.zeros((K + 2, R)), f"({K + 2}, {R})"),
    ("lora_a", mx.zeros((K, 0)), f"({K}, 0)"),
    ("lora_a", mx.zeros((K, R), dtype=mx.uint8), "uint8"),
    ("lora_b", mx.zeros((R + 1, N)), f"({R + 1}, {N})"),
    ("lora_b", mx.zeros((R, N - 1)), f"({R}, {N - 1})"),
    ("scale", math.inf, "inf"),
    ("scale", math.nan, "nan"),
    ("scale", "2", "str"),
    ("scale", mx.array(2.0), "array"),
    ("dropout", 1.0, "1.0"),
    ("dropout", -0.1, "-0.1"),
    ("dropout", math.nan, "nan"),
    ("key", None, "None"),
    ("key", mx.zeros((2,), dtype=mx.int32), "int32"),
    ("key", mx.zeros((3,), dtype=mx.uint32), "(3,)"),
]


@pytest.mark.parametrize("arg,value,detail", BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD)])
def test_bad_input_names_argument_expected_and_actual(arg, value, detail):
    with pytest.raises(ValueError) as info:
        call(**{arg: value})
    msg = str(info.value)
    assert f"`{arg}`" in msg and "must be" in msg and detail in msg, msg


def test_key_not_needed_without_dropout():
    out = call(dropout=0.0, key=None)
    assert out.shape == (3, N)


def test_dropout_mask_validates_too():
    with pytest.raises(ValueError, match="`key`"):
        dropout_mask(None, (2, 2), 0.5)
    with pytest.raises(ValueError, match="`dropout`"):
        dropout_mask(mx.random.key(0), (2, 2), 1.5)


def test_layer_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="`dropout`"):
        FusedLoRALinear(8, 8, dropout=1.0)
    with pytest.raises(ValueError, match="`r`"):
        FusedLoRALinear(8, 8, r=0)
