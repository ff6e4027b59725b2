"""The training step's bookkeeping (numba-cuda); the reference's ``metrics`` says what it computes.

The per-row tests and the step check are the numba backend's functions (``kernels/cpu/metrics.py``),
compiled here as device functions. ``count_correct``: a grid-stride loop over the rows, one atomic add
of each thread's count (whole numbers in float64: exact in any order, so deterministic).
``check_step``: one thread (a few scalars); the loss is read on the device from the 0-d array the loss
kernels return, so nothing is copied to the host.
"""

import numba
from numba import cuda

from ..cpu.metrics import argmax_correct, step_check, sum_of_squares, threshold_correct
from ..reference.metrics import CORRECT
from ._launch import grid, kernel

_argmax_correct = cuda.jit(device=True)(argmax_correct)
_threshold_correct = cuda.jit(device=True)(threshold_correct)
_sum_of_squares = cuda.jit(device=True)(sum_of_squares)
_step_check = cuda.jit(device=True)(step_check)


@kernel
def _count_labels(output, labels, metrics):
    count = 0
    for r in range(cuda.grid(1), output.shape[0], cuda.gridsize(1)):
        count += _argmax_correct(output, r, labels[r])
    if count:
        cuda.atomic.add(metrics, CORRECT, numba.float64(count))


@kernel
def _count_thresholds(output, target, threshold, metrics):
    count = 0
    for r in range(cuda.grid(1), output.shape[0], cuda.gridsize(1)):
        count += _threshold_correct(output, target, r, threshold)
    if count:
        cuda.atomic.add(metrics, CORRECT, numba.float64(count))


def count_correct(output, target, threshold, metrics):
    if output.shape[0]:
        if len(target.shape) == 1:
            _count_labels[grid(output.shape[0])](output, target, metrics)
        else:
            _count_thresholds[grid(output.shape[0])](output, target, output.dtype.type(threshold), metrics)


@kernel
def _check_step(loss, rows, norms, max_norm, metrics, scale):
    _step_check(loss[0], rows, norms, _sum_of_squares(norms), max_norm, metrics, scale)


def check_step(loss, rows, norms, max_norm, metrics, scale):
    """``loss``: the 0-d (or 1-element) device array a loss kernel returned."""
    _check_step[1, 1](loss.reshape(1), float(rows), norms, float(max_norm), metrics, scale)
