"""One adapter per speaker, trained in one run (``--adapter-per-speaker``): the speakers the data names, their adapters, the mixed-batch loss, their files.

- The speakers are the data's (`data.speaker_and_text`: a transcript's ``[N]`` tag, else
  ``--speaker-id``), every sample's (training and validation), sorted; speaker ``N``'s adapter
  is named ``speaker_N`` and its index among them is the id a mixed batch uses.
- Each adapter is built as a one-adapter run's would be (the run's rank, alpha, dropout,
  targets, init and patterns, drawn from the run's seed, one after the other), all active
  and trained; the adapter the model was loaded with is removed.
- Each batch runs as a mixed batch (`adapters.mixed_batch`: every row on its speaker's
  adapter, one op call per layer, one optimizer over all), with the loss's means taken per
  speaker and summed (`loss.csm_loss` ``groups``): each adapter gets exactly the gradient of
  its own rows' loss, as if trained on them alone on the shared base. The loss logged is that
  sum.
- Each adapter is written on its own, ``OUTPUT_DIR/speaker_N/`` (the CSM CLI's files, loadable
  alone: ``load_adapters(model, OUTPUT_DIR / "speaker_N")``, or by name beside the others:
  ``load_adapters(model, OUTPUT_DIR, name="speaker_N")``), with its own sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ...adapters import add_adapter, delete_adapter, mixed_batch, set_adapter
from ...csm.lora import LoRAReport
from .settings import TrainSettings

__all__ = ["Speakers", "speaker_name", "find_speakers", "add_speaker_adapters", "speaker_loss"]


def speaker_name(speaker: int) -> str:
    """The adapter name of speaker ``speaker``."""
    return f"speaker_{speaker}"


@dataclass(frozen=True)
class Speakers:
    """The run's speakers (ids, sorted): adapter ``i`` is speaker ``ids[i]``'s."""

    ids: tuple[int, ...]

    @property
    def names(self) -> list[str]:
        return [speaker_name(s) for s in self.ids]

    def voices(self, output_dir: Path) -> list[tuple[Path, str, int]]:
        """(folder, adapter, speaker id) of each speaker: its adapter's folder in ``output_dir``."""
        return [(output_dir / name, name, i) for name, i in zip(self.names, self.ids, strict=True)]

    def adapter_ids(self, samples: Sequence) -> np.ndarray:
        """Each sample's adapter id (int32), by its speaker."""
        return np.array([self.ids.index(s.speaker) for s in samples], dtype=np.int32)


def find_speakers(samples: Sequence) -> Speakers:
    return Speakers(tuple(sorted({s.speaker for s in samples})))


def add_speaker_adapters(model, speakers: Speakers, s: TrainSettings, report: LoRAReport) -> None:
    """One adapter per speaker on the modules the run's LoRA went into (``report``'s, whose counts
    are brought up to date), as the run's settings build one, all active and trained; the adapter
    the model was loaded with (``s.adapter_name``) removed."""
    config = {
        "rank": s.lora_r,
        "alpha": s.lora_alpha,
        "dropout": s.lora_dropout,
        "keys": list(report.modules),
        "init_lora_weights": s.init_lora_weights,
        "rank_pattern": s.rank_pattern,
        "alpha_pattern": s.alpha_pattern,
    }
    mx.random.seed(s.seed)  # the adapters' initialisation is part of the run's identity
    for name in speakers.names:
        add_adapter(model, name, config)
    set_adapter(model, speakers.names)
    delete_adapter(model, s.adapter_name)
    report.trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    report.total = sum(v.size for _, v in tree_flatten(model.parameters()))


def speaker_loss(loss_fn, count: int):
    """``loss_fn(model, tokens, mask, target, key=None, groups=None, num_groups=1)`` on a mixed
    batch: ``(model, tokens, mask, target, ids, key=None)``, each row on adapter ``ids[row]``,
    the means taken per adapter (of ``count``) and summed."""

    def loss(model, tokens, mask, target, ids, key=None):
        with mixed_batch(model, ids):
            return loss_fn(model, tokens, mask, target, key=key, groups=ids, num_groups=count)

    return loss
