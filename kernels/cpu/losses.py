"""Losses (Numba CPU): each one fused pass that writes the gradient and returns the mean loss.

Rows (softmax cross-entropy) or chunks (the pointwise losses) run in parallel above
``activations.PARALLEL_MIN`` elements; each writes its own partial loss, and the partials are summed
afterwards, so there is no shared accumulator to race on. Everything is computed in the input dtype.
"""

import numpy as np
from numba import prange

from . import _math
from ._jit import jit, serial
from ._parallel import CHUNK, n_chunks, ordered_sum, scheduled
from .activations import PARALLEL_MIN, exp_shifted, row_max, scalar

TERMS_BLOCK = 1024  # elements: the pointwise losses' terms, summed while still in L1


@scalar
def _cross_entropy_row(x, label, inv_n, out):
    """Write ``(softmax(x) - onehot(label)) / n`` into ``out``; return ``-log softmax(x)[label]``."""
    m = row_max(x)
    total = exp_shifted(x, m, out)  # out holds exp(x - m): the probabilities are never stored apart
    scale = inv_n / total
    for j in range(out.size):
        out[j] *= scale
    out[label] -= inv_n
    return np.log(total) - (x[label] - m)


@jit(parallel=True)
def _cross_entropy(logits, labels, dlogits):
    n = logits.shape[0]
    inv_n = _math.typed(1 / n, logits)
    losses = np.empty(n, logits.dtype)
    if logits.size < PARALLEL_MIN:
        for r in range(n):
            losses[r] = _cross_entropy_row(logits[r], labels[r], inv_n, dlogits[r])
    else:
        for r in prange(n):
            losses[r] = _cross_entropy_row(logits[r], labels[r], inv_n, dlogits[r])
    return ordered_sum(losses) * inv_n


_cross_entropy_serial = serial(_cross_entropy)
_cross_entropy_scheduled = scheduled(_cross_entropy, _cross_entropy_serial, PARALLEL_MIN)


def softmax_cross_entropy(logits, labels, dlogits):
    """Mean loss as a NumPy scalar of the logits' dtype; dlogits written in the same pass."""
    return logits.dtype.type(_cross_entropy_scheduled(logits, labels, dlogits))


def pointwise_loss(op, name):
    """A kernel ``(pred, target, scale, grad) -> sum of the loss terms``, where ``op(p, t, scale)``
    returns one element's ``(loss term, gradient)``; parallel chunks keep their own partial sums.
    Block by block, one loop writes the gradient and the terms (into a scratch block still in L1), and a
    second loop that stores nothing sums them, so that the sum does not depend on where grad sits (see
    ``activations``). grad may be pred or target itself: each element is read before it is written."""

    @scalar
    def span(pred, target, scale, grad):
        terms = np.empty(min(grad.size, TERMS_BLOCK), pred.dtype)
        total = _math.typed(0, pred)
        for lo in range(0, grad.size, TERMS_BLOCK):
            hi = min(grad.size, lo + TERMS_BLOCK)
            p, t, g, e = pred[lo:hi], target[lo:hi], grad[lo:hi], terms[:hi - lo]
            for i in range(g.size):
                e[i], g[i] = op(p[i], t[i], scale)
            total += ordered_sum(e)
        return total

    def kernel(pred, target, scale, grad):
        n = grad.size
        if n < PARALLEL_MIN:
            return span(pred, target, scale, grad)
        partial = np.empty(n_chunks(n), pred.dtype)
        for c in prange(partial.size):
            lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
            partial[c] = span(pred[lo:hi], target[lo:hi], scale, grad[lo:hi])
        return ordered_sum(partial)

    kernel.__name__ = kernel.__qualname__ = name
    return jit(kernel, parallel=True)


@scalar
def _mse(p, t, scale):
    d = p - t
    return d * d, d * scale


@scalar
def _binary_cross_entropy(x, t, scale):
    zero, one = _math.typed(0, x), _math.typed(1, x)
    z = _math.exp(-abs(x))  # log(1 + exp(-|x|)) and the sigmoid from one exp, never overflowing
    sigmoid = (one if x >= zero else z) / (one + z)
    return (x if x > zero else zero) - x * t + _math.log1p_unit(z), (sigmoid - t) * scale


@scalar
def _hinge(s, t, scale):
    zero = _math.typed(0, s)
    margin = _math.typed(1, s) - t * s
    return (zero if margin < zero else margin), (-t * scale if margin > zero else zero)


_mse_kernel = pointwise_loss(_mse, "mse")
_binary_cross_entropy_kernel = pointwise_loss(_binary_cross_entropy, "binary_cross_entropy")
_hinge_kernel = pointwise_loss(_hinge, "hinge")


def _mean(kernel, pred, target, grad_scale, grad):
    dtype = pred.dtype.type
    return dtype(kernel(pred, target, dtype(grad_scale), grad)) / dtype(pred.size)


def mse(pred, target, dpred):
    return _mean(_mse_kernel, pred, target, 2 / pred.size, dpred)


def binary_cross_entropy(logits, target, dpred):
    return _mean(_binary_cross_entropy_kernel, logits, target, 1 / logits.size, dpred)


def hinge(scores, target, dpred):
    return _mean(_hinge_kernel, scores, target, 1 / scores.size, dpred)


@scalar
def _column_sums(dy, out):
    out[:] = 0
    for r in range(dy.shape[0]):
        for j in range(out.size):
            out[j] += dy[r, j]


@jit(parallel=True)
def bias_grad(dy, out):
    """Column sums: serially, or per block of rows into a row of partial sums, then summed."""
    n = dy.shape[0]
    if dy.size < PARALLEL_MIN:
        _column_sums(dy, out)
        return
    rows = max(1, CHUNK // dy.shape[1])  # rows per block: about CHUNK elements
    partial = np.empty(((n + rows - 1) // rows, dy.shape[1]), dy.dtype)
    for b in prange(partial.shape[0]):
        _column_sums(dy[b * rows:(b + 1) * rows], partial[b])
    _column_sums(partial, out)


bias_grad_serial = serial(bias_grad)
bias_grad_scheduled = scheduled(bias_grad, bias_grad_serial, PARALLEL_MIN)
