"""The one reader of the package's on/off environment variables (``MLX_FUSED_LORA_*``).

``1/0``, ``true/false``, ``yes/no`` and ``on/off`` in any case, surrounding spaces
ignored; unset or empty means the switch's default. Anything else keeps the default and
warns once per variable, naming the variable, the value and the accepted spellings: a
mistyped switch must not flip silently either way.

Imports nothing from the package and not ``mlx.core``: ``fast_blas`` reads its switch
before MLX loads, and ``ops`` reads its own without reaching upward.
"""

import os
import warnings

__all__ = ["switch", "ON", "OFF"]

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")

_warned = set()  # variables already warned about in this process


def switch(name, default):
    """The on/off value of environment variable ``name``; ``default`` when unset, empty or unreadable."""
    raw = os.environ.get(name)
    value = "" if raw is None else raw.strip().lower()
    if value in ON:
        return True
    if value in OFF:
        return False
    if value and name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"{name}={raw!r} is not an on/off value (use {'/'.join(ON)} or {'/'.join(OFF)}, any case): "
            f"keeping the default, {'on' if default else 'off'}",
            RuntimeWarning,
            stacklevel=2,
        )
    return default
