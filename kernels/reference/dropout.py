"""Inverted dropout with a counter-based RNG.

Element ``i`` (its C-order index) is kept when ``bits(seed, offset + i) >= ceil(p * 2**24)``, where
``bits(seed, j)`` is the top 24 bits of SplitMix64's output for counter ``j + 1`` of a stream started at
``mix(seed)``. The mask depends only on (seed, offset + i): the same on every backend and for any number
of threads, and it need not be stored, since the backward pass is the same call on ``dy``. ``offset``
lets a slice of a larger array draw the larger array's mask (a rank's share of a global batch). Kept
values are scaled by ``1 / (1 - p)``.
"""

import numpy as np

GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's stream increment (2**64 / golden ratio)
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB
MASK64 = 2**64 - 1


def mix(z):
    """SplitMix64's finaliser on a Python int (used once per call, for the seed)."""
    z = ((z ^ (z >> 30)) * MUL1) & MASK64
    z = ((z ^ (z >> 27)) * MUL2) & MASK64
    return z ^ (z >> 31)


def stream(seed, offset):
    """The stream's start shifted by ``offset`` counters: counter ``i + 1`` then draws element ``offset + i``."""
    return (mix(seed) + offset * GAMMA) & MASK64


def keep_threshold(p):
    """Integer threshold on the 24 random bits: keep with probability 1 - p (to 2**-24)."""
    return int(np.ceil(p * 2**24))


def random_bits(seed, n, offset=0):
    """The 24-bit random integers of elements offset..offset+n-1 (uint64 arithmetic wraps modulo 2**64)."""
    z = np.uint64(stream(seed, offset)) + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(GAMMA))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MUL1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MUL2)
    z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(40)


def dropout(x, p, seed, offset, out):
    keep = random_bits(seed, x.size, offset).reshape(x.shape) >= keep_threshold(p)
    np.multiply(x, np.where(keep, x.dtype.type(1 / (1 - p)), x.dtype.type(0)), out=out)
