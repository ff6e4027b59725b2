"""Activations and their gradients (Numba CPU): the reference's functions, one fused pass each.

Elementwise kernels are built by :func:`elementwise` from a formula of ``kernels/_scalar.py`` (the cuda
backend compiles the same ones) and run in parallel chunks above :data:`PARALLEL_MIN` elements; below it
they stay on the calling thread (starting the thread pool costs more than a small array's whole pass).
sigmoid, tanh and softmax use the vectorisable ``_math.exp`` instead of the scalar libm call ``np.exp``
compiles to, so their loops run in SIMD.
NaN propagates as in the reference (relu(NaN) is NaN, like ``np.maximum``).

Results depend on the input values only, never on where the buffers sit: no loop both stores and sums.
LLVM vectorises a loop that stores behind a run-time check that the output does not start just after
an input (within a few vectors), and runs its scalar version otherwise. An elementwise store gives the
same bits either way, but a sum does not (the vector loop keeps several partial sums), so every sum runs
in a loop of its own that stores nothing and has a single version (tests/test_activations.py places
the output at every offset after the input).
"""

import numpy as np
from numba import prange

from .. import _scalar
from . import _math
from ._jit import jit
from ._math import scalar
from ._parallel import CHUNK, n_chunks, ordered_sum

PARALLEL_MIN = 1 << 17  # elements: below this a pass takes less than starting the thread pool can cost


def elementwise(op, name):
    """A kernel ``(a, b, alpha, out)`` computing ``out[i] = op(a[i], b[i], alpha)`` over flat arrays, for a
    formula ``op`` of ``kernels._scalar``. One signature for all: a forward pass gets b = a, and alpha
    (typed like the arrays) is ignored by every op but leaky_relu's."""

    @scalar
    def span(a, b, alpha, out):
        for i in range(out.size):
            out[i] = op(a[i], b[i], alpha)

    def kernel(a, b, alpha, out):
        n = out.size
        if n < PARALLEL_MIN:
            span(a, b, alpha, out)
        else:
            # Each task runs the separately compiled (vectorised) span on slices; a loop written
            # inline in the prange body measured several times slower (not vectorised).
            for c in prange(n_chunks(n)):
                lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
                span(a[lo:hi], b[lo:hi], alpha, out[lo:hi])

    kernel.__name__ = kernel.__qualname__ = name  # names the cache files and profiles
    return jit(kernel, parallel=True)


_relu, _relu_backward = _scalar.ACTIVATIONS["relu"]
_leaky_relu, _leaky_relu_backward = _scalar.ACTIVATIONS["leaky_relu"]
_sigmoid, _sigmoid_backward = _scalar.ACTIVATIONS["sigmoid"]
_tanh, _tanh_backward = _scalar.ACTIVATIONS["tanh"]

_relu_kernel = elementwise(_relu, "relu")
_relu_backward_kernel = elementwise(_relu_backward, "relu_backward")
_leaky_relu_kernel = elementwise(_leaky_relu, "leaky_relu")
_leaky_relu_backward_kernel = elementwise(_leaky_relu_backward, "leaky_relu_backward")
_sigmoid_kernel = elementwise(_sigmoid, "sigmoid")
_sigmoid_backward_kernel = elementwise(_sigmoid_backward, "sigmoid_backward")
_tanh_kernel = elementwise(_tanh, "tanh")
_tanh_backward_kernel = elementwise(_tanh_backward, "tanh_backward")


@scalar
def _bigger(a, b):
    return a if a > b else b


@scalar
def row_max(x):
    """Largest value of a 1-D row (-inf when empty; NaNs are skipped, the caller's exp brings them back).
    Four running maxima: a compare-and-select reduction does not vectorise without nnan, but four
    independent chains run about 3x faster than one (measured on 1000-wide rows)."""
    m0 = m1 = m2 = m3 = _math.typed(-np.inf, x)
    n = x.size - x.size % 4
    for j in range(0, n, 4):
        m0, m1, m2, m3 = _bigger(x[j], m0), _bigger(x[j + 1], m1), _bigger(x[j + 2], m2), _bigger(x[j + 3], m3)
    for j in range(n, x.size):
        m0 = _bigger(x[j], m0)
    return _bigger(_bigger(m0, m1), _bigger(m2, m3))


@scalar
def exp_shifted(x, shift, out):
    """``out = exp(x - shift)`` over a row; returns the sum of ``out``, added by a second loop that only
    reads, so that the sum depends on the values alone (see the module's docstring)."""
    for j in range(x.size):
        out[j] = _math.exp(x[j] - shift)
    return ordered_sum(out)


@scalar
def _softmax_row(x, out):
    inv = _math.typed(1, x) / exp_shifted(x, row_max(x), out)
    for j in range(out.size):
        out[j] *= inv


@scalar
def _softmax_backward_row(y, dy, out):
    dot = _math.typed(0, y)
    for j in range(y.size):
        dot += dy[j] * y[j]
    for j in range(y.size):
        out[j] = y[j] * (dy[j] - dot)


@jit(parallel=True)
def softmax(x, out):
    """Row by row (in parallel above PARALLEL_MIN elements): max, exp(x - max) with its sum, scale."""
    if x.size < PARALLEL_MIN:
        for r in range(x.shape[0]):
            _softmax_row(x[r], out[r])
    else:
        for r in prange(x.shape[0]):
            _softmax_row(x[r], out[r])


@jit(parallel=True)
def softmax_backward(y, dy, out):
    """Row by row: the dot product sum(dy * y), then y * (dy - dot)."""
    if y.size < PARALLEL_MIN:
        for r in range(y.shape[0]):
            _softmax_backward_row(y[r], dy[r], out[r])
    else:
        for r in prange(y.shape[0]):
            _softmax_backward_row(y[r], dy[r], out[r])


def relu(x, out):
    _relu_kernel(x, x, x.dtype.type(0), out)


def relu_backward(x, dy, out):
    _relu_backward_kernel(x, dy, x.dtype.type(0), out)


def leaky_relu(x, alpha, out):
    _leaky_relu_kernel(x, x, x.dtype.type(alpha), out)


def leaky_relu_backward(x, dy, alpha, out):
    _leaky_relu_backward_kernel(x, dy, x.dtype.type(alpha), out)


def sigmoid(x, out):
    _sigmoid_kernel(x, x, x.dtype.type(0), out)


def sigmoid_backward(y, dy, out):
    _sigmoid_backward_kernel(y, dy, y.dtype.type(0), out)


def tanh(x, out):
    _tanh_kernel(x, x, x.dtype.type(0), out)


def tanh_backward(y, dy, out):
    _tanh_backward_kernel(y, dy, y.dtype.type(0), out)
