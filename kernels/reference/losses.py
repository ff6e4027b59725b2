"""Losses, each returning the mean loss (a scalar of the input dtype) and writing d(loss)/d(input).

Means are over the batch for softmax cross-entropy, over all elements for the others (as torch's
default ``reduction="mean"``). Everything is computed in the input dtype.
"""

import numpy as np


def softmax_cross_entropy(logits, labels, dlogits):
    n = logits.shape[0]
    rows = np.arange(n)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[rows, labels].mean()
    np.exp(log_probs, out=dlogits)
    dlogits[rows, labels] -= 1
    dlogits /= n
    return logits.dtype.type(loss)


def mse(pred, target, dpred):
    diff = pred - target
    np.multiply(diff, 2 / diff.size, out=dpred)
    return pred.dtype.type(np.mean(diff * diff))


def binary_cross_entropy(logits, target, dpred):
    z = np.exp(-np.abs(logits))  # log(1 + exp(-|x|)) and sigmoid without overflow
    loss = np.mean(np.maximum(logits, 0) - logits * target + np.log1p(z))
    sigmoid = np.where(logits >= 0, 1, z) / (1 + z)
    np.multiply(sigmoid - target, 1 / logits.size, out=dpred)
    return logits.dtype.type(loss)


def hinge(scores, target, dpred):
    margin = 1 - target * scores
    np.multiply(np.where(margin > 0, -target, 0), 1 / scores.size, out=dpred)
    return scores.dtype.type(np.mean(np.maximum(margin, 0)))


def bias_grad(dy, out):
    """Gradient of a bias added to every row: the column sums of ``dy``."""
    np.sum(dy, axis=0, out=out)
