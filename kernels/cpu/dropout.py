"""Inverted dropout with the reference's counter-based RNG (``kernels/reference/dropout.py``), bit for bit.

Element ``i`` draws SplitMix64's output for counter ``i + 1`` of the stream started at ``mix(seed)``,
computed on its own from (seed, i) in wrapping uint64 arithmetic (the reference's own ``mix``, compiled),
so the loop vectorises, runs in parallel chunks (see ``_parallel.py``) and gives the same mask for
any number of threads.
"""

import numpy as np

from ..reference.dropout import GAMMA, keep_threshold, mix, stream
from ._jit import jit
from ._parallel import chunked, run

_mix = jit(mix, inline="always")  # on uint64 the masks in mix() are no-ops: the products wrap mod 2**64
_GAMMA, _ONE = np.uint64(GAMMA), np.uint64(1)
_TOP24 = np.uint64(40)  # shift that keeps the top 24 of 64 bits


@jit(fastmath=False)  # x * 0 must stay NaN for NaN and -0 for negative x, as in the reference
def _dropout(lo, hi, x, out, start, threshold, scale, zero):
    for i in range(lo, hi):
        bits = _mix(start + (i + _ONE) * _GAMMA) >> _TOP24
        out[i] = x[i] * (scale if bits >= threshold else zero)


_dropout_chunks = chunked(_dropout)


def dropout(x, p, seed, offset, out):
    """out = x * (1 / (1 - p)) where kept, x * 0 where dropped; the mask depends on (seed, offset + index) only."""
    t = x.dtype.type
    run(_dropout, _dropout_chunks, x.size, x, out, np.uint64(stream(seed, offset)), np.uint64(keep_threshold(p)),
        t(1 / (1 - p)), t(0))
