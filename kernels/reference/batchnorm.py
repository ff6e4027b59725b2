"""Batch normalisation of dense features, (N, C) arrays normalised per column (torch.nn.BatchNorm1d).

Training normalises with the batch's mean and biased variance and updates the running estimates in
place (``running = (1 - momentum) * running + momentum * batch``, the variance unbiased by
n / (n - 1)); evaluation normalises with the running estimates. The forward pass saves ``xhat`` and
``inv_std`` for the backward pass.
"""

import numpy as np


def batchnorm_forward(x, gamma, beta, running_mean, running_var, momentum, eps, y, xhat, inv_std):
    n = x.shape[0]
    mean = x.mean(axis=0)
    var = x.var(axis=0)
    running_mean *= 1 - momentum
    running_mean += momentum * mean
    running_var *= 1 - momentum
    running_var += (momentum * n / max(n - 1, 1)) * var
    inv_std[...] = 1 / np.sqrt(var + eps)
    np.multiply(x - mean, inv_std, out=xhat)
    np.add(xhat * gamma, beta, out=y)


def batchnorm_eval(x, gamma, beta, running_mean, running_var, eps, y):
    np.add((x - running_mean) * (1 / np.sqrt(running_var + eps)) * gamma, beta, out=y)


def batchnorm_backward(dy, xhat, gamma, inv_std, dx, dgamma, dbeta):
    n = dy.shape[0]
    dgamma[...] = (dy * xhat).sum(axis=0)
    np.sum(dy, axis=0, out=dbeta)
    np.multiply(gamma * inv_std / n, n * dy - dbeta - xhat * dgamma, out=dx)
