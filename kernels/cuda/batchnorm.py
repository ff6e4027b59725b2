"""Batch normalisation (numba-cuda); the reference's ``batchnorm`` says what is computed.

One thread per column walks down the rows (neighbouring threads read neighbouring columns), with
float64 accumulators in the same order as the numba backend: mean, then squared deviations (the
statistics), then the parts' statistics merged and the normalised outputs. Deterministic, no atomics.
The float64 accumulators and operands are NumPy float64 so that the simulator computes in float64 as a
GPU does (NumPy 2 rounds a float32 plus a Python float to float32).
"""

import math

import numpy as np
from numba import cuda

from ..reference.batchnorm import merge_column
from ._launch import grid, kernel

_merge_column = cuda.jit(device=True)(merge_column)


@kernel
def _stats(x, stats):
    n = x.shape[0]
    for j in range(cuda.grid(1), x.shape[1], cuda.gridsize(1)):
        mean = np.float64(0.0)
        for r in range(n):
            mean += x[r, j]
        mean /= max(n, 1)
        m2 = np.float64(0.0)
        for r in range(n):
            d = x[r, j] - mean
            m2 += d * d
        stats[0, j] = n
        stats[1, j] = mean
        stats[2, j] = m2


@kernel
def _forward(x, gamma, beta, running_mean, running_var, stats, momentum, eps, y, xhat, inv_std):
    for j in range(cuda.grid(1), x.shape[1], cuda.gridsize(1)):
        count, mean, m2 = _merge_column(stats, j)
        var = m2 / max(count, 1.0)
        running_mean[j] = (1 - momentum) * np.float64(running_mean[j]) + momentum * mean
        running_var[j] = (1 - momentum) * np.float64(running_var[j]) + momentum * count / max(count - 1, 1.0) * var
        s = 1 / math.sqrt(var + eps)
        inv_std[j] = s
        for r in range(x.shape[0]):
            h = (x[r, j] - mean) * s
            xhat[r, j] = h
            y[r, j] = h * gamma[j] + beta[j]


@kernel
def _eval(x, gamma, beta, running_mean, running_var, eps, y):
    for j in range(cuda.grid(1), x.shape[1], cuda.gridsize(1)):
        scale = np.float64(gamma[j]) / math.sqrt(np.float64(running_var[j]) + eps)
        for r in range(x.shape[0]):
            y[r, j] = (x[r, j] - running_mean[j]) * scale + beta[j]


@kernel
def _backward_sums(dy, xhat, sums, dgamma, dbeta):
    for j in range(cuda.grid(1), dy.shape[1], cuda.gridsize(1)):
        sum_dy = np.float64(0.0)
        sum_dy_xhat = np.float64(0.0)
        for r in range(dy.shape[0]):
            sum_dy += dy[r, j]
            sum_dy_xhat += dy[r, j] * xhat[r, j]
        sums[0, j] = dy.shape[0]
        sums[1, j] = sum_dy
        sums[2, j] = sum_dy_xhat
        dbeta[j] = sum_dy
        dgamma[j] = sum_dy_xhat


@kernel
def _backward(dy, xhat, gamma, inv_std, sums, dx):
    for j in range(cuda.grid(1), dy.shape[1], cuda.gridsize(1)):
        count, sum_dy, sum_dy_xhat = sums[0, 0, j], sums[0, 1, j], sums[0, 2, j]
        for p in range(1, sums.shape[0]):  # in part order
            count += sums[p, 0, j]
            sum_dy += sums[p, 1, j]
            sum_dy_xhat += sums[p, 2, j]
        scale = gamma[j] * inv_std[j] / count
        for r in range(dy.shape[0]):
            dx[r, j] = scale * (count * dy[r, j] - sum_dy - xhat[r, j] * sum_dy_xhat)


def _columns(fn, x, *args):
    """Launch ``fn`` with one thread per column of ``x`` (none for no columns)."""
    if x.shape[1]:
        fn[grid(x.shape[1])](x, *args)


def batchnorm_stats(x, stats):
    _columns(_stats, x, stats)


def batchnorm_forward(x, gamma, beta, running_mean, running_var, stats, momentum, eps, y, xhat, inv_std):
    _columns(_forward, x, gamma, beta, running_mean, running_var, stats, float(momentum), float(eps), y, xhat,
             inv_std)


def batchnorm_eval(x, gamma, beta, running_mean, running_var, eps, y):
    _columns(_eval, x, gamma, beta, running_mean, running_var, float(eps), y)


def batchnorm_backward_sums(dy, xhat, sums, dgamma, dbeta):
    _columns(_backward_sums, dy, xhat, sums, dgamma, dbeta)


def batchnorm_backward(dy, xhat, gamma, inv_std, sums, dx):
    if dy.shape[0]:  # no rows here: nothing to compute, and the batch may count none (a division by 0)
        _columns(_backward, dy, xhat, gamma, inv_std, sums, dx)
