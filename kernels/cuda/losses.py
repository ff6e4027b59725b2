"""Losses and bias_grad. Each loss returns a 0-d device array of the input dtype (no device-to-host
sync: ``float(loss)`` reads it, which synchronises; see ``_launch.as_scalar``) and writes the gradient.

Each loss is one launch: the kernel writes the gradient, sums its loss terms per block, and the last
block to finish adds the per-block partials in block order (``_launch.grid_mean``): no follow-up kernel
and no atomic float adds, so a loss is bit-identical from run to run. The partials and the block counter
are long-lived scratch buffers (``_launch.scratch``).

Out-of-range labels: device labels are not checked on the host (that would be a hidden copy). A row
whose label is outside [0, classes) gets a NaN loss term and a NaN gradient row, so the returned loss is
NaN and training cannot go on silently. Hinge targets likewise: one that is not exactly -1 or +1 gives its
element a NaN loss term and a NaN gradient.
"""

import functools

import numba
import numpy as np
from numba import cuda

from ._launch import (ONE, SIMULATOR, ZERO, as_scalar, block_reduce_online, empty, exp, grid, grid_mean, kernel, log,
                      log1p, online_add, row_layout, scratch, sm_count, warp_reduce_online)
from .activations import row_kernel_setup

# ---- fused softmax cross-entropy: a warp or a block per row (see row_layout) ------------------------------


@functools.cache
def _cross_entropy_kernel(dtype, warp_rows, row_threads):
    nb_dtype, zero, lowest, nan = numba.from_dtype(dtype), dtype.type(0), dtype.type(-np.inf), dtype.type(np.nan)
    setup = row_kernel_setup(warp_rows, row_threads)

    @kernel
    def cross_entropy(logits, labels, n, inv_n, dlogits, partials, counter, result):
        """The row's max and sum of exp(x - max) in one online pass (llm.c's fused classifier); then, in
        the pass that finishes the row, dlogits = (exp(x - max - log(sum)) - onehot) / N (no probability
        array) and the row's loss log(sum) - (x[label] - max), both formed as the reference does (exact for
        huge logits). The first thread of each row adds the row's loss to its running sum; the grid's
        sum / N goes to result[0]."""
        shared_m = cuda.shared.array(row_threads, nb_dtype)
        shared_s = cuda.shared.array(row_threads, nb_dtype)
        flag = cuda.shared.array(1, numba.int32)
        first, row_step, t, step = setup()
        cols = logits.shape[1]
        loss = zero
        for row in range(first, logits.shape[0], row_step):
            label = numba.int64(labels[row])  # uint64 against the int64 column count would compare in float64
            valid = label >= 0 and label < cols
            m, s = lowest, zero
            for j in range(t, cols, step):
                m, s = online_add(m, s, logits[row, j], lowest)
            if warp_rows:
                m, s = warp_reduce_online(m, s, lowest)
            else:
                m, s = block_reduce_online(shared_m, shared_s, m, s, lowest)
            log_s = log(s)
            for j in range(t, cols, step):
                if valid:
                    p = exp(logits[row, j] - m - log_s)
                    dlogits[row, j] = (p - ONE if j == label else p) * inv_n
                else:
                    dlogits[row, j] = nan
            if t == 0:
                loss += log_s - (logits[row, label] - m) if valid else nan
        grid_mean(shared_m, flag, loss, zero, partials, counter, n, result)

    return cross_entropy


def _mean_buffers(blocks, dtype, like):
    """The per-block partials and the block counter (scratch), and a fresh 1-element result."""
    return (scratch("partials", (blocks,), dtype, like), scratch("counter", (1,), np.uint32, like),
            empty((1,), dtype, like))


def softmax_cross_entropy(logits, labels, dlogits):
    n, classes = logits.shape
    dtype = np.dtype(logits.dtype)
    warp_rows, blocks, threads = row_layout(n, classes)
    partials, counter, loss = _mean_buffers(blocks, dtype, logits)
    _cross_entropy_kernel(dtype, warp_rows, threads)[blocks, threads](
        logits, labels, dtype.type(n), dtype.type(1 / n), dlogits, partials, counter, loss)
    return as_scalar(loss)


# ---- pointwise losses: a grid-stride kernel per loss, built from a scalar device function -------------


@cuda.jit(device=True)
def _mse_terms(pred, target, scale):
    diff = pred - target
    return diff * diff, diff * scale


@cuda.jit(device=True)
def _bce_terms(x, target, scale):
    z = exp(-abs(x))  # log(1 + exp(-|x|)) and sigmoid without overflow
    sigmoid = (ONE if x >= ZERO else z) / (ONE + z)
    return (ZERO if x <= ZERO else x) - x * target + log1p(z), (sigmoid - target) * scale


NAN = np.float32(np.nan)  # float32: NAN * x is NaN in x's type, and never promotes a float32 kernel


@cuda.jit(device=True)
def _hinge_terms(score, target, scale):
    if target != ONE and target != -ONE:  # not checked on the host (see the module's docstring)
        return NAN * score, NAN * scale
    margin = ONE - target * score  # "<= 0", not max(): a NaN margin stays NaN (GPU fmax would drop it)
    return (ZERO if margin <= ZERO else margin), (-target * scale if margin > ZERO else ZERO * scale)


@functools.cache
def _pointwise_kernel(terms, dtype, threads):
    nb_dtype, zero = numba.from_dtype(dtype), dtype.type(0)

    @kernel
    def pointwise_loss(pred, target, scale, size, grad, partials, counter, result):
        """grad[i] from terms(); the loss terms summed per thread, their mean to result[0]."""
        shared = cuda.shared.array(threads, nb_dtype)
        flag = cuda.shared.array(1, numba.int32)
        acc = zero
        for i in range(cuda.grid(1), grad.shape[0], cuda.gridsize(1)):
            value, g = terms(pred[i], target[i], scale)
            grad[i] = g
            acc += value
        grid_mean(shared, flag, acc, zero, partials, counter, size, result)

    return pointwise_loss


def _pointwise_loss(terms, pred, target, grad, grad_scale):
    """Launch the loss kernel; its gradient is terms' derivative times ``grad_scale``."""
    size = grad.shape[0]
    dtype = np.dtype(grad.dtype)
    blocks, threads = grid(size)
    partials, counter, loss = _mean_buffers(blocks, dtype, pred)
    _pointwise_kernel(terms, dtype, threads)[blocks, threads](
        pred, target, dtype.type(grad_scale / size), dtype.type(size), grad, partials, counter, loss)
    return as_scalar(loss)


def mse(pred, target, dpred):
    return _pointwise_loss(_mse_terms, pred, target, dpred, 2)


def binary_cross_entropy(logits, target, dpred):
    return _pointwise_loss(_bce_terms, logits, target, dpred, 1)


def hinge(scores, target, dpred):
    return _pointwise_loss(_hinge_terms, scores, target, dpred, 1)


# ---- bias_grad: column sums ---------------------------------------------------------------------------

# A block is COLS x ROWS threads: COLS adjacent columns (coalesced reads of each row), ROWS row groups
# whose partial column sums are added in shared memory. Tall inputs are also split into row chunks along
# the grid's y axis, so that enough blocks run; each chunk writes its partial sums, and the last chunk of
# a column block to finish adds them in chunk order (one launch, deterministic).
COLS, ROWS = (8, 4) if SIMULATOR else (32, 8)


@functools.cache
def _bias_grad_kernel(dtype):
    nb_dtype, zero = numba.from_dtype(dtype), dtype.type(0)

    @kernel
    def column_sums(dy, rows_per_chunk, partials, counters, out):
        """out[col] = sum of dy[:, col]: directly with one chunk, else through partials[chunk, col], added
        by the column block's last chunk to finish (an atomic ticket on counters[column block], which it
        then resets for the next launch)."""
        shared = cuda.shared.array((ROWS, COLS), nb_dtype)
        flag = cuda.shared.array(1, numba.int32)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        col = cuda.blockIdx.x * COLS + tx
        first, chunks = cuda.blockIdx.y * rows_per_chunk, cuda.gridDim.y
        acc = zero
        if col < dy.shape[1]:
            for r in range(first + ty, min(first + rows_per_chunk, dy.shape[0]), ROWS):
                acc += dy[r, col]
        shared[ty, tx] = acc
        cuda.syncthreads()
        if ty == 0 and col < dy.shape[1]:
            for r in range(1, ROWS):
                acc += shared[r, tx]
            if chunks == 1:
                out[col] = acc
            else:
                partials[cuda.blockIdx.y, col] = acc
                cuda.threadfence()
        if chunks == 1:
            return
        cuda.syncthreads()
        if tx == 0 and ty == 0:
            flag[0] = 1 if cuda.atomic.add(counters, cuda.blockIdx.x, 1) == chunks - 1 else 0
        cuda.syncthreads()
        if flag[0] == 1 and ty == 0:
            if col < dy.shape[1]:
                total = partials[0, col]
                for chunk in range(1, chunks):
                    total += partials[chunk, col]
                out[col] = total
            if tx == 0:
                counters[cuda.blockIdx.x] = 0

    return column_sums


def bias_grad(dy, out):
    rows, cols = dy.shape
    if cols == 0:
        return
    dtype = np.dtype(dy.dtype)
    col_blocks = -(-cols // COLS)
    chunks = max(1, min(-(-rows // (4 * ROWS)), -(-2 * sm_count() // col_blocks)))
    rows_per_chunk = -(-rows // chunks) if rows else 1
    partials = out.reshape(1, cols) if chunks == 1 else scratch("bias_grad partials", (chunks, cols), dtype, dy)
    counters = scratch("bias_grad counters", (col_blocks,), np.uint32, dy)
    _bias_grad_kernel(dtype)[(col_blocks, chunks), (COLS, ROWS)](dy, rows_per_chunk, partials, counters, out)
