"""Batch normalisation (Numba CPU); the reference's ``batchnorm`` says what is computed.

Column statistics are accumulated in float64 over the rows in order (mean first, then the squared
deviations from it: two passes, no cancellation), the parts' statistics merged in part order, and each
element is normalised in one more pass. Serial: BatchNorm layers are narrow, and the passes are streaming
reads.
"""

import numpy as np

from ..reference.batchnorm import merge_column
from ._jit import jit

_merge_column = jit(inline="always")(merge_column)


@jit(inline="always")
def _column_sums(a, b, product):
    """Per column, the float64 sum over the rows (in order) of a * b (``product``), else of a."""
    out = np.zeros(a.shape[1])
    for r in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[j] += a[r, j] * b[r, j] if product else a[r, j]
    return out


@jit
def batchnorm_stats(x, stats):
    n, c = x.shape
    mean = _column_sums(x, x, False) / max(n, 1)
    mean_t = mean.astype(x.dtype)
    m2 = np.zeros(c)
    for r in range(n):  # squared deviations from the mean: no cancellation
        for j in range(c):
            d = x[r, j] - mean_t[j]
            m2[j] += d * d
    for j in range(c):
        stats[0, j], stats[1, j], stats[2, j] = n, mean[j], m2[j]


@jit
def batchnorm_forward(x, gamma, beta, running_mean, running_var, stats, momentum, eps, y, xhat, inv_std):
    n, c = x.shape
    mean_t = np.empty(c, x.dtype)
    for j in range(c):
        count, mean, m2 = _merge_column(stats, j)
        var = m2 / max(count, 1.0)
        unbias = count / max(count - 1, 1.0)
        running_mean[j] = (1 - momentum) * running_mean[j] + momentum * mean
        running_var[j] = (1 - momentum) * running_var[j] + momentum * unbias * var
        inv_std[j] = 1 / np.sqrt(var + eps)
        mean_t[j] = mean
    for r in range(n):
        for j in range(c):
            h = (x[r, j] - mean_t[j]) * inv_std[j]
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
def batchnorm_backward_sums(dy, xhat, sums, dgamma, dbeta):
    sum_dy = _column_sums(dy, dy, False)
    sum_dy_xhat = _column_sums(dy, xhat, True)
    for j in range(dy.shape[1]):
        sums[0, j], sums[1, j], sums[2, j] = dy.shape[0], sum_dy[j], sum_dy_xhat[j]
        dbeta[j] = sum_dy[j]
        dgamma[j] = sum_dy_xhat[j]


@jit
def batchnorm_backward(dy, xhat, gamma, inv_std, sums, dx):
    n, c = dy.shape
    total = sums[0].copy()
    for p in range(1, sums.shape[0]):  # in part order
        total += sums[p]
    for r in range(n):  # in float64, from the float64 sums
        for j in range(c):
            count = total[0, j]
            scale = np.float64(gamma[j]) * inv_std[j] / count
            dx[r, j] = scale * (count * np.float64(dy[r, j]) - total[1, j] - xhat[r, j] * total[2, j])
