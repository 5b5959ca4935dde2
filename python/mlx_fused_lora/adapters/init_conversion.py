"""PiSSA / OLoRA adapters as plain LoRA on the original weight (PEFT's ``path_initial_model_for_weight_conversion``).

A PiSSA or OLoRA init moves part of W into the adapter: the model runs
``W_res + s·(A₀B₀)ᵀ = W`` at the start and ``W_res + s·(A B)ᵀ`` after training, so its
change from W is ``ΔW = s·(A B − A₀B₀)ᵀ``. That is a LoRA of rank 2r on the *original*
W, with no residual base needed: ``lora_a = [A, A₀]``, ``lora_b = [B; −B₀]``, same scale
(PEFT's ``subtract_mutated_init``; its config doubles ``r`` and ``lora_alpha``, which is
what our writers derive from the doubled rank and the kept scale). The result records
``init_lora_weights = True``, so loading it changes no base weight.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx

from .adapter_set import AdapterSet, ModuleAdapter
from .checks import AdapterError

__all__ = ["CONVERTIBLE_INITS", "convert_module_to_lora", "convert_to_lora"]

CONVERTIBLE_INITS = ("pissa", "pissa_niter_N", "olora")


def _convertible(init) -> bool:
    return isinstance(init, str) and (init in ("pissa", "olora") or init.startswith("pissa_niter_"))


def convert_module_to_lora(trained: ModuleAdapter, initial: ModuleAdapter, name: str = "module") -> ModuleAdapter:
    """One module: ``[A, (s₀/s)·A₀]``, ``[B; −B₀]`` at the trained scale ``s`` (``s₀ = s`` when
    both come from one init, as they do), float32; ``name`` labels errors."""
    for label, m in (("trained", trained), ("initial", initial)):
        if m.magnitude is not None:
            raise AdapterError(f"{name}: the {label} adapter is DoRA; its change from W is no LoRA delta")
    shapes = (trained.lora_a.shape[0], trained.lora_b.shape[1]), (initial.lora_a.shape[0], initial.lora_b.shape[1])
    if shapes[0] != shapes[1]:
        raise AdapterError(f"{name}: trained (in, out) {shapes[0]} and initial {shapes[1]} are not the same module")
    if trained.scale == 0:
        raise AdapterError(f"{name}: the trained adapter's scale is 0; its change cannot be carried at that scale")
    ratio = initial.scale / trained.scale
    lora_a = mx.concatenate([trained.lora_a.astype(mx.float32), ratio * initial.lora_a.astype(mx.float32)], axis=1)
    lora_b = mx.concatenate([trained.lora_b.astype(mx.float32), -initial.lora_b.astype(mx.float32)], axis=0)
    return ModuleAdapter(lora_a, lora_b, trained.scale)


def convert_to_lora(trained: AdapterSet, initial: AdapterSet) -> AdapterSet:
    """The plain LoRA adapter (rank 2r per module) that gives, on the original weights, what
    ``trained`` gives on the residual base its init made; ``initial`` is that adapter as
    the init returned it, before training (the same modules).

    Refused, naming why: an init that left the base alone (nothing to convert), LoftQ
    (its base is a quantization of W, not a residual of it: use the adapter with the
    LoftQ base), DoRA modules, and sets whose modules or shapes differ.
    """
    init = trained.init_lora_weights
    if not _convertible(init):
        why = (
            "LoftQ's base is a quantization of W, not a residual of it; keep the adapter with the base LoftQ made"
            if init == "loftq"
            else "that init leaves the base weights alone, so the adapter already is a plain LoRA on them"
        )
        raise AdapterError(
            f"convert_to_lora: the trained adapter's init_lora_weights is {init!r}; "
            f"only {', '.join(CONVERTIBLE_INITS)} are converted ({why})"
        )
    missing = sorted(set(trained.modules) ^ set(initial.modules))
    if missing:
        raise AdapterError(f"convert_to_lora: the trained and initial adapters differ in modules, e.g. {missing[0]!r}")
    modules = {path: convert_module_to_lora(m, initial.modules[path], name=path) for path, m in trained.modules.items()}
    mx.eval([(m.lora_a, m.lora_b) for m in modules.values()])
    return replace(trained, modules=modules, extra=dict(trained.extra), init_lora_weights=True)
