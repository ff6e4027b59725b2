"""Fused kernels of the training step: the backward pass around a Dense layer's matmul, the
per-layer gradient norms over the model's flat gradient buffer, and a Dense layer's gradient norm from
its factors."""

import numpy as np

from . import activations
from .losses import bias_grad


def bias_act_backward(y, dy, activation, alpha, dz, db):
    """``dz = dy * activation'(from the forward output y)`` and ``db`` = the column sums of dz.

    ``y`` is the output of ``activation`` (relu/leaky_relu are positive exactly where their input is,
    so their derivative is read from the output too); both arrays are (N, C), ``db`` is (C,).
    """
    if activation == "leaky_relu":
        activations.leaky_relu_backward(y, dy, alpha, dz)
    else:
        getattr(activations, activation + "_backward")(y, dy, dz)
    bias_grad(dz, db)


def segment_norms(x, offsets, out):
    """``out[i]`` = the L2 norm of ``x[offsets[i]:offsets[i + 1]]``, accumulated in float64 (so a
    float32 gradient cannot overflow it: a norm is inf or NaN only when an element is)."""
    for i in range(offsets.size - 1):
        segment = x[offsets[i]:offsets[i + 1]].astype(np.float64)
        out[i] = np.sqrt(np.sum(segment * segment))


def dense_grad_norm(x, dy, db, out):
    """``out[0]`` = the L2 norm of a Dense layer's gradient (``dW = x^T dy`` and the bias gradient ``db``)
    from its factors, without forming dW: ``||x^T dy||^2 = sum over row pairs (r, s) of (x_r . x_s)(dy_r .
    dy_s)``, in float64, the bias's norm added by ``hypot``: the norm of the exact product, within the
    rounding of dW in x's dtype, at O(B^2 (K + N)) for B rows where squaring dW costs O(B K N). Where that
    cannot be trusted it is the norm of dW as x's dtype computes it (inf or NaN where that dW has them, or
    where its squares overflow float64): an element of x or dy not finite, a row's sum of squares outside
    [FACTOR_MIN, FACTOR_MAX] (but for a row of zeros: float64 would round the products), or ``sum_r ||x_r||
    ||dy_r||`` (a bound of dW's elements) at the dtype's overflow threshold (:func:`factor_limit`)."""
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are answers here, as in the compiled kernels
        x64, d64, db64 = x.astype(np.float64), dy.astype(np.float64), db.astype(np.float64)
        gx, gd = x64 @ x64.T, d64 @ d64.T
        diagonals = np.concatenate([np.diag(gx), np.diag(gd)])
        zero_rows = np.concatenate([~x64.any(axis=1), ~d64.any(axis=1)])
        trusted = np.all(zero_rows | ((diagonals >= FACTOR_MIN) & (diagonals <= FACTOR_MAX)))  # NaN: False
        if trusted and np.sum(np.sqrt(np.diag(gx) * np.diag(gd))) < factor_limit(x.dtype, x.shape[0]):
            w = np.sqrt(max(np.sum(gx * gd), 0.0))  # >= 0 but for rounding
        else:
            dw = (x.T @ dy).astype(np.float64)  # in x's dtype, as the matmul computes it
            w = np.sqrt(np.sum(dw * dw))
        out[0] = np.hypot(w, np.sqrt(np.sum(db64 * db64)))


FACTOR_MIN, FACTOR_MAX = 2.0**-480, 2.0**480  # the rows' sums of squares dense_grad_norm's factors trust


def factor_limit(dtype, rows):
    """The bound below which no element of a product of ``rows`` terms overflows ``dtype``: its largest
    value less the roundings of a chain of ``rows`` FMAs (:func:`dense_grad_norm`)."""
    info = np.finfo(dtype)
    return float(info.max) / (1 + (rows + 1) * float(info.eps))
