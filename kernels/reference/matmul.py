"""GEMM with a fused epilogue: ``out = act(op(a) @ op(b) + bias)``, op transposing when asked."""

import numpy as np

from . import activations


def apply_activation(name, y, alpha):
    """The matmul epilogue's activation, in place on ``y`` (None: identity)."""
    if name == "leaky_relu":
        activations.leaky_relu(y, alpha, y)
    elif name is not None:
        getattr(activations, name)(y, y)


def matmul(a, b, trans_a, trans_b, bias, activation, alpha, out):
    np.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)
    if bias is not None:
        out += bias
    apply_activation(activation, out, alpha)
