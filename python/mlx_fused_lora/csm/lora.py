"""CSM's LoRA targets: put `FusedLoRALinear` into its projections, and merge them back.

Target vocabulary (`apply_lora`'s ``target_modules``): ``q_proj k_proj v_proj o_proj
gate_proj up_proj down_proj`` name per-layer projections and apply to *both* stacks
(``backbone.layers.{i}.self_attn.q_proj``, ``decoder.layers.{i}.mlp.up_proj``, ...);
``codebook0_head`` and ``projection`` name the two top-level linears. torchtune's names
``output_proj w1 w2 w3`` are accepted as aliases. Adapter parameters therefore live at
``backbone.layers.{i}.self_attn.q_proj.lora_a`` etc.: the stack prefix keeps the two
stacks' layer ``i`` apart.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..layers import FusedDoRALinear, FusedLoRALinear
from ..layers.init import check_init, warn_base_changed
from ..layers.patterns import check_patterns, module_rank_scale
from ..layers.tree import (
    freeze_all_but_lora,
    fuse_lora_layers,
    is_lora_layer,
    lora_scale,
)

__all__ = [
    "LAYER_TARGETS",
    "HEAD_TARGETS",
    "LoRASettings",
    "LoRAReport",
    "apply_lora",
    "merge_lora",
]

log = logging.getLogger(__name__)

# target name -> path inside a TransformerBlock
LAYER_TARGETS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
HEAD_TARGETS = ("codebook0_head", "projection")
_ALIASES = {"output_proj": "o_proj", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
STACKS = ("backbone", "decoder")


@dataclass
class LoRASettings:
    """What `apply_lora` was asked for; kept on the model (``model.lora_settings``)."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    bias: bool
    target_modules: list[str]
    target_layers: object = None
    use_dora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict | None = None
    alpha_pattern: dict | None = None

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.use_rslora)


@dataclass
class LoRAReport:
    trainable: int
    total: int
    modules: list[str] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"LoRA on {len(self.modules)} modules: {self.trainable:,} trainable of "
            f"{self.total:,} parameters ({self.percent:.4f}%)"
        )


def _normalize_targets(target_modules: str | Iterable[str]) -> list[str]:
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    out = []
    for t in target_modules:
        t = _ALIASES.get(t, t)
        if t not in LAYER_TARGETS and t not in HEAD_TARGETS:
            raise ValueError(
                f"unknown LoRA target {t!r}; expected some of {sorted(LAYER_TARGETS) + list(HEAD_TARGETS)}"
            )
        if t not in out:
            out.append(t)
    if not out:
        raise ValueError("target_modules is empty")
    return out


def _layers_per_stack(model, target_layers) -> dict[str, list[int]]:
    depth = {s: len(getattr(model, s).layers) for s in STACKS}
    if target_layers is None:
        return {s: list(range(depth[s])) for s in STACKS}
    if isinstance(target_layers, Mapping):
        unknown = set(target_layers) - set(STACKS)
        if unknown:
            raise ValueError(f"target_layers keys {sorted(unknown)} are not stacks {STACKS}")
        out = {}
        for s in STACKS:
            idx = target_layers.get(s, [])
            idx = list(range(depth[s])) if idx is None else [int(i) for i in idx]
            bad = [i for i in idx if not 0 <= i < depth[s]]
            if bad:
                raise ValueError(f"target_layers[{s!r}] {bad} out of range 0..{depth[s] - 1}")
            out[s] = idx
        return out
    idx = [int(i) for i in target_layers]
    bad = [i for i in idx if not any(0 <= i < depth[s] for s in STACKS)]
    if bad:
        raise ValueError(f"target_layers {bad} are outside every stack (depths {depth})")
    return {s: [i for i in idx if 0 <= i < depth[s]] for s in STACKS}


def apply_lora(
    model: nn.Module,
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
    target_layers: None | Sequence[int] | Mapping[str, Sequence[int] | None] = None,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    bias: bool = False,
    use_rslora: bool = False,
    use_dora: bool = False,
    adapter_name: str = "default",
    init_lora_weights: bool | str = True,
    rank_pattern: Mapping | None = None,
    alpha_pattern: Mapping | None = None,
) -> LoRAReport:
    """Replace the targeted linears of a CSM by `FusedLoRALinear` (`FusedDoRALinear` with
    ``use_dora``: DoRA's magnitude ``m`` is trained too) and freeze the rest.

    ``target_layers``: None (every layer of both stacks), a list of layer indices (applied
    to each stack where the index exists), or ``{"backbone": [...], "decoder": [...]}``
    (a missing stack gets none, ``None`` means all its layers). Head targets ignore it.
    ``scale = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``). ``bias=True`` also
    trains the adapted layers' existing biases (CSM's linears have none).
    ``adapter_name`` names the adapter (`mlx_fused_lora.adapters.list_adapters`; PEFT's
    "default" unless given). ``init_lora_weights`` is PEFT's (`layers.init`: pissa, olora and
    loftq replace the adapted layers' base weights, said once in a warning);
    ``rank_pattern`` / ``alpha_pattern`` give the modules they name (by path, PEFT's rule:
    ``v_proj``, ``decoder.layers.0.mlp.up_proj``) another rank or alpha. Returns and logs the
    trainable-parameter report.
    """
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    init_lora_weights = check_init(init_lora_weights, "apply_lora")
    targets = _normalize_targets(target_modules)
    layers = _layers_per_stack(model, target_layers)
    scale = lora_scale(r, alpha, use_rslora)
    layer_class = FusedDoRALinear if use_dora else FusedLoRALinear

    paths = []
    for t in targets:
        if t in HEAD_TARGETS:
            paths.append(t)
    for s in STACKS:
        for i in layers[s]:
            for t in targets:
                if t in LAYER_TARGETS:
                    paths.append(f"{s}.layers.{i}.{LAYER_TARGETS[t]}")
    check_patterns(rank_pattern, alpha_pattern, "apply_lora", paths)
    modules = dict(model.named_modules())
    replacements = []
    for p in paths:
        base = modules[p]
        if is_lora_layer(base):
            raise ValueError(f"{p} already has a LoRA adapter")
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise ValueError(f"{p} is a {type(base).__name__}, not a linear layer")
        rank, module_scale = module_rank_scale(
            p, r, scale, rank_pattern, alpha_pattern, alpha=alpha, use_rslora=use_rslora
        )
        layer = layer_class.from_base(
            base, r=rank, dropout=dropout, scale=module_scale, init_lora_weights=init_lora_weights
        )
        if adapter_name != "default":
            layer.adapter_name = adapter_name
        replacements.append((p, layer))
    model.update_modules(tree_unflatten(replacements))
    warn_base_changed(
        init_lora_weights,
        sum(layer.lora_init is not None and layer.lora_init.changes_base for _, layer in replacements),
    )
    freeze_all_but_lora(model, train_bias=bias)
    if bias and not any("bias" in m.linear for _, m in replacements):
        warnings.warn("bias=True but none of the adapted layers has a bias", stacklevel=2)
    model.lora_settings = LoRASettings(
        r=r,
        alpha=alpha,
        dropout=dropout,
        use_rslora=use_rslora,
        bias=bias,
        target_modules=targets,
        target_layers=target_layers,
        use_dora=use_dora,
        init_lora_weights=init_lora_weights,
        rank_pattern=dict(rank_pattern) if rank_pattern else None,
        alpha_pattern=dict(alpha_pattern) if alpha_pattern else None,
    )
    report = LoRAReport(
        trainable=sum(v.size for _, v in tree_flatten(model.trainable_parameters())),
        total=sum(v.size for _, v in tree_flatten(model.parameters())),
        modules=[p for p, _ in replacements],
    )
    log.debug("%s", report)  # callers say it where it belongs in their output (the trainer: after its plan)
    return report


# -- merging --


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into a plain layer, in place; returns ``model``.

    The layers' own fold (`mlx_fused_lora.layers.fuse_lora_layers`, the same as each
    layer's ``fuse``): ``W' = W + scale * (lora_b.T @ lora_a.T)`` computed in float32 and
    cast back to the base weight's dtype once; a quantized base is dequantized, merged
    and re-quantized with its own group size/bits/mode, with a warning naming the module
    when the delta is below the quantization step. Frozen-ness is left as is;
    ``model.lora_settings`` is removed.
    """
    fuse_lora_layers(model)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model
