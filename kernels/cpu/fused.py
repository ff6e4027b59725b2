"""Fused kernels of the training step (Numba CPU); the reference's ``fused`` says what they compute.

``bias_act_backward`` adds each row's ``dz`` to the column sums in the same order as ``bias_grad``
(serially, or per block of rows into partial sums that are then summed), so it gives bit for bit what
the separate ``*_backward`` and ``bias_grad`` calls give, in one pass over ``dy``.
"""

import numpy as np
from numba import prange

from . import activations as act
from ._jit import jit
from ._parallel import CHUNK, PARALLEL_MIN


def _bias_act_backward_kernel(op, name):
    """``(y, dy, alpha, dz, db)`` for the derivative ``op(y, dy, alpha)``."""

    @act.scalar
    def rows(y, dy, alpha, dz, db):
        db[:] = 0
        for r in range(y.shape[0]):
            for j in range(db.size):
                d = op(y[r, j], dy[r, j], alpha)
                dz[r, j] = d
                db[j] += d

    def kernel(y, dy, alpha, dz, db):
        n = y.shape[0]
        if y.size < act.PARALLEL_MIN:
            rows(y, dy, alpha, dz, db)
            return
        block = max(1, CHUNK // y.shape[1])  # the row blocks of bias_grad
        partial = np.empty(((n + block - 1) // block, y.shape[1]), y.dtype)
        for b in prange(partial.shape[0]):
            lo, hi = b * block, min(n, (b + 1) * block)
            rows(y[lo:hi], dy[lo:hi], alpha, dz[lo:hi], partial[b])
        db[:] = 0
        for b in range(partial.shape[0]):
            for j in range(db.size):
                db[j] += partial[b, j]

    kernel.__name__ = kernel.__qualname__ = name
    return jit(kernel, parallel=True)


_BIAS_ACT_BACKWARD = {
    "relu": _bias_act_backward_kernel(act._relu_backward, "bias_relu_backward"),
    "leaky_relu": _bias_act_backward_kernel(act._leaky_relu_backward, "bias_leaky_relu_backward"),
    "sigmoid": _bias_act_backward_kernel(act._sigmoid_backward, "bias_sigmoid_backward"),
    "tanh": _bias_act_backward_kernel(act._tanh_backward, "bias_tanh_backward"),
}


def bias_act_backward(y, dy, activation, alpha, dz, db):
    _BIAS_ACT_BACKWARD[activation](y, dy, y.dtype.type(alpha), dz, db)


@jit(inline="always")
def _segment_norm(x, lo, hi):
    total = 0.0
    for j in range(lo, hi):
        v = np.float64(x[j])
        total += v * v
    return np.sqrt(total)


@jit(parallel=True)
def segment_norms(x, offsets, out):
    """One pass over the flat buffer, no BLAS; segments in parallel when the buffer is large."""
    if x.size < PARALLEL_MIN:
        for i in range(out.size):
            out[i] = _segment_norm(x, offsets[i], offsets[i + 1])
    else:
        for i in prange(out.size):
            out[i] = _segment_norm(x, offsets[i], offsets[i + 1])
