"""Batch normalisation (Numba CPU); the reference's ``batchnorm`` says what is computed.

Column statistics are accumulated in float64 over the rows in order (mean first, then the squared
deviations from it: two passes, no cancellation), then each element is normalised in one more pass.
Serial: BatchNorm layers are narrow, and the passes are streaming reads.
"""

import numpy as np

from ._jit import jit


@jit(inline="always")
def _column_sums(a, b, product):
    """Per column, the float64 sum over the rows (in order) of a * b (``product``), else of a."""
    out = np.zeros(a.shape[1])
    for r in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[j] += a[r, j] * b[r, j] if product else a[r, j]
    return out


@jit
def batchnorm_forward(x, gamma, beta, running_mean, running_var, momentum, eps, y, xhat, inv_std):
    n, c = x.shape
    mean = _column_sums(x, x, False) / max(n, 1)
    mean_t = mean.astype(x.dtype)
    for r in range(n):  # centred first: the variance from it has no cancellation
        for j in range(c):
            xhat[r, j] = x[r, j] - mean_t[j]
    var = _column_sums(xhat, xhat, True) / max(n, 1)
    unbias = n / max(n - 1, 1)
    for j in range(c):
        running_mean[j] = (1 - momentum) * running_mean[j] + momentum * mean[j]
        running_var[j] = (1 - momentum) * running_var[j] + momentum * unbias * var[j]
        inv_std[j] = 1 / np.sqrt(var[j] + eps)
    for r in range(n):
        for j in range(c):
            h = xhat[r, j] * inv_std[j]
            xhat[r, j] = h
            y[r, j] = h * gamma[j] + beta[j]


@jit
def batchnorm_eval(x, gamma, beta, running_mean, running_var, eps, y):
    n, c = x.shape
    scale = np.empty(c, x.dtype)
    for j in range(c):
        scale[j] = gamma[j] / np.sqrt(np.float64(running_var[j]) + eps)
    for r in range(n):
        for j in range(c):
            y[r, j] = (x[r, j] - running_mean[j]) * scale[j] + beta[j]


@jit
def batchnorm_backward(dy, xhat, gamma, inv_std, dx, dgamma, dbeta):
    n, c = dy.shape
    sum_dy = _column_sums(dy, dy, False)
    sum_dy_xhat = _column_sums(dy, xhat, True)
    for j in range(c):
        dbeta[j] = sum_dy[j]
        dgamma[j] = sum_dy_xhat[j]
    for r in range(n):  # in float64, from the float64 sums
        for j in range(c):
            scale = np.float64(gamma[j]) * inv_std[j] / n
            dx[r, j] = scale * (n * np.float64(dy[r, j]) - sum_dy[j] - xhat[r, j] * sum_dy_xhat[j])
