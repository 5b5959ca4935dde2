"""DPO's reference policy: the model with its adapters switched off (free), a named reference adapter, or a second model.

- ``base`` (the default): the policy's own model under `adapters.disable_adapters`, so
  every LoRA layer runs its base product alone: the same weights, no rank-r work, no
  dropout mask, no op call. It is read when the loss is traced, so the policy and the
  reference forward share one compiled step.
- ``adapter`` (``--reference-model-path`` naming an adapter folder, e.g. the SFT adapter the
  policy started from): that adapter loaded beside the trained one as the named adapter
  ``reference``, frozen, with no dropout, and run alone in the reference pass
  (`adapters.using_adapters`). One copy of the base weights still.
- ``model`` (``--reference-model-path`` naming a model): a second model, loaded by
  ``mlx_lm.load``, frozen, in eval mode (what mlx-lm-lora does, and what costs a second
  copy of the weights).

The reference's log-probs are always under ``mx.stop_gradient``: nothing flows back into
the reference pass, and the base path has nothing to differentiate anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ...adapters import detect_adapter_format, disable_adapters, load_adapters, set_adapter, using_adapters
from ...layers.named import DEFAULT_ADAPTER, holders
from ...layers.tree import lora_layers
from .logps import sequence_logps

__all__ = ["REFERENCE_ADAPTER", "Reference", "load_reference", "reference_logps"]

REFERENCE_ADAPTER = "reference"


@dataclass
class Reference:
    """Which reference a run scores against (``kind``: ``base``, ``adapter`` or ``model``) and
    where it came from; ``model`` holds the second model of the ``model`` kind."""

    kind: str = "base"
    path: str | None = None
    model: nn.Module | None = field(default=None, repr=False)

    def describe(self) -> str:
        if self.kind == "base":
            return "reference: the model with its adapters off (no second copy, no rank-r work)"
        if self.kind == "adapter":
            return f"reference: the adapter {self.path}, run alone on the same base (no second copy)"
        return f"reference: a second model loaded from {self.path}"


def _is_adapter(path: Path) -> bool:
    try:
        detect_adapter_format(path)
    except (OSError, ValueError):
        return False
    return True


def load_reference(path: str | None, model: nn.Module, load_model=None) -> Reference:
    """The reference for ``--reference-model-path`` ``path`` (None: the base). An adapter folder
    is loaded into ``model`` as adapter ``reference`` (frozen, dropout 0; the trained adapter
    stays the only one running and training); anything else is a model, loaded by
    ``load_model(path) -> (model, tokenizer)`` (``mlx_lm.load`` by default)."""
    if path is None:
        return Reference()
    if Path(path).exists() and _is_adapter(Path(path)):
        load_adapters(model, path, name=REFERENCE_ADAPTER)
        for _, layer in lora_layers(model):
            held = holders(layer).get(REFERENCE_ADAPTER)
            if held is not None:
                held.dropout = 0.0  # the reference is scored without a mask
        set_adapter(model, DEFAULT_ADAPTER)  # the trained adapter runs and trains; the reference is frozen
        return Reference("adapter", str(path))
    if load_model is None:
        from mlx_lm import load as load_model
    try:
        second, _ = load_model(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"--reference-model-path {path}: neither an adapter folder nor a model mlx_lm.load can read ({e})"
        ) from None
    second.freeze()
    second.eval()
    mx.eval(second.parameters())
    return Reference("model", str(path), second)


def reference_logps(reference: Reference, model: nn.Module, tokens: mx.array, response_mask: mx.array) -> mx.array:
    """Each row's summed response log-prob under the reference, ``[N]``, with no gradient."""
    if reference.kind == "model":
        sums, _ = sequence_logps(reference.model, tokens, response_mask)
    elif reference.kind == "adapter":
        with using_adapters(model, REFERENCE_ADAPTER):
            sums, _ = sequence_logps(model, tokens, response_mask)
    else:
        with disable_adapters(model):
            sums, _ = sequence_logps(model, tokens, response_mask)
    return mx.stop_gradient(sums)
