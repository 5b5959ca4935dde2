"""The cases the benchmark suite and the demo measure, defined once.

Each case is a zero-argument callable that runs one forward, or one forward and
backward, and evaluates it. The three kinds side by side:

- ``fused``: FusedLoRALinear (the fused op);
- ``plain``: the same layer in plain MLX as mlx-lm writes it (mlx-lm's own
  ``LoRALinear`` when installed, else ``PlainLoRALinear``);
- ``limit``: what no LoRA layer can beat: the base GEMM ``x @ W.T`` alone
  (forward) and the two GEMMs ``x @ W.T``, ``dY @ W`` (forward and backward), on
  the CPU through the same BLAS the extension links, elsewhere through MLX.

Forward and backward takes the gradients of x, lora_a and lora_b for a given
output cotangent, as training the adapters of any but the first layer does.
"""

import time

import mlx.core as mx

from ._extension import _ext
from .layers import FusedLoRALinear, PlainLoRALinear


def plain_layer_class():
    try:
        from mlx_lm.tuner.lora import LoRALinear
    except ImportError:
        return PlainLoRALinear
    return LoRALinear


def make_inputs(m, k, n, r, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    arrays = dict(
        x=mx.random.normal((m, k)).astype(dtype),
        weight=(mx.random.normal((n, k)) / k**0.5).astype(dtype),
        lora_a=mx.random.normal((k, r)) / k**0.5,
        lora_b=mx.random.normal((r, n)) / r**0.5,
        cotangent=mx.random.normal((m, n)).astype(dtype),
    )
    mx.eval(arrays)
    return arrays


def _layer(cls, inputs, dropout, scale):
    k = inputs["x"].shape[-1]
    n, r = inputs["lora_b"].shape[1], inputs["lora_b"].shape[0]
    layer = cls(k, n, r=r, dropout=dropout, scale=scale)
    layer.linear.weight = inputs["weight"]
    layer.lora_a, layer.lora_b = inputs["lora_a"], inputs["lora_b"]
    layer.train()
    return layer


def _layer_cases(layer, inputs):
    x, ct = inputs["x"], inputs["cotangent"]

    def apply(x, lora_a, lora_b):
        layer.lora_a, layer.lora_b = lora_a, lora_b
        return layer(x)

    primals = [x, inputs["lora_a"], inputs["lora_b"]]
    return {
        "forward": lambda: mx.eval(layer(x)),
        "forward_backward": lambda: mx.eval(mx.vjp(apply, primals, [ct])),
    }


def _limit_cases(inputs):
    x, w, ct = inputs["x"], inputs["weight"], inputs["cotangent"]
    if mx.default_device() == mx.cpu:
        def base():
            return _ext.blas_matmul(x, w, transpose_b=True)

        def input_grad():
            return _ext.blas_matmul(ct, w)
    else:
        def base():
            return x @ w.T

        def input_grad():
            return ct @ w
    return {
        "forward": lambda: mx.eval(base()),
        "forward_backward": lambda: mx.eval(base(), input_grad()),
    }


def cases(inputs, dropout, scale=2.0):
    """{kind: {"forward": fn, "forward_backward": fn}} for kind in fused, plain, limit."""
    return {
        "fused": _layer_cases(_layer(FusedLoRALinear, inputs, dropout, scale), inputs),
        "plain": _layer_cases(_layer(plain_layer_class(), inputs, dropout, scale), inputs),
        "limit": _limit_cases(inputs),
    }


def peak_memory(fn):
    """Peak bytes MLX holds while fn runs (its inputs included)."""
    fn()  # warm up: compile caches, allocator
    mx.synchronize()
    mx.reset_peak_memory()
    fn()
    mx.synchronize()
    return mx.get_peak_memory()


def best_time(fn, rounds=3):
    """The fastest of `rounds` runs after one warm-up, in seconds."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
