"""Batch normalisation of dense features, (N, C) arrays normalised per column (torch.nn.BatchNorm1d).

Training is two kernels: ``batchnorm_stats`` reduces a batch (or this rank's part of it) to a small
float64 ``stats`` array, rows ``[count, mean, m2]`` per column (m2: the sum of squared deviations from the
mean); ``batchnorm_forward`` takes the stacked statistics of one or more parts of the batch ``(P, 3, C)``,
merges them (Chan et al.'s pairwise update: no cancellation, whatever the offset of the data), normalises
with the batch's mean and biased variance and updates the running estimates in place
(``running = (1 - momentum) * running + momentum * batch``, the variance unbiased by n / (n - 1)). It saves
``xhat`` and ``inv_std`` for the backward pass, which is two kernels again: ``batchnorm_backward_sums``
(rows ``[count, sum dy, sum dy * xhat]``, which are also the part's gradients of beta and gamma) and
``batchnorm_backward`` (dx from the sums of every part, added up). Evaluation normalises with the running
estimates. Several ranks exchange the stats arrays between the two kernels; one process passes its own.
"""

import numpy as np


def merge_column(stats, j):
    """``(count, mean, m2)`` of column ``j`` of the whole batch from the parts' ``(P, 3, C)`` statistics:
    Chan et al.'s pairwise update, in part order (one part: its own values, exactly). Plain scalar code,
    compiled as it is by the numba and cuda backends."""
    count, mean, m2 = stats[0, 0, j], stats[0, 1, j], stats[0, 2, j]
    for p in range(1, stats.shape[0]):
        total = count + stats[p, 0, j]
        if total > 0:
            delta = stats[p, 1, j] - mean
            share = stats[p, 0, j] / total
            mean += delta * share
            m2 += stats[p, 2, j] + delta * delta * count * share
        count = total
    return count, mean, m2


def batchnorm_stats(x, stats):
    stats[0] = x.shape[0]
    mean = x.mean(axis=0) if x.shape[0] else np.zeros(x.shape[1], x.dtype)
    stats[1] = mean
    stats[2] = ((x - mean) ** 2).sum(axis=0)


def batchnorm_forward(x, gamma, beta, running_mean, running_var, stats, momentum, eps, y, xhat, inv_std):
    count, mean, m2 = np.array([merge_column(stats, j) for j in range(x.shape[1])]).reshape(-1, 3).T
    n = int(count[0]) if count.size else 0
    mean, var = mean.astype(x.dtype), (m2 / max(n, 1)).astype(x.dtype)
    running_mean *= 1 - momentum
    running_mean += momentum * mean
    running_var *= 1 - momentum
    running_var += (momentum * n / max(n - 1, 1)) * var
    inv_std[...] = 1 / np.sqrt(var + eps)
    np.multiply(x - mean, inv_std, out=xhat)
    np.add(xhat * gamma, beta, out=y)


def batchnorm_eval(x, gamma, beta, running_mean, running_var, eps, y):
    np.add((x - running_mean) * (1 / np.sqrt(running_var + eps)) * gamma, beta, out=y)


def batchnorm_backward_sums(dy, xhat, sums, dgamma, dbeta):
    sums[0] = dy.shape[0]
    np.sum(dy, axis=0, out=dbeta)
    dgamma[...] = (dy * xhat).sum(axis=0)
    sums[1], sums[2] = dbeta, dgamma


def batchnorm_backward(dy, xhat, gamma, inv_std, sums, dx):
    if dy.size == 0:  # no rows (or columns) here: nothing to compute, and the batch may count none
        return
    count, dbeta, dgamma = (a.astype(dy.dtype) for a in sums.sum(axis=0))
    n = int(count[0])
    np.multiply(gamma * inv_std / n, n * dy - dbeta - xhat * dgamma, out=dx)
