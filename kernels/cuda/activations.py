"""Activations and their gradients: grid-stride elementwise kernels, and softmax with a warp or a block
per row.

The elementwise kernels are built from the formulas of ``kernels/_scalar.py`` (shared with the numba
backend; the matmul epilogue and ``bias_act_backward`` use them too) by two generic grid-stride kernels,
for one and for two input arrays.
"""

import functools

import numba
import numpy as np
from numba import cuda

from .. import _scalar
from ._launch import (WARP, block_reduce, block_reduce_online, exp, grid, kernel, online_add, row_layout, warp_reduce,
                      warp_reduce_online)

# ---- generic elementwise kernels ----------------------------------------------------------------------


@functools.cache
def _unary_kernel(fn):
    @kernel
    def unary(x, alpha, out):
        for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
            v = x[i]
            out[i] = fn(v, v, alpha)

    return unary


@functools.cache
def _binary_kernel(fn):
    @kernel
    def binary(a, b, alpha, out):
        for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
            out[i] = fn(a[i], b[i], alpha)

    return binary


def _unary(fn, x, alpha, out):
    if out.shape[0]:
        _unary_kernel(fn)[grid(out.shape[0])](x, out.dtype.type(alpha), out)


def _binary(fn, a, b, alpha, out):
    if out.shape[0]:
        _binary_kernel(fn)[grid(out.shape[0])](a, b, out.dtype.type(alpha), out)


@cuda.jit(device=True)
def _times(x, _, factor):
    return x * factor


def scale(x, factor, out):
    """``out = x * factor``: ``x`` any device array of ``out``'s size (a loss's 0-d result too), ``out``
    C-contiguous, ``factor`` a host number (cast to out's dtype). nn's glue (a rank's weighted loss)."""
    _unary(_times, x.reshape(out.size), factor, out.reshape(out.size))


def relu(x, out):
    _unary(_scalar.relu, x, 0, out)


def relu_backward(x, dy, out):
    _binary(_scalar.relu_backward, x, dy, 0, out)


def leaky_relu(x, alpha, out):
    _unary(_scalar.leaky_relu, x, alpha, out)


def leaky_relu_backward(x, dy, alpha, out):
    _binary(_scalar.leaky_relu_backward, x, dy, alpha, out)


def sigmoid(x, out):
    _unary(_scalar.sigmoid, x, 0, out)


def sigmoid_backward(y, dy, out):
    _binary(_scalar.sigmoid_backward, y, dy, 0, out)


def tanh(x, out):
    _unary(_scalar.tanh_forward, x, 0, out)


def tanh_backward(y, dy, out):
    _binary(_scalar.tanh_backward, y, dy, 0, out)


# ---- softmax: a warp or a block per row (see row_layout) --------------------------------------------


def row_kernel_setup(warp_rows, row_threads):
    """A device function giving the row loop's parameters for a warp (``warp_rows``) or a block per row:
    the thread's first row, the row stride, its first column and the column stride."""
    warps = row_threads // WARP
    if warp_rows:
        @cuda.jit(device=True)
        def setup():
            return (cuda.blockIdx.x * warps + cuda.threadIdx.x // WARP, cuda.gridDim.x * warps,
                    cuda.threadIdx.x % WARP, WARP)
    else:
        @cuda.jit(device=True)
        def setup():
            return cuda.blockIdx.x, cuda.gridDim.x, cuda.threadIdx.x, cuda.blockDim.x
    return setup


@functools.cache
def _softmax_kernels(dtype, warp_rows, row_threads):
    nb_dtype, zero, lowest = numba.from_dtype(dtype), dtype.type(0), dtype.type(-np.inf)
    setup = row_kernel_setup(warp_rows, row_threads)

    @kernel
    def forward(x, out):
        """The row's max and sum of exp(x - max) in one online pass, then out = exp(x - max) / sum: x is
        read twice, out written once."""
        shared_m = cuda.shared.array(row_threads, nb_dtype)
        shared_s = cuda.shared.array(row_threads, nb_dtype)
        first, row_step, t, step = setup()
        for row in range(first, x.shape[0], row_step):
            m, s = lowest, zero
            for j in range(t, x.shape[1], step):
                m, s = online_add(m, s, x[row, j], lowest)
            if warp_rows:
                m, s = warp_reduce_online(m, s, lowest)
            else:
                m, s = block_reduce_online(shared_m, shared_s, m, s, lowest)
            for j in range(t, x.shape[1], step):
                out[row, j] = exp(x[row, j] - m) / s

    @kernel
    def backward(y, dy, out):
        shared = cuda.shared.array(row_threads, nb_dtype)
        first, row_step, t, step = setup()
        for row in range(first, y.shape[0], row_step):
            dot = zero
            for j in range(t, y.shape[1], step):
                dot += dy[row, j] * y[row, j]
            dot = warp_reduce(dot, False) if warp_rows else block_reduce(shared, dot, False)
            for j in range(t, y.shape[1], step):
                out[row, j] = y[row, j] * (dy[row, j] - dot)

    return forward, backward


def _row_launch(which, x, *args):
    warp_rows, blocks, threads = row_layout(*x.shape)
    _softmax_kernels(np.dtype(x.dtype), warp_rows, threads)[which][blocks, threads](x, *args)


def softmax(x, out):
    if out.size:
        _row_launch(0, x, out)


def softmax_backward(y, dy, out):
    if out.size:
        _row_launch(1, y, dy, out)
