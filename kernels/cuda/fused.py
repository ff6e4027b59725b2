"""Fused kernels of the training step (numba-cuda); the reference's ``fused`` says what they compute.

``bias_act_backward``: one thread per column walks down the rows, writing ``dz`` and summing the
column in row order (deterministic, no atomics; neighbouring threads read neighbouring columns).
``segment_norms``: one block per segment, float64 partial sums per thread, a tree reduction.
``dense_grad_norm``: one block; each dot product of the Gram matrices (row pairs in order, serially) as
float64 partial sums per thread and a tree reduction, so every thread takes the same branch; the exact
fallback one element of dW per thread at a time.
"""

import functools
import math

import numpy as np
from numba import cuda

from .. import _scalar
from ..reference.fused import FACTOR_MAX, FACTOR_MIN, factor_limit
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


@cuda.jit(device=True)
def _row_dot(a, r, b, s):
    """This thread's share of ``a[r] . b[s]`` in float64: the elements from its index on, a block apart."""
    acc = 0.0
    for p in range(cuda.threadIdx.x, a.shape[1], cuda.blockDim.x):
        acc = cuda.fma(np.float64(a[r, p]), np.float64(b[s, p]), acc)
    return acc


@cuda.jit(device=True)
def _trusted(shared, squares, a, r):
    """Whether row ``r``'s sum of ``squares`` (the same in every thread) lies where the factors are exact in
    float64 (NaN: no), or the row is zeros (not merely squares rounded to 0: its largest magnitude is 0)."""
    if FACTOR_MIN <= squares and squares <= FACTOR_MAX:
        return True
    if squares != 0:
        return False
    top = 0.0
    for p in range(cuda.threadIdx.x, a.shape[1], cuda.blockDim.x):
        top = max(top, abs(np.float64(a[r, p])))
    return block_reduce(shared, top, True) == 0


@functools.cache
def _dense_grad_norm_kernel(threads):
    @kernel
    def dense_grad_norm(x, dy, db, limit, zero, out):
        shared = cuda.shared.array(threads, np.float64)
        rows, n = x.shape[0], dy.shape[1]
        trusted, bound, total = True, 0.0, 0.0  # the same in every thread: each sum comes from block_reduce
        for r in range(rows):  # the diagonal pairs (r, r)
            sx = block_reduce(shared, _row_dot(x, r, x, r), False)
            sd = block_reduce(shared, _row_dot(dy, r, dy, r), False)
            trusted = _trusted(shared, sx, x, r) and _trusted(shared, sd, dy, r) and trusted
            bound += math.sqrt(sx) * math.sqrt(sd)
            total += sx * sd
        if trusted and bound < limit:
            for r in range(rows):  # the pairs r < s, each twice
                for s in range(r + 1, rows):
                    total += 2 * (block_reduce(shared, _row_dot(x, r, x, s), False)
                                  * block_reduce(shared, _row_dot(dy, r, dy, s), False))
            w = math.sqrt(max(total, 0.0))  # >= 0 but for rounding
        else:  # the product as x's dtype computes it (a chain of FMAs from zero over the rows), squared
            acc = 0.0
            for e in range(cuda.threadIdx.x, x.shape[1] * n, cuda.blockDim.x):
                p, j = e // n, e % n
                g = zero
                for r in range(rows):
                    g = cuda.fma(x[r, p], dy[r, j], g)
                v = np.float64(g)
                acc += v * v
            w = math.sqrt(block_reduce(shared, acc, False))
        acc = 0.0
        for j in range(cuda.threadIdx.x, db.shape[0], cuda.blockDim.x):
            v = np.float64(db[j])
            acc = cuda.fma(v, v, acc)
        bias = block_reduce(shared, acc, False)
        if cuda.threadIdx.x == 0:
            out[0] = math.hypot(w, math.sqrt(bias))

    return dense_grad_norm


def dense_grad_norm(x, dy, db, out):
    """One block; the bound of dW's elements is compared with ``factor_limit`` of x's dtype and rows,
    computed here (on the host, from the dtype and shape: no device data read)."""
    threads = geometry().row_threads
    limit = factor_limit(x.dtype, x.shape[0])
    _dense_grad_norm_kernel(threads)[1, threads](x, dy, db, limit, x.dtype.type(0), out)
