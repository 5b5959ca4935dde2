"""The model a CSM fine-tuning run trains: the base loaded, LoRA put in, plain layers or gradient checkpointing on request."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ...adapters import load_adapters, set_adapter
from ...csm import apply_lora, load_csm
from ...csm.lora import LoRAReport
from ...layers import plain_layer_class
from ...layers.tree import freeze_all_but_lora, lora_dropout_p, lora_layers
from ..adapter_files import start_from_adapter
from ..resume import model_record
from .settings import TrainSettings

__all__ = ["load_model_for_lora", "use_plain_lora_layers", "grad_checkpoint_blocks"]


def load_model_for_lora(model_path: Path, s: TrainSettings) -> tuple[nn.Module, dict, LoRAReport]:
    """``(model, model_record, lora_report)``: the CSM at ``model_path`` with ``s``'s LoRA layers.

    ``model_record`` identifies the base model (`resume.model_record`, taken before the
    adapters go in). The adapters are initialised from ``s.seed``; the trained one is named
    ``s.adapter_name``, starts from ``s.resume_adapter_file`` if given, and runs stacked over
    ``s.frozen_adapters`` (loaded by name, frozen).
    """
    model = load_csm(model_path)
    mx.eval(model.parameters())
    record = model_record(model, model.config.to_dict())
    mx.random.seed(s.seed)  # the adapters' initialisation is part of the run's identity
    report = apply_lora(
        model,
        s.target_modules,
        s.target_layers,
        r=s.lora_r,
        alpha=s.lora_alpha,
        dropout=s.lora_dropout,
        bias=s.lora_bias,
        adapter_name=s.adapter_name,
        init_lora_weights=s.init_lora_weights,
        rank_pattern=s.rank_pattern,
        alpha_pattern=s.alpha_pattern,
    )
    if s.resume_adapter_file:
        start_from_adapter(model, s.resume_adapter_file, s.adapter_name, "--lora-r, --target-modules, --target-layers")
    if s.frozen_adapters:
        names = []
        for spec in s.frozen_adapters:
            name, _, path = spec.partition("=")
            load_adapters(model, path, name=name)
            names.append(name)
        set_adapter(model, [*names, s.adapter_name], trainable=[s.adapter_name])
    if s.lora_layer == "plain":
        use_plain_lora_layers(model, train_bias=s.lora_bias)
    if s.grad_checkpoint:
        grad_checkpoint_blocks(model)
    mx.eval(model.parameters())
    return model, record, report


def use_plain_lora_layers(model: nn.Module, train_bias: bool = False) -> None:
    """Swap every LoRA layer for the plain (mlx-lm) one, same base, adapters and scale."""
    cls = plain_layer_class()
    swapped = []
    for name, layer in lora_layers(model):
        plain = cls.from_base(layer.linear, r=layer.lora_a.shape[1], dropout=lora_dropout_p(layer), scale=layer.scale)
        plain.lora_a, plain.lora_b, plain.lora_init = layer.lora_a, layer.lora_b, layer.lora_init
        swapped.append((name, plain))
    model.update_modules(tree_unflatten(swapped))
    freeze_all_but_lora(model, train_bias=train_bias)


def grad_checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each transformer block of a CSM in the backward pass instead of storing it.

    The instances get a subclass whose ``__call__`` runs under ``mx.checkpoint`` (only
    this model's blocks change; the mask and cache travel by closure, not as inputs).
    """
    for stack in (model.backbone, model.decoder):
        for block in stack.layers:
            base = type(block)
            if getattr(base, "_checkpointed", False):
                continue

            def __call__(self, x, mask=None, cache=None, _call=base.__call__):
                def inner(params, x):
                    self.update(params)
                    return _call(self, x, mask, cache)

                return mx.checkpoint(inner)(self.trainable_parameters(), x)

            block.__class__ = type(
                f"Checkpointed{base.__name__}", (base,), {"__call__": __call__, "_checkpointed": True}
            )
