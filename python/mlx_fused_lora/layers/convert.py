"""``linear_to_lora_layers`` with mlx-lm's signature and semantics, building FusedLoRALinear.

An mlx-lm user switches by one import:
``from mlx_fused_lora import linear_to_lora_layers``. Linear and quantized linear
layers become FusedLoRALinear (FusedDoRALinear with ``use_dora``); layer types the
fused op does not cover yet (mixture-of-experts SwitchLinear, embeddings) get mlx-lm's
own layers, so a model converts exactly as mlx-lm would convert it.
"""

import mlx.nn as nn
from mlx.utils import tree_unflatten

from .fused_dora_linear import FusedDoRALinear
from .fused_lora_linear import FusedLoRALinear


def _mlx_lm_tuner():
    try:
        from mlx_lm.tuner import dora, lora
    except ImportError as e:
        raise ImportError("this layer type needs mlx-lm's LoRA layers: pip install mlx-lm") from e
    return lora, dora


def _to_lora(layer, config, use_dora):
    kwargs = dict(r=config["rank"], scale=config["scale"], dropout=config["dropout"])
    if not use_dora and hasattr(layer, "to_lora"):
        return layer.to_lora(**kwargs)
    if isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
        return (FusedDoRALinear if use_dora else FusedLoRALinear).from_base(layer, **kwargs)
    lora, dora = _mlx_lm_tuner()
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    if isinstance(layer, (SwitchLinear, QuantizedSwitchLinear)):
        if use_dora:
            raise ValueError(f"{type(layer).__name__} doesn't support DoRA yet.")
        cls = lora.LoRASwitchLinear
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
    linear-like layer). Keys naming modules outside the blocks are adapted too.
    """
    if "scale" not in config:
        hint = " (found 'alpha': mlx-lm's config takes 'scale', the full multiplier)" if "alpha" in config else ""
        raise KeyError(f"LoRA config is missing required key 'scale'{hint}")
    keys = config.get("keys") or _default_keys(model)
    # As in mlx-lm, num_layers <= 0 (the CLI's -1) means every block.
    for block in model.layers[-max(num_layers, 0) :]:
        adapted = [(k, _to_lora(m, config, use_dora)) for k, m in block.named_modules() if k in keys]
        if adapted:
            block.update_modules(tree_unflatten(adapted))
    adapted = [(k, _to_lora(m, config, use_dora)) for k, m in model.named_modules() if k in keys]
    if adapted:
        model.update_modules(tree_unflatten(adapted))
    return model
