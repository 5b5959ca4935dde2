"""The dropout mask of csrc/kernels/lora_dropout.h restated in numpy: the tests' one oracle for it.

uint32 arithmetic wraps as in C; indices are 64-bit flat element indices.
"""

import numpy as np


def spec_bits(key0, key1, index):
    """The hash of flat element ``index`` under key ``(key0, key1)``."""

    def mix(h):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x7FEB352D)
        h = h ^ (h >> np.uint32(15))
        h = h * np.uint32(0x846CA68B)
        return h ^ (h >> np.uint32(16))

    index = np.asarray(index, dtype=np.uint64)
    lo = (index & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (index >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        return mix(mix(lo ^ np.uint32(key0)) ^ (np.uint32(key1) + hi * np.uint32(0x9E3779B9)))


def spec_mask(key0, key1, index, p):
    """The float32 multipliers: 1/(1-p) where the hash is below the keep threshold, else 0."""
    t = (np.float32(1) - np.float32(p)) * np.float32(4294967296.0)
    threshold = np.uint32(0xFFFFFFFF) if t >= np.float32(4294967295.0) else np.uint32(t)
    keep = spec_bits(key0, key1, index) < threshold
    return np.where(keep, np.float32(1) / (np.float32(1) - np.float32(p)), np.float32(0))
