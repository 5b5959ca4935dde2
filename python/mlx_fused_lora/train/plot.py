"""The loss-curve PNG of a training run, drawn with matplotlib."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["write_loss_png"]

Series = Sequence[tuple[float, float]]


def write_loss_png(path: str | Path, train: Series, val: Series = (), width: int = 640, height: int = 400) -> Path:
    """Plot ``(step, loss)`` series (train as a line, validation as points) to ``path``."""
    # A bare Figure (no pyplot): no display, no global backend switch, nothing to close.
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="train")
    if val:
        ax.plot(*zip(*val, strict=True), label="validation", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}", str(path)) from None
    return path
