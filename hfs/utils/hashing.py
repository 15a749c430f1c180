"""Counter-based hashing: random numbers as a pure function of a key, with no table and no state."""

from __future__ import annotations

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each element (SplitMix64's finaliser)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def hashed_uniform(x: np.ndarray) -> np.ndarray:
    """A uniform float64 in [0, 1) per element, from its 64-bit hash."""
    return (splitmix64(x) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
