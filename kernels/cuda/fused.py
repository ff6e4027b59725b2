"""Fused kernels of the training step (numba-cuda); the reference's ``fused`` says what they compute.

``bias_act_backward``: one thread per column walks down the rows, writing ``dz`` and summing the
column in row order (deterministic, no atomics; neighbouring threads read neighbouring columns).
``segment_norms``: one block per segment, float64 partial sums per thread, a tree reduction.
"""

import functools
import math

import numpy as np
from numba import cuda

from .. import _scalar
from ._launch import block_reduce, geometry, grid, kernel


@functools.cache
def _bias_act_backward_kernel(derivative):
    @kernel
    def bias_act_backward(y, dy, alpha, zero, dz, db):
        for j in range(cuda.grid(1), db.shape[0], cuda.gridsize(1)):
            acc = zero
            for r in range(y.shape[0]):
                d = derivative(y[r, j], dy[r, j], alpha)
                dz[r, j] = d
                acc += d
            db[j] = acc

    return bias_act_backward


def bias_act_backward(y, dy, activation, alpha, dz, db):
    if db.shape[0]:
        t = db.dtype.type
        derivative = _scalar.ACTIVATIONS[activation][1]
        _bias_act_backward_kernel(derivative)[grid(db.shape[0])](y, dy, t(alpha), t(0), dz, db)


@functools.cache
def _segment_norms_kernel(threads):
    @kernel
    def segment_norms(x, offsets, out):
        shared = cuda.shared.array(threads, np.float64)
        for s in range(cuda.blockIdx.x, out.shape[0], cuda.gridDim.x):
            acc = 0.0
            for j in range(offsets[s] + cuda.threadIdx.x, offsets[s + 1], cuda.blockDim.x):
                v = np.float64(x[j])
                acc += v * v
            total = block_reduce(shared, acc, False)
            if cuda.threadIdx.x == 0:
                out[s] = math.sqrt(total)

    return segment_norms


def segment_norms(x, offsets, out):
    if out.shape[0]:
        threads = geometry().row_threads
        _segment_norms_kernel(threads)[min(out.shape[0], 1024), threads](x, offsets, out)
