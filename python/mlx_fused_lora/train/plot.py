"""The loss-curve PNG: matplotlib when it is installed, else a tiny built-in plotter.

The built-in one needs only numpy and zlib: it rasterizes the curves (train in blue,
validation in orange) on a white canvas with a frame and writes an 8-bit RGB PNG. It has
no text; the numbers are in ``metrics.jsonl``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["write_loss_png", "encode_png"]

Series = Sequence[tuple[float, float]]


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an ``[H, W, 3]`` uint8 image."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _draw(train: Series, val: Series, width: int, height: int) -> np.ndarray:
    img = np.full((height, width, 3), 255, np.uint8)
    pad = 20
    img[pad, pad:-pad] = img[-pad, pad:-pad] = 0
    img[pad:-pad, pad] = img[pad:-pad, -pad] = 0
    points = [p for p in list(train) + list(val) if np.isfinite(p[1])]
    if not points:
        return img
    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    x0, x1 = xs.min(), max(xs.max(), xs.min() + 1)
    y0, y1 = ys.min(), max(ys.max(), ys.min() + 1e-9)

    def to_px(x, y):
        px = pad + 2 + (x - x0) / (x1 - x0) * (width - 2 * pad - 4)
        py = height - pad - 2 - (y - y0) / (y1 - y0) * (height - 2 * pad - 4)
        return px, py

    for series, color in ((train, (31, 119, 180)), (val, (255, 127, 14))):
        pts = [to_px(x, y) for x, y in series if np.isfinite(y)]
        for (ax, ay), (bx, by) in zip(pts, pts[1:] or pts, strict=False):
            n = int(max(abs(bx - ax), abs(by - ay))) + 2
            for t in np.linspace(0.0, 1.0, n):
                x, y = int(round(ax + t * (bx - ax))), int(round(ay + t * (by - ay)))
                img[max(y - 1, 0) : y + 1, max(x - 1, 0) : x + 1] = color
    return img


def write_loss_png(path: str | Path, train: Series, val: Series = (), width: int = 640, height: int = 400) -> Path:
    """Plot ``(step, loss)`` series to ``path``; returns the path."""
    path = Path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path.write_bytes(encode_png(_draw(train, val, width, height)))
        return path
    fig, ax = plt.subplots(figsize=(width / 100, height / 100), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=False), label="train")
    if val:
        ax.plot(*zip(*val, strict=False), label="validation", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
