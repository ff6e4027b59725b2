"""Batch normalisation (numba-cuda); the reference's ``batchnorm`` says what is computed.

One thread per column walks down the rows (neighbouring threads read neighbouring columns), with
float64 accumulators in the same order as the numba backend: mean, then squared deviations, then the
normalised outputs. Deterministic, no atomics.
"""

import math

from numba import cuda

from ._launch import grid, kernel


@kernel
def _forward(x, gamma, beta, running_mean, running_var, momentum, eps, y, xhat, inv_std):
    n = x.shape[0]
    rows = max(n, 1)
    unbias = n / max(n - 1, 1)
    for j in range(cuda.grid(1), x.shape[1], cuda.gridsize(1)):
        mean = 0.0
        for r in range(n):
            mean += x[r, j]
        mean /= rows
        var = 0.0
        for r in range(n):
            d = x[r, j] - mean
            var += d * d
        var /= rows
        running_mean[j] = (1 - momentum) * running_mean[j] + momentum * mean
        running_var[j] = (1 - momentum) * running_var[j] + momentum * unbias * var
        s = 1 / math.sqrt(var + eps)
        inv_std[j] = s
        for r in range(n):
            h = (x[r, j] - mean) * s
            xhat[r, j] = h
            y[r, j] = h * gamma[j] + beta[j]


@kernel
def _eval(x, gamma, beta, running_mean, running_var, eps, y):
    for j in range(cuda.grid(1), x.shape[1], cuda.gridsize(1)):
        scale = gamma[j] / math.sqrt(running_var[j] + eps)
        for r in range(x.shape[0]):
            y[r, j] = (x[r, j] - running_mean[j]) * scale + beta[j]


@kernel
def _backward(dy, xhat, gamma, inv_std, dx, dgamma, dbeta):
    n = dy.shape[0]
    for j in range(cuda.grid(1), dy.shape[1], cuda.gridsize(1)):
        sum_dy = 0.0
        sum_dy_xhat = 0.0
        for r in range(n):
            sum_dy += dy[r, j]
            sum_dy_xhat += dy[r, j] * xhat[r, j]
        dbeta[j] = sum_dy
        dgamma[j] = sum_dy_xhat
        scale = gamma[j] * inv_std[j] / n
        for r in range(n):
            dx[r, j] = scale * (n * dy[r, j] - sum_dy - xhat[r, j] * sum_dy_xhat)


def batchnorm_forward(x, gamma, beta, running_mean, running_var, momentum, eps, y, xhat, inv_std):
    if x.shape[1]:
        _forward[grid(x.shape[1])](x, gamma, beta, running_mean, running_var, float(momentum), float(eps), y, xhat,
                                   inv_std)


def batchnorm_eval(x, gamma, beta, running_mean, running_var, eps, y):
    if x.shape[1]:
        _eval[grid(x.shape[1])](x, gamma, beta, running_mean, running_var, float(eps), y)


def batchnorm_backward(dy, xhat, gamma, inv_std, dx, dgamma, dbeta):
    if dy.shape[1]:
        _backward[grid(dy.shape[1])](dy, xhat, gamma, inv_std, dx, dgamma, dbeta)
