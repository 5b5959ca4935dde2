"""QLoRA: FusedLoRALinear over an nn.QuantizedLinear, against mlx-lm's LoRALinear and reference.py.

mlx-lm's layer over the same quantized base is the reference; with dropout it gets our
mask (`dropout_mask` under the key the fused layer draws) in place of its nn.Dropout.
`reference.lora_linear` over the exactly dequantized weight (float32 scales) is the
second oracle.
"""

import warnings

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

pytest.importorskip("mlx_lm")

from mlx_fused_lora import FusedLoRALinear  # noqa: E402
from mlx_fused_lora.layers.fused_lora_linear import draw_dropout_key  # noqa: E402
from mlx_fused_lora.ops import dropout_mask, reference  # noqa: E402
from mlx_lm.tuner.lora import LoRALinear  # noqa: E402
from test_dora import FixedMask, assert_close, dense, grads, make_base  # noqa: E402


def paired(bits, bias=True, dropout=0.0, r=8, scale=2.0, dtype=mx.float32, input_dims=128, output_dims=96):
    """mlx-lm's LoRALinear and ours over one quantized base, with the same non-trivial adapters."""
    base = make_base(f"q{bits}", input_dims=input_dims, output_dims=output_dims, bias=bias, dtype=dtype)
    ref = LoRALinear.from_base(base, r=r, dropout=dropout, scale=scale)
    ours = FusedLoRALinear.from_base(base, r=r, dropout=dropout, scale=scale)
    ref.lora_b = 0.1 * mx.random.normal(ref.lora_b.shape)
    ours.update({"lora_a": ref.lora_a, "lora_b": ref.lora_b})
    for layer in (ref, ours):
        layer.freeze()
        layer.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    mx.eval(ref.parameters(), ours.parameters())
    return ref, ours


def mask_for(seed, shape, p):
    """The mask the fused layer uses when the random state is at `seed` before its call."""
    mx.random.seed(seed)
    return dropout_mask(draw_dropout_key(), shape, p)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_outputs_and_grads_match_mlx_lm(bits, bias, dropout):
    mx.random.seed(1)
    ref, ours = paired(bits, bias=bias, dropout=dropout)
    x = mx.random.normal((2, 7, 128))
    seed = 21
    if dropout > 0:
        ref.dropout = FixedMask(mask_for(seed, x.shape, dropout))
    y_ref, gx_ref, gp_ref = grads(ref, x, seed)
    y, gx, gp = grads(ours, x, seed)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert_close(y, y_ref, 1e-5, 1e-5, "y")
    assert_close(gx, gx_ref, 1e-5, 1e-5, "dx")
    assert set(gp) == set(gp_ref) == {"lora_a", "lora_b"}
    for name in gp:
        assert gp[name].dtype == gp_ref[name].dtype
        assert_close(gp[name], gp_ref[name], 1e-4, 1e-5, f"d{name}")


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bits", [4, 8])
def test_outputs_and_grads_match_reference(bits, dropout):
    mx.random.seed(2)
    _, ours = paired(bits, dropout=dropout)
    x = mx.random.normal((9, 128))
    seed = 5
    mask = mask_for(seed, x.shape, dropout) if dropout > 0 else None
    w = dense(ours.linear)

    def ref_loss(x, a, b):
        y = reference.lora_linear(x, w, ours.linear.bias, a, b, ours.scale, mask)
        return (y * mx.cos(mx.arange(y.size).reshape(y.shape))).sum(), y

    (_, y_ref), g_ref = mx.value_and_grad(ref_loss, argnums=(0, 1, 2))(x, ours.lora_a, ours.lora_b)
    y, gx, gp = grads(ours, x, seed)
    assert_close(y, y_ref, 1e-5, 1e-5, "y vs reference")
    for got, want, name in zip((gx, gp["lora_a"], gp["lora_b"]), g_ref, ("dx", "dlora_a", "dlora_b"), strict=True):
        assert_close(got, want, 1e-4, 1e-5, f"{name} vs reference")


def test_bf16_base_and_activations_match_mlx_lm():
    """MLX's CPU quantized_matmul (mlx-lm's path) rounds a bf16 base product in bf16; ours
    accumulates in float32 (tiles of W dequantized into BLAS GEMMs). So y is held to the
    float32 oracle, and to mlx-lm within mlx-lm's own distance from that oracle (measured
    0.053 at |y| ~ 2, ours 0.007)."""
    mx.random.seed(3)
    ref, ours = paired(4, dtype=mx.bfloat16)
    x = mx.random.normal((6, 128)).astype(mx.bfloat16)
    y_ref, gx_ref, gp_ref = grads(ref, x, 0)
    y, gx, gp = grads(ours, x, 0)
    assert y.dtype == mx.bfloat16 and gx.dtype == mx.bfloat16
    f32 = mx.float32
    y_exact = reference.lora_linear(
        x.astype(f32), dense(ref.linear), ref.linear.bias, ref.lora_a, ref.lora_b, ref.scale
    )
    assert_close(y, y_exact, 1e-2, 1e-2, "bf16 y against the float32 oracle")
    mlx_lm_error = mx.abs(y_ref.astype(f32) - y_exact).max().item()
    assert_close(y, y_ref, 2e-2, 1e-2 + mlx_lm_error, "bf16 y")
    assert_close(gx, gx_ref, 2e-2, 1e-2, "bf16 dx")
    for name in gp:
        assert_close(gp[name], gp_ref[name], 2e-2, 1e-2, f"bf16 d{name}")


@pytest.mark.parametrize("bits", [4, 8])
def test_from_base_keeps_the_quantized_layer(bits):
    mx.random.seed(4)
    base = make_base(f"q{bits}", input_dims=256, output_dims=64)
    ref = LoRALinear.from_base(base, r=4)
    ours = FusedLoRALinear.from_base(base, r=4)
    assert ours.linear is base
    assert ours.lora_a.shape == (256, 4) and ours.lora_b.shape == (4, 64)
    expected = {k: (v.shape, v.dtype) for k, v in tree_flatten(ref.parameters())}
    assert {k: (v.shape, v.dtype) for k, v in tree_flatten(ours.parameters())} == expected


@pytest.mark.parametrize("bits", [4, 8])
def test_fuse_round_trip(bits):
    """fuse(dequantize=True) is the layer; fuse() re-quantizes with the base's settings."""
    mx.random.seed(5)
    _, ours = paired(bits, scale=20.0)
    ours.eval()
    x = mx.random.normal((5, 128))
    y = ours(x)
    exact = ours.fuse(dequantize=True)
    assert type(exact) is nn.Linear
    assert_close(exact(x), y, 1e-5, 1e-4, "fuse(dequantize=True)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # this delta is far above the step: no warning
        requantized = ours.fuse()
    assert isinstance(requantized, nn.QuantizedLinear)
    assert (requantized.bits, requantized.group_size) == (bits, ours.linear.group_size)
    # The re-quantized layer is exactly the quantization of the exact fold.
    expected = nn.QuantizedLinear.from_linear(exact, ours.linear.group_size, bits)
    assert mx.array_equal(requantized.weight, expected.weight).item()
    assert mx.array_equal(requantized.scales, expected.scales).item()
    assert mx.array_equal(requantized.biases, expected.biases).item()
    assert mx.array_equal(requantized.bias, ours.linear.bias).item()


def test_fuse_warns_when_the_delta_is_below_the_step():
    mx.random.seed(6)
    _, ours = paired(4, scale=1e-4)
    with pytest.warns(UserWarning, match="quantization step"):
        ours.fuse()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.fuse(dequantize=True)  # nothing is rounded away: no warning


# -- a 4-bit model through mlx-lm's trainer, on fused layers --


@pytest.mark.parametrize("use_dora", [False, True])
def test_mlx_lm_trainer_trains_a_4bit_model_on_fused_layers(monkeypatch, tmp_path, use_dora):
    import mlx.optimizers as optim
    import mlx_lm.tuner.utils as tuner_utils
    from mlx_fused_lora.layers.fused_dora_linear import FusedDoRALinear
    from mlx_fused_lora.lm_lora import patch_mlx_lm
    from mlx_lm.tuner.trainer import TrainingArgs, default_loss, iterate_batches, train
    from test_mlx_lm_integration import make_llama, mlx_lm_classes, synthetic_dataset

    # mlx-lm's own classes come back after the test, whatever patch_mlx_lm changed.
    mlx_lm_classes(monkeypatch)
    patch_mlx_lm()
    model = make_llama(num_hidden_layers=2)
    nn.quantize(model, group_size=64, bits=4)
    model.freeze()
    mx.random.seed(5)
    tuner_utils.linear_to_lora_layers(model, 2, {"rank": 8, "scale": 10.0, "dropout": 0.1}, use_dora=use_dora)
    expected = FusedDoRALinear if use_dora else FusedLoRALinear
    adapted = [m for _, m in model.named_modules() if isinstance(m, (FusedLoRALinear, FusedDoRALinear))]
    assert len(adapted) == 2 * 7 and all(type(m) is expected for m in adapted)
    assert all(isinstance(m.linear, nn.QuantizedLinear) and m.linear.bits == 4 for m in adapted)
    trainable = {k.rsplit(".", 1)[1] for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == ({"lora_a", "lora_b", "m"} if use_dora else {"lora_a", "lora_b"})

    data = synthetic_dataset()
    batch, lengths = next(iterate_batches(data, batch_size=len(data), max_seq_length=64))

    def loss_on_fixed_batch():
        model.eval()
        return float(default_loss(model, batch, lengths)[0])

    initial = loss_on_fixed_batch()
    args = TrainingArgs(
        batch_size=4,
        iters=24,
        steps_per_report=8,
        steps_per_eval=1000,
        steps_per_save=1000,
        max_seq_length=64,
        adapter_file=str(tmp_path / "adapters.safetensors"),
    )
    mx.random.seed(0)
    train(model=model, optimizer=optim.Adam(learning_rate=1e-3), train_dataset=data, args=args)
    final = loss_on_fixed_batch()
    assert final < 0.7 * initial, (initial, final)
    saved = mx.load(str(tmp_path / "adapters.safetensors"))
    assert saved.keys() == dict(tree_flatten(model.trainable_parameters())).keys()


def test_fused_path_stores_no_mask(monkeypatch):
    """An affine base runs fused_qlora_linear: the plain path's dropout_mask is never called."""
    import mlx_fused_lora.layers.fused_lora_linear as layer_module

    def no_mask(*args, **kwargs):
        raise AssertionError("a dropout mask was materialized")

    monkeypatch.setattr(layer_module, "dropout_mask", no_mask)
    mx.random.seed(7)
    _, ours = paired(4, dropout=0.5)
    y, gx, gp = grads(ours, mx.random.normal((4, 128)), 0)
    mx.eval(y, gx, gp)


def test_other_quantization_modes_match_mlx_lm():
    """mxfp4 has no fused op: MLX's quantized matmul + the LoRA term with the same mask."""
    mx.random.seed(8)
    base = nn.QuantizedLinear.from_linear(nn.Linear(128, 96), group_size=32, bits=4, mode="mxfp4")
    ref = LoRALinear.from_base(base, r=4, dropout=0.25, scale=2.0)
    ours = FusedLoRALinear.from_base(base, r=4, dropout=0.25, scale=2.0)
    ref.lora_b = 0.1 * mx.random.normal(ref.lora_b.shape)
    ours.update({"lora_a": ref.lora_a, "lora_b": ref.lora_b})
    for layer in (ref, ours):
        layer.freeze()
        layer.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    x = mx.random.normal((5, 128))
    ref.dropout = FixedMask(mask_for(3, x.shape, 0.25))
    y_ref, gx_ref, gp_ref = grads(ref, x, 3)
    y, gx, gp = grads(ours, x, 3)
    assert_close(y, y_ref, 1e-5, 1e-5, "mxfp4 y")
    assert_close(gx, gx_ref, 1e-5, 1e-5, "mxfp4 dx")
    for name in gp:
        assert_close(gp[name], gp_ref[name], 1e-4, 1e-5, f"mxfp4 d{name}")


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(bits=7), "bits"),
        (dict(bits=4.0), "bits"),
        (dict(group_size=48), "group_size"),
        (dict(group_size=256), "group_size"),
        (dict(bits=8), "weight"),  # the packed width no longer fits K
        (dict(scales=lambda q: q.scales[:, :1]), "scales"),
        (dict(biases=lambda q: None), "biases"),  # affine needs them
    ],
)
def test_bad_quantization_parameters_are_named(change, named):
    from mlx_fused_lora.ops import fused_qlora_linear

    base = make_base("q4", input_dims=128, output_dims=32)
    args = dict(weight=base.weight, scales=base.scales, biases=base.biases, group_size=64, bits=4)
    for k, v in change.items():
        args[k] = v(base) if callable(v) else v
    a, b = mx.zeros((128, 4)), mx.zeros((4, 32))
    with pytest.raises(ValueError, match=f"`{named}`"):
        fused_qlora_linear(
            mx.zeros((2, 128)), args["weight"], args["scales"], args["biases"], None, a, b,
            group_size=args["group_size"], bits=args["bits"], scale=1.0,
        )  # fmt: skip
