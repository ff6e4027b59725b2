"""The training step's bookkeeping (Numba CPU); the reference's ``metrics`` says what it computes.

The per-row tests and the step check are plain Python functions written once for both compiled
backends: compiled here with Numba, and as CUDA device functions by ``kernels/cuda/metrics.py``. The
buffers are tiny (a batch's outputs, one norm per layer), so the kernels are serial.
"""

import math

from ..reference.metrics import BAD_LOSS, BAD_STEP, CORRECT, LOSS, NORMS, STEPS
from ._jit import jit


def argmax_correct(output, r, label):
    """Whether row ``r``'s first maximum (NaN counts as the maximum) is at ``label``."""
    best = 0
    for j in range(1, output.shape[1]):
        if output[r, best] != output[r, best]:  # NaN: np.argmax stops at the first one
            break
        if output[r, j] > output[r, best] or output[r, j] != output[r, j]:
            best = j
    return output.shape[1] > 0 and best == label


def threshold_correct(output, target, r, threshold):
    """Whether every output of row ``r`` is on the side of 0 that its target is of ``threshold``."""
    for j in range(output.shape[1]):
        if (output[r, j] > 0) != (target[r, j] > threshold):
            return False
    return True


def sum_of_squares(x):
    """``np.sum(x**2)`` of a 1-D float64 array in NumPy's order (exactly, up to 128 elements): serial
    below 8 elements, else 8 running sums added pairwise, then the remainder."""
    n = x.shape[0]
    if n < 8:
        total = 0.0
        for i in range(n):
            total += x[i] * x[i]
        return total
    r0, r1, r2, r3 = x[0] * x[0], x[1] * x[1], x[2] * x[2], x[3] * x[3]
    r4, r5, r6, r7 = x[4] * x[4], x[5] * x[5], x[6] * x[6], x[7] * x[7]
    i = 8
    while i < n - n % 8:
        r0, r1, r2, r3 = r0 + x[i] * x[i], r1 + x[i + 1] * x[i + 1], r2 + x[i + 2] * x[i + 2], r3 + x[i + 3] * x[i + 3]
        r4, r5, r6, r7 = (r4 + x[i + 4] * x[i + 4], r5 + x[i + 5] * x[i + 5], r6 + x[i + 6] * x[i + 6],
                          r7 + x[i + 7] * x[i + 7])
        i += 8
    total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for j in range(i, n):
        total += x[j] * x[j]
    return total


def step_check(loss, rows, norms, squares, max_norm, metrics, scale):
    """The step's bookkeeping (see the reference's ``check_step``) in float64, given ``squares``, the
    norms' :func:`sum_of_squares`."""
    loss = float(loss)  # float64 arithmetic from a float32 loss (the CUDA simulator would keep float32)
    metrics[STEPS] += 1
    layers = norms.shape[0]
    good = metrics[BAD_STEP] == 0 and math.isfinite(loss)
    for i in range(layers):
        good = good and math.isfinite(norms[i])
    if good:
        metrics[LOSS] += loss * rows
        for i in range(layers):
            metrics[NORMS + i] += norms[i]
        total = math.sqrt(squares)
        scale[0] = max_norm / (total + 1e-6) if total > max_norm else 1.0
        return
    if metrics[BAD_STEP] == 0:
        metrics[BAD_STEP] = metrics[STEPS]
        metrics[BAD_LOSS] = loss
        for i in range(layers):
            metrics[NORMS + layers + i] = norms[i]
    scale[0] = 0.0


_argmax_correct = jit(argmax_correct, inline="always")
_threshold_correct = jit(threshold_correct, inline="always")
_sum_of_squares = jit(sum_of_squares, fastmath=False, inline="always")


@jit
def _count_labels(output, labels, metrics):
    count = 0
    for r in range(output.shape[0]):
        count += _argmax_correct(output, r, labels[r])
    metrics[CORRECT] += count


@jit
def _count_thresholds(output, target, threshold, metrics):
    count = 0
    for r in range(output.shape[0]):
        count += _threshold_correct(output, target, r, threshold)
    metrics[CORRECT] += count


def count_correct(output, target, threshold, metrics):
    if target.ndim == 1:
        _count_labels(output, target, metrics)
    else:
        _count_thresholds(output, target, output.dtype.type(threshold), metrics)


_step_check = jit(step_check, fastmath=False, inline="always")


@jit(fastmath=False)  # the clipping scale bit for bit as the reference's: no FMA, no reordering
def _check_step(loss, rows, norms, max_norm, metrics, scale):
    _step_check(loss, rows, norms, _sum_of_squares(norms), max_norm, metrics, scale)


def check_step(loss, rows, norms, max_norm, metrics, scale):
    _check_step(float(loss), float(rows), norms, float(max_norm), metrics, scale)
