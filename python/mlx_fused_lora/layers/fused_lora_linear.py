"""FusedLoRALinear: a drop-in for mlx-lm's ``LoRALinear`` on the fused op.

Same constructor, ``from_base``, ``fuse``, parameter names, shapes and
initialisation as ``mlx_lm.tuner.lora.LoRALinear`` (``linear``, ``lora_a (in, r)``
uniform in +-1/sqrt(in), ``lora_b (r, out)`` zeros, ``scale`` the full multiplier),
so adapters saved by mlx-lm load unchanged (``from_base`` and ``fuse`` come from
`LoRALinearBase`, shared with the plain layer). Differences, on purpose:

- ``dropout`` is the float p, not an ``nn.Dropout`` module (it has no parameters
  either way, so checkpoints are unaffected).
- In training mode each call draws a fresh dropout key from ``mx.random``, so a
  compiled step that threads ``mx.random.state`` (as mlx-lm's trainer does) gets
  a new mask every step; in eval mode there is no dropout.
- x keeps its dtype: float32 adapters with bf16 activations never promote x. The output
  has the dtype mlx-lm's layer gives (x promoted with the base's W and bias; see
  `lora_product` for what is cast in each mixed case).
"""

import mlx.core as mx
import mlx.nn as nn

from ..ops import dropout_mask, fused_lora_linear, fused_qlora_linear, reference
from ..ops.checks import check_adapter_ids
from .base import LoRALinearBase, check_lora_args, init_lora_weights


def draw_dropout_key():
    """A fresh dropout key from MLX's global random state (which mx.compile can thread)."""
    return mx.random.randint(0, 2**31 - 1, shape=(2,), dtype=mx.int32).astype(mx.uint32)


def _plain_quantized_product(linear, x, bias, lora_a, lora_b, scale, dropout, key, adapter_ids=None):
    """Quantization modes without a fused op (mxfp4, nvfp4, ...): mlx-lm's formula in plain
    MLX with the op's mask (stored), promoting as it does; an empty batch through the guard;
    with ``adapter_ids``, each row's adapter by the oracle's per-row term."""
    y = reference.quantized_matmul(
        x,
        linear.weight,
        linear.scales,
        linear.get("biases"),
        transpose=True,
        group_size=linear.group_size,
        bits=linear.bits,
        mode=linear.mode,
    )
    if bias is not None:
        y = y + bias
    dropped = x if dropout == 0 else x * dropout_mask(key, x.shape, dropout, dtype=x.dtype)
    if adapter_ids is not None:
        ids = check_adapter_ids(x, adapter_ids, "lora_product").reshape(x.shape[:-1])
        return y + reference.mixed_lora_term(dropped, lora_a, lora_b, mx.array(scale), ids).astype(x.dtype)
    z = (dropped @ lora_a.astype(x.dtype)) @ lora_b.astype(x.dtype)
    return y + (scale * z).astype(x.dtype)


def lora_product(linear, x, lora_a, lora_b, *, scale, dropout=0.0, key=None, with_bias=True, adapter_ids=None):
    """``linear(x) + scale * (dropout(x) @ lora_a) @ lora_b`` on the fused op: the one
    dispatch from a base layer to an op, for every layer built on it (LoRA, DoRA). With
    ``adapter_ids`` the adapters are stacked and ``scale`` is one per adapter (the mixed op).

    A dense base takes `fused_lora_linear`; a quantized one (affine, as MLX quantizes
    by default) `fused_qlora_linear`: no dequantized weight, no stored mask.
    ``with_bias=False`` leaves the base's bias out (DoRA adds it after its scaling).
    Other quantization modes (``mxfp4``, ...) have no fused op yet: they take MLX's
    quantized matmul and the LoRA term in plain MLX with the same mask (stored).

    The result has the dtype ``linear(x)`` has in MLX (mlx-lm's layers return that): x
    promoted with W (a quantized base: its float scales) and the bias. The ops take x, W
    and the bias in one dtype, so where they differ something is cast, and it is never x
    unless MLX's own matmul would have promoted x too:

    - W narrower than x (bf16 W, float32 x): W is cast to x's dtype, one copy of W per
      call (MLX's matmul makes the same promoted copy of W).
    - W or the scales wider than x (float32 W, bf16 x): x is cast up, a copy of x, as
      MLX's matmul makes; the output is that wider dtype.
    - A bias narrower than the product: the (N,) bias is cast. A wider bias (a float32
      bias over a bf16 product) is added after the op, promoting y as MLX's ``addmm``
      does: one more pass over the M x N output, no copy of x.
    """
    bias = linear.bias if with_bias and "bias" in linear else None
    quantized = isinstance(linear, nn.QuantizedLinear)
    if quantized and linear.mode != "affine":
        return _plain_quantized_product(linear, x, bias, lora_a, lora_b, scale, dropout, key, adapter_ids)
    weight = linear.weight
    product = mx.result_type(x.dtype, linear.scales.dtype if quantized else weight.dtype)
    if x.dtype != product:
        x = x.astype(product)  # W wider than x: MLX's matmul promotes x too
    if not quantized and weight.dtype != product:
        weight = weight.astype(product)  # W narrower than x: one copy of W per call
    late_bias = None
    if bias is not None and bias.dtype != product:
        if mx.result_type(product, bias.dtype) == product:
            bias = bias.astype(product)
        else:
            bias, late_bias = None, bias
    if not quantized:
        y = fused_lora_linear(
            x, weight, bias, lora_a, lora_b, scale=scale, dropout=dropout, key=key, adapter_ids=adapter_ids
        )
    else:
        y = fused_qlora_linear(
            x,
            weight,
            linear.scales,
            linear.biases,
            bias,
            lora_a,
            lora_b,
            group_size=linear.group_size,
            bits=linear.bits,
            scale=scale,
            dropout=dropout,
            key=key,
            adapter_ids=adapter_ids,
        )
    return y if late_bias is None else y + late_bias


class FusedLoRALinear(LoRALinearBase):
    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        r: int = 8,
        dropout: float = 0.0,
        scale: float = 20.0,
        bias: bool = False,
    ):
        super().__init__()
        check_lora_args("FusedLoRALinear", r, dropout)
        self.linear = nn.Linear(input_dims, output_dims, bias=bias)
        self.dropout = float(dropout)
        self.scale = scale
        self.lora_a, self.lora_b = init_lora_weights(input_dims, output_dims, r)

    def __call__(self, x):
        if self.routing is not None:  # several named adapters, or none running (`layers.named`)
            return self.routing.forward(self, x)
        p = self.dropout if self.training else 0.0
        key = draw_dropout_key() if p > 0 else None
        return lora_product(self.linear, x, self.lora_a, self.lora_b, scale=self.scale, dropout=p, key=key)
