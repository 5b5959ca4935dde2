"""``metrics.jsonl``: one JSON object per line, kept consistent across resumes.

A resumed run keeps the lines up to its checkpoint's step and drops the rest (they belong
to steps it will run again), so the file never holds a step twice. Every write names the
file when it fails.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["MetricsLog", "recorded_losses", "METRICS", "LOSS_CURVE"]

METRICS = "metrics.jsonl"  # a run's metrics, in its output folder
LOSS_CURVE = "loss_curve.png"  # and its loss curve (`MetricsLog.plot`)


def recorded_losses(path: str | Path, step: int) -> tuple[float | None, float | None]:
    """``(loss, validation loss)`` on record for ``step`` in a metrics file (None where there is none)."""
    loss = val = None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("step") == step:
            loss = e.get("loss", loss)
            val = e.get("val_loss", val)
    return loss, val


class MetricsLog:
    """Append-only metrics of a run; ``train``/``val`` keep ``(step, loss)`` for the curve."""

    def __init__(self, path: str | Path, start_step: int, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        if not enabled:
            return
        kept = []
        if start_step > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if isinstance(e, dict) and e.get("step", 0) <= start_step:
                    kept.append(line)
                    self._remember(e)
        self._write("w", "".join(k + "\n" for k in kept))

    def _remember(self, e: dict) -> None:
        if "loss" in e:
            self.train.append((e["step"], e["loss"]))
        if "val_loss" in e:
            self.val.append((e["step"], e["val_loss"]))

    def _write(self, mode: str, text: str) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, mode) as f:
                f.write(text)
        except OSError as e:
            raise OSError(e.errno, f"cannot write {self.path}: {e.strerror}", str(self.path)) from None

    def write(self, entry: dict) -> None:
        if not self.enabled:
            return
        self._remember(entry)
        self._write("a", json.dumps(entry) + "\n")

    def last_loss(self) -> float | None:
        """The newest training loss on record (a resumed, already finished run reports it)."""
        return self.train[-1][1] if self.train else None

    def val_loss_at(self, step: int) -> float | None:
        return next((v for s, v in reversed(self.val) if s == step), None)

    def plot(self, path: str | Path) -> Path | None:
        """The loss curve as a PNG (matplotlib); None when there is nothing to draw."""
        if not (self.enabled and self.train):
            return None
        from .plot import write_loss_png

        return write_loss_png(path, self.train, self.val)
