"""``linear_to_lora_layers`` with mlx-lm's signature and semantics, building FusedLoRALinear.

An mlx-lm user switches by one import:
``from mlx_fused_lora import linear_to_lora_layers``. Linear and quantized linear
layers become FusedLoRALinear (FusedDoRALinear with ``use_dora``), mixture-of-experts
``SwitchLinear`` / ``QuantizedSwitchLinear`` FusedLoRASwitchLinear; embeddings, which the
fused op does not cover, get mlx-lm's own layers, so a model converts exactly as mlx-lm
would convert it.

Beyond mlx-lm's keys, ``config`` takes PEFT's ``init_lora_weights`` (how each adapter starts,
`layers.init`) and ``rank_pattern`` / ``alpha_pattern`` (other ranks and alphas for the modules
they name by full path, `layers.patterns`; ``alpha``, when given, is the alpha they start from,
else ``scale * rank``).
"""

import mlx.nn as nn
from mlx.utils import tree_unflatten

from .fused_dora_linear import FusedDoRALinear
from .fused_lora_linear import FusedLoRALinear
from .fused_lora_switch_linear import FusedLoRASwitchLinear
from .init import check_init, is_default_init, warn_base_changed
from .patterns import check_patterns, module_rank_scale


def _mlx_lm_tuner():
    try:
        from mlx_lm.tuner import dora, lora
    except ImportError as e:
        raise ImportError("this layer type needs mlx-lm's LoRA layers: pip install mlx-lm") from e
    return lora, dora


def _to_lora(layer, config, use_dora, path):
    rank, scale = module_rank_scale(
        path,
        config["rank"],
        config["scale"],
        config.get("rank_pattern"),
        config.get("alpha_pattern"),
        alpha=config.get("alpha"),
    )
    kwargs = dict(r=rank, scale=scale, dropout=config["dropout"])
    init = config.get("init_lora_weights", True)
    if isinstance(layer, (nn.Linear, nn.QuantizedLinear)) and (use_dora or not hasattr(layer, "to_lora")):
        return (FusedDoRALinear if use_dora else FusedLoRALinear).from_base(layer, **kwargs, init_lora_weights=init)
    if not is_default_init(init):
        raise ValueError(
            f"{path}: init_lora_weights {init!r} needs a linear layer; {type(layer).__name__} starts as mlx-lm's"
        )
    if not use_dora and hasattr(layer, "to_lora"):
        return layer.to_lora(**kwargs)
    lora, dora = _mlx_lm_tuner()
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    if isinstance(layer, (SwitchLinear, QuantizedSwitchLinear)):
        if use_dora:
            raise ValueError(f"{type(layer).__name__} doesn't support DoRA yet.")
        cls = FusedLoRASwitchLinear
    elif isinstance(layer, (nn.Embedding, nn.QuantizedEmbedding)):
        cls = dora.DoRAEmbedding if use_dora else lora.LoRAEmbedding
    else:
        raise ValueError(f"Can't convert layer of type {type(layer).__name__} to LoRA")
    return cls.from_base(layer, **kwargs)


def _default_keys(model):
    """Paths (within a block) of every layer type mlx-lm would adapt."""
    types = [nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding]
    try:
        from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

        types += [SwitchLinear, QuantizedSwitchLinear]
    except ImportError:
        pass
    keys = set()
    for block in model.layers:
        for path, module in block.named_modules():
            if hasattr(module, "to_lora") or isinstance(module, tuple(types)):
                keys.add(path)
    return keys


def linear_to_lora_layers(model: nn.Module, num_layers: int, config: dict, use_dora: bool = False):
    """Adapt the last ``num_layers`` blocks of ``model.layers`` in place.

    ``config`` is mlx-lm's ``lora_parameters``: ``rank``, ``scale`` (the full
    multiplier, not PEFT's alpha), ``dropout`` and optional ``keys`` (paths within a
    block, e.g. ``["self_attn.q_proj", "self_attn.v_proj"]``; default: every
    linear-like layer). Keys naming modules outside the blocks are adapted too. And, as
    PEFT names them, ``init_lora_weights``, ``rank_pattern``, ``alpha_pattern`` (with ``alpha``).
    """
    if "scale" not in config:
        hint = " (found 'alpha': mlx-lm's config takes 'scale', the full multiplier)" if "alpha" in config else ""
        raise KeyError(f"LoRA config is missing required key 'scale'{hint}")
    config = {**config, "init_lora_weights": check_init(config.get("init_lora_weights", True), "lora_parameters")}
    keys = config.get("keys") or _default_keys(model)
    full_path = {id(m): p for p, m in model.named_modules()}
    # As in mlx-lm, num_layers <= 0 (the CLI's -1) means every block.
    blocks = [(block, block.named_modules()) for block in model.layers[-max(num_layers, 0) :]]
    targets = [(block, k, m) for block, named in blocks for k, m in named if k in keys]
    targets += [(model, k, m) for k, m in model.named_modules() if k in keys]
    check_patterns(
        config.get("rank_pattern"),
        config.get("alpha_pattern"),
        "lora_parameters",
        [full_path[id(m)] for *_, m in targets],
    )
    adapted = {}
    for owner, k, m in targets:  # every layer built before any is put in: a bad one changes nothing
        adapted.setdefault(id(owner), (owner, []))[1].append((k, _to_lora(m, config, use_dora, full_path[id(m)])))
    for owner, layers in adapted.values():
        owner.update_modules(tree_unflatten(layers))
    started = [getattr(layer, "lora_init", None) for _, layers in adapted.values() for _, layer in layers]
    changed = sum(1 for init in started if init is not None and init.changes_base)
    warn_base_changed(config["init_lora_weights"], changed)
    return model
