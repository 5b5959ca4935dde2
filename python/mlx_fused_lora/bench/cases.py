"""The measured cases: zero-argument callables for each kind (fused, the plain-MLX peers, the limit).

Each case runs one forward, or one forward and backward, and evaluates it. The
kinds, side by side on the same inputs:

- ``fused``: FusedLoRALinear (the fused op);
- the peers, in plain MLX:
  - ``plain``: the layer as mlx-lm writes it (mlx-lm's own ``LoRALinear`` when
    installed, else ``PlainLoRALinear``, a faithful copy of its forward);
  - ``plain_compiled``: the same plain layer under ``mx.compile`` (random state
    threaded through, as mlx-lm's trainer does);
  - ``plain_addmm``: ``AddmmLoRALinear`` below, the layer written as well as plain
    MLX allows (adapters cast to x's dtype, no float32 promotion of x, the LoRA term
    accumulated onto the base product by ``addmm``);
- ``limit``: what no LoRA layer can beat: the base GEMM ``x @ W.T`` alone
  (forward) and the two GEMMs ``x @ W.T``, ``dY @ W`` (forward and backward), on
  the CPU through the same BLAS the extension links, elsewhere through MLX;
- ``peft`` and ``peft_limit``: PyTorch + PEFT and its own GEMMs (peft_peer.py).

Forward and backward takes the gradients of x, lora_a and lora_b for a given
output cotangent, as training the adapters of any but the first layer does.
"""

import mlx.core as mx

from .._extension import _ext
from ..layers import FusedLoRALinear, plain_layer_class
from .grid import KINDS, SCALE


class AddmmLoRALinear(FusedLoRALinear):
    """Benchmark peer, not a product layer: LoRA as well as plain MLX can write it.

    Same parameters as mlx-lm's ``LoRALinear``, but: the adapters are cast to x's
    dtype (bf16 x is never promoted to a float32 copy), dropout is one boolean mask
    and one ``where`` (its 1/(1-p) folded into the scale), and the LoRA term is
    accumulated onto the base product by ``addmm`` (no separate M x N sum). What is
    left between it and the fused op is what plain MLX cannot avoid: the mask and
    dropped copy of x, and the autodiff's stored intermediates.
    """

    def __call__(self, x):
        weight = self.linear.weight
        if "bias" in self.linear:
            base = mx.addmm(self.linear.bias, x, weight.T)
        else:
            base = x @ weight.T
        p = self.dropout if self.training else 0.0
        alpha = self.scale
        if p > 0:
            keep = mx.random.bernoulli(1 - p, x.shape)
            x = mx.where(keep, x, mx.array(0, dtype=x.dtype))
            alpha = self.scale / (1 - p)
        h = x @ self.lora_a.astype(x.dtype)
        return mx.addmm(base, h, self.lora_b.astype(x.dtype), alpha=alpha)


def make_inputs(m, k, n, r, dtype=mx.float32, seed=0):
    """x, weight, the adapters and an output cotangent, random, evaluated."""
    if isinstance(dtype, str):
        dtype = getattr(mx, dtype)
    mx.random.seed(seed)
    arrays = dict(
        x=mx.random.normal((m, k)).astype(dtype),
        weight=(mx.random.normal((n, k)) / k**0.5).astype(dtype),
        # Adapters stay float32, as mlx-lm keeps them.
        lora_a=mx.random.normal((k, r)) / k**0.5,
        lora_b=mx.random.normal((r, n)) / r**0.5,
        cotangent=mx.random.normal((m, n)).astype(dtype),
    )
    mx.eval(arrays)
    return arrays


def layer_from_inputs(cls, inputs, dropout, scale=SCALE):
    """A `cls` layer holding make_inputs' weight and adapters, in training mode."""
    k = inputs["x"].shape[-1]
    n, r = inputs["lora_b"].shape[1], inputs["lora_b"].shape[0]
    layer = cls(k, n, r=r, dropout=dropout, scale=scale)
    layer.linear.weight = inputs["weight"]
    layer.lora_a, layer.lora_b = inputs["lora_a"], inputs["lora_b"]
    layer.train()
    return layer


def _layer_passes(layer, inputs, compiled=False):
    x, ct = inputs["x"], inputs["cotangent"]

    def apply(x, lora_a, lora_b):
        layer.lora_a, layer.lora_b = lora_a, lora_b
        return layer(x)

    def forward(x):
        return layer(x)

    def forward_backward(x, lora_a, lora_b, ct):
        return mx.vjp(apply, [x, lora_a, lora_b], [ct])

    if compiled:
        # Dropout draws from the global random state: thread it, as mlx-lm's trainer does.
        state = [mx.random.state]
        forward = mx.compile(forward, inputs=state, outputs=state)
        forward_backward = mx.compile(forward_backward, inputs=state, outputs=state)

    a, b = inputs["lora_a"], inputs["lora_b"]
    return {
        "forward": lambda: mx.eval(forward(x)),
        "forward_backward": lambda: mx.eval(forward_backward(x, a, b, ct)),
    }


def limit_path(device):
    """Where the limit's GEMMs run: on the CPU the extension's BLAS (the one the fused op's own
    GEMMs use, whichever BLAS MLX's matmul uses), on a GPU MLX's matmul."""
    return "extension" if device == mx.cpu else "mlx"


def _limit_passes(inputs):
    x, w, ct = inputs["x"], inputs["weight"], inputs["cotangent"]
    if limit_path(mx.default_device()) == "extension":
        blas_matmul = _ext.testing.blas_matmul

        def base():
            return blas_matmul(x, w, transpose_b=True)

        def input_grad():
            return blas_matmul(ct, w)
    else:

        def base():
            return x @ w.T

        def input_grad():
            return ct @ w

    return {
        "forward": lambda: mx.eval(base()),
        "forward_backward": lambda: mx.eval(base(), input_grad()),
    }


def cases(inputs, dropout, scale=SCALE, kinds=KINDS):
    """{kind: {"forward": fn, "forward_backward": fn}} for each kind in `kinds`."""
    builders = {
        "fused": lambda: _layer_passes(layer_from_inputs(FusedLoRALinear, inputs, dropout, scale), inputs),
        "plain": lambda: _layer_passes(layer_from_inputs(plain_layer_class(), inputs, dropout, scale), inputs),
        "plain_compiled": lambda: _layer_passes(
            layer_from_inputs(plain_layer_class(), inputs, dropout, scale), inputs, compiled=True
        ),
        "plain_addmm": lambda: _layer_passes(layer_from_inputs(AddmmLoRALinear, inputs, dropout, scale), inputs),
        "limit": lambda: _limit_passes(inputs),
    }
    if {"peft", "peft_limit"} & set(kinds):
        from .peft_peer import peft_cases

        torch_cases = peft_cases(inputs, dropout, scale)
        builders.update({kind: (lambda kind=kind: torch_cases[kind]) for kind in torch_cases})
    unknown = [kind for kind in kinds if kind not in builders]
    if unknown:
        raise ValueError(f"kinds: unknown {unknown}; expected some of {sorted(builders)}")
    return {kind: builders[kind]() for kind in kinds}
