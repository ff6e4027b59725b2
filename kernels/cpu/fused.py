"""Fused kernels of the training step (Numba CPU); the reference's ``fused`` says what they compute.

``bias_act_backward`` adds each row's ``dz`` to the column sums in the same order as ``bias_grad``
(serially, or per block of rows into partial sums that are then summed), so it gives bit for bit what
the separate ``*_backward`` and ``bias_grad`` calls give, in one pass over ``dy``.
"""

import numpy as np
from numba import prange

from . import activations as act
from ._jit import jit, serial
from ._parallel import CHUNK, n_chunks, scheduled


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


_BIAS_ACT_BACKWARD_SERIAL = {name: serial(kernel) for name, kernel in _BIAS_ACT_BACKWARD.items()}
_BIAS_ACT_BACKWARD_SCHEDULED = {name: scheduled(kernel, _BIAS_ACT_BACKWARD_SERIAL[name], act.PARALLEL_MIN)
                                for name, kernel in _BIAS_ACT_BACKWARD.items()}


def bias_act_backward(y, dy, activation, alpha, dz, db):
    _BIAS_ACT_BACKWARD_SCHEDULED[activation](y, dy, y.dtype.type(alpha), dz, db)


NORMS_PARALLEL_MIN = 1 << 19  # one read-only pass: threads paid off only from about this size


@jit
def _sum_squares(x, lo, hi):
    """Sum of x[lo:hi]**2 in float64 (unsigned bounds: the loop vectorises)."""
    total = 0.0
    for j in range(np.uint64(lo), np.uint64(hi)):
        v = np.float64(x[j])
        total += v * v
    return total


@jit(parallel=True)
def segment_norms(x, offsets, out):
    """One pass over the flat buffer, no BLAS. Each segment's sum of squares is summed from its pieces in
    the fixed CHUNK-sized pieces of the buffer, in chunk order, serially or (large buffers) in parallel, so
    the result depends neither on the thread count nor on the branch, and a caller that has the pieces'
    sums (the compiled epoch's product-and-update pass) gets the same norm."""
    segments = out.size
    if x.size < NORMS_PARALLEL_MIN:
        for s in range(segments):
            lo, hi = offsets[s], offsets[s + 1]
            total = 0.0
            for c in range(lo // CHUNK, n_chunks(hi)):
                a, b = max(lo, c * CHUNK), min(hi, (c + 1) * CHUNK)
                if a < b:
                    total += _sum_squares(x, a, b)
            out[s] = np.sqrt(total)
        return
    chunks = n_chunks(x.size)
    partial = np.zeros((chunks, segments))
    for c in prange(chunks):
        lo, hi = c * CHUNK, min(x.size, (c + 1) * CHUNK)
        for s in range(segments):
            a, b = max(lo, offsets[s]), min(hi, offsets[s + 1])
            if a < b:
                partial[c, s] = _sum_squares(x, a, b)
    for s in range(segments):
        total = 0.0
        for c in range(chunks):
            total += partial[c, s]
        out[s] = np.sqrt(total)


segment_norms_serial = serial(segment_norms)
segment_norms_scheduled = scheduled(segment_norms, segment_norms_serial, NORMS_PARALLEL_MIN)
