"""Fused kernels of the training step: the backward pass around a Dense layer's matmul, and the
per-layer gradient norms over the model's flat gradient buffer."""

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
