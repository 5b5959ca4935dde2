"""The PyTorch + PEFT peer: PEFT's LoRA ``Linear`` over a frozen ``torch.nn.Linear``, and torch's own two GEMMs as its limit.

What a PyTorch user would otherwise run: ``peft.get_peft_model`` with a ``LoraConfig``
targeting one ``nn.Linear`` (no bias), the same x, W, adapters (``lora_A.weight`` is
``lora_a.T``, ``lora_B.weight`` is ``lora_b.T``), dtype, r, dropout p and scale
(``lora_alpha = scale * r``), in training mode. Its passes mirror the MLX kinds':

- ``peft`` forward: the layer's output under ``torch.no_grad()`` (MLX's forward case
  builds no autodiff graph either); forward + backward: the output, then
  ``torch.autograd.grad`` of x, ``lora_A.weight`` and ``lora_B.weight`` for the same
  output cotangent;
- ``peft_limit``: torch's ``x @ W.T`` (forward) and ``x @ W.T``, ``dY @ W`` (forward +
  backward) alone, on torch's own BLAS: what no LoRA layer in torch can beat.

Both need ``torch`` and ``peft`` (the ``peft`` extra: a CPU build of torch is enough).
Peak memory is not measured for them: MLX's counter does not see torch's allocations
and torch keeps no CPU peak counter. Import this only after ``mlx.core``: torch loads
libraries into the global symbol scope, which MLX must not bind its BLAS to.
"""

import importlib.util
import os

import numpy as np

PEFT_KINDS = ("peft", "peft_limit")


def import_torch():
    """torch, imported with its OpenMP threads set to sleep when idle (the first import decides).

    torch's CPU build runs its ops on GNU OpenMP threads, which by default spin for a
    while after each op. The rounds are interleaved, so those spinning threads took the
    2 cores from whatever ran next (the fused op): measured here, fused / limit at
    512 x 1024 x 1024 went from 1.2 to 1.7-1.8 with the PEFT peer in the run, back to 1.2
    with OMP_WAIT_POLICY=PASSIVE. A value the user set is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    return torch


def available():
    """Whether torch and peft are importable (checked without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "peft"))


def versions():
    """{"torch": version, "peft": version}, or None for each that is missing."""
    from importlib import metadata

    found = {}
    for name in ("torch", "peft"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _to_torch(array, dtype):
    import mlx.core as mx

    torch = import_torch()

    # numpy has no bfloat16: go through float32 and cast on the torch side.
    return torch.from_numpy(np.array(array.astype(mx.float32))).to(dtype).contiguous()


def peft_lora_linear(inputs, dropout, scale):
    """(the PEFT LoRA layer, x) holding make_inputs' arrays, in training mode."""
    torch = import_torch()
    from peft import LoraConfig, get_peft_model

    dtype = getattr(torch, str(inputs["x"].dtype).split(".")[-1])
    k = inputs["x"].shape[-1]
    r, n = inputs["lora_b"].shape

    class OneLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(k, n, bias=False, dtype=dtype)

        def forward(self, x):
            return self.proj(x)

    base = OneLinear()
    with torch.no_grad():
        base.proj.weight.copy_(_to_torch(inputs["weight"], dtype))
    config = LoraConfig(r=r, lora_alpha=scale * r, lora_dropout=dropout, target_modules=["proj"], bias="none")
    model = get_peft_model(base, config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        # PEFT stores the adapters in the base layer's dtype, as it creates them.
        layer.lora_A["default"].weight.copy_(_to_torch(inputs["lora_a"].T, dtype))
        layer.lora_B["default"].weight.copy_(_to_torch(inputs["lora_b"].T, dtype))
    model.train()
    return layer, _to_torch(inputs["x"], dtype)


def peft_cases(inputs, dropout, scale):
    """{"peft": {"forward": fn, "forward_backward": fn}, "peft_limit": {...}}."""
    torch = import_torch()

    layer, x = peft_lora_linear(inputs, dropout, scale)
    ct = _to_torch(inputs["cotangent"], x.dtype)
    weight = layer.base_layer.weight.detach()
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x_leaf = x.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            return layer(x)

    def forward_backward():
        y = layer(x_leaf)
        return torch.autograd.grad(y, [x_leaf, lora_a, lora_b], ct)

    def limit_forward():
        with torch.no_grad():
            return x @ weight.T

    def limit_forward_backward():
        with torch.no_grad():
            return x @ weight.T, ct @ weight

    return {
        "peft": {"forward": forward, "forward_backward": forward_backward},
        "peft_limit": {"forward": limit_forward, "forward_backward": limit_forward_backward},
    }
