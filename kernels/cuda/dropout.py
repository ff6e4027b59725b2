"""Inverted dropout with the reference's counter-based RNG (SplitMix64 of the element index), so the
mask is bit-identical to the CPU backends' for the same seed.

The 64-bit products are computed from 32-bit halves: wrapping uint64 arithmetic is what SplitMix64
needs, and the halves keep every intermediate below 2**64, so the CUDA simulator (which runs the kernel
on NumPy scalars) raises no overflow warning. On a GPU a 64-bit multiply is several 32-bit ones anyway.
"""

import numba
import numpy as np
from numba import cuda

from ..reference.dropout import GAMMA, MUL1, MUL2, keep_threshold, stream
from ._launch import ZERO, grid, kernel

_LOW = np.uint64(0xFFFFFFFF)
_32, _30, _27, _31, _40 = (np.uint64(s) for s in (32, 30, 27, 31, 40))
_GAMMA, _MUL1, _MUL2 = np.uint64(GAMMA), np.uint64(MUL1), np.uint64(MUL2)


@cuda.jit(device=True)
def _mul64(a, b):
    """a * b modulo 2**64."""
    a_lo, a_hi, b_lo, b_hi = a & _LOW, a >> _32, b & _LOW, b >> _32
    low = a_lo * b_lo
    mid = ((a_hi * b_lo) & _LOW) + ((a_lo * b_hi) & _LOW) + (low >> _32)
    return ((mid & _LOW) << _32) | (low & _LOW)


@cuda.jit(device=True)
def _add64(a, b):
    """a + b modulo 2**64."""
    low = (a & _LOW) + (b & _LOW)
    high = (a >> _32) + (b >> _32) + (low >> _32)
    return ((high & _LOW) << _32) | (low & _LOW)


@kernel
def _dropout(x, stream, threshold, scale, out):
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        z = _add64(stream, _mul64(numba.uint64(i) + numba.uint64(1), _GAMMA))
        z = _mul64(z ^ (z >> _30), _MUL1)
        z = _mul64(z ^ (z >> _27), _MUL2)
        z = z ^ (z >> _31)
        out[i] = x[i] * (scale if (z >> _40) >= threshold else ZERO * scale)


def dropout(x, p, seed, offset, out):
    if out.shape[0]:
        _dropout[grid(out.shape[0])](x, np.uint64(stream(seed, offset)), np.uint64(keep_threshold(p)),
                                     out.dtype.type(1 / (1 - p)), out)
