"""MLX's failed file writes as an `OSError` with the reason: disk full, over quota, I/O error.

MLX 0.32's writer (``mx.save_safetensors``, ``mx.save``) raises ``RuntimeError("[write]
Unable to write 129 bytes to file.")``: no file name, no errno. Here the same bytes are
written once more, by Python, to the same file (its half-written content is discarded
anyway); the OS then says why (``ENOSPC: No space left on device``) and the error names
the file the user would have got.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path

__all__ = ["mlx_write_error", "named_write_errors"]

_MLX_WRITE = re.compile(r"\[write\] Unable to write (\d+) bytes")
_PROBE_MAX = 1 << 20


def mlx_write_error(e: BaseException, path: Path, shown: Path | None = None) -> OSError | None:
    """``e`` as an OSError naming ``shown`` (default ``path``) and the OS's reason, when it is
    MLX's write failure on ``path``; None for any other error."""
    found = _MLX_WRITE.search(str(e)) if isinstance(e, RuntimeError) else None
    if found is None:
        return None
    shown = Path(shown or path)
    size = min(max(int(found.group(1)), 1), _PROBE_MAX)
    code, reason = errno.EIO, f"MLX could not write {found.group(1)} bytes to it (the disk was full or failed)"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"\0" * size)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as probe:
        code, reason = probe.errno or code, probe.strerror or reason
    return OSError(code, reason, str(shown))


@contextlib.contextmanager
def named_write_errors(path: str | Path, shown: str | Path | None = None):
    """Turn MLX's write failure on ``path`` inside the block into `mlx_write_error`'s OSError."""
    try:
        yield
    except RuntimeError as e:
        err = mlx_write_error(e, Path(path), Path(shown) if shown is not None else None)
        if err is None:
            raise
        raise err from None
