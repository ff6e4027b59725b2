"""A run of training steps of a small Sequential model in ONE compiled call (the numba backend).

For each mini-batch: gather the shuffled rows, forward through Dense / activation / dropout layers,
fused softmax cross-entropy, backward into the flat gradient buffer, per-layer gradient norms, one
SGD or Adam update. Every piece is the computation the per-kernel step runs when its kernels take
their serial branch (no array above ``activations.PARALLEL_MIN`` elements, parameters below
``fused.NORMS_PARALLEL_MIN``): the same compiled functions where they are plain ``jit`` ones (``gemm``,
``_sum_squares``, the optimizer and dropout bodies, over the same chunks as ``_parallel.run``), and the
serial branch of the ``parallel=True`` kernels rewritten here around the same scalar functions, since a
cached jitted function must not call a cached parallel one (numba issue 8578). The GEMM is always the
serial one, which gives bit for bit what the multithreaded one gives. So the results are bitwise those
of the per-kernel step (tests/test_nn_compiled.py); the caller (``nn._compiled``) checks the sizes.

The model arrives as tables (one row per layer) and offsets into one scratch buffer, so the driver
compiles once per dtype and is cached on disk. It stops before the update of a step whose loss or
gradient norms are not finite and returns that step's number; the caller decides what follows.
"""

import numpy as np

from . import _math
from ._gemm import gemm
from ._jit import jit
from ._parallel import PARALLEL_MIN, chunk, n_chunks, ordered_sum
from .activations import (_leaky_relu, _leaky_relu_backward, _relu, _relu_backward, _sigmoid, _sigmoid_backward,
                          _softmax_backward_row, _softmax_row, _tanh, _tanh_backward, scalar)
from .dropout import _dropout, _mix
from .fused import _sum_squares
from .losses import _column_sums, _cross_entropy_row
from .optim import _adam, _sgd

# layer kinds, and the activation codes (those of _gemm.ACTIVATION_CODES, plus softmax)
DENSE, ACTIVATION, DROPOUT = range(3)
NONE, RELU, LEAKY_RELU, SIGMOID, TANH, SOFTMAX = range(6)
# columns of the integer layer table: kind, activation, input and output width, offsets of W and b in the
# flat parameters (and gradients), offsets in the scratch buffer of the input, the output, the incoming
# gradient dy, dz (a Dense layer's dy * activation'), the outgoing gradient dx (-1: not computed)
KIND, ACT, IN_W, OUT_W, W_AT, B_AT, X_AT, Y_AT, DY_AT, DZ_AT, DX_AT = range(11)
# optimizers, and the columns of their per-step table (each value as the kernel's wrapper computes it in
# float64, before the cast to the parameters' dtype)
SGD, SGD_MOMENTUM, ADAM, ADAMW = range(4)
SGD_COLUMNS = ("lr", "momentum", "keep", "weight_decay", "nesterov", "first")
ADAM_COLUMNS = ("decay", "weight_decay", "c1", "beta2", "c2", "step_size", "sqrt_bc2", "eps")


def _span(op):
    """``out[i] = op(a[i], b[i], alpha)``: the serial branch of ``activations.elementwise``."""

    @scalar
    def span(a, b, alpha, out):
        for i in range(out.size):
            out[i] = op(a[i], b[i], alpha)

    return span


def _bias_rows(op):
    """dz = op(y, dy) and its column sums db: the serial branch of ``fused.bias_act_backward``."""

    @scalar
    def rows(y, dy, alpha, dz, db):
        db[:] = 0
        for r in range(y.shape[0]):
            for j in range(db.size):
                d = op(y[r, j], dy[r, j], alpha)
                dz[r, j] = d
                db[j] += d

    return rows


_relu_span, _relu_backward_span = _span(_relu), _span(_relu_backward)
_leaky_span, _leaky_backward_span = _span(_leaky_relu), _span(_leaky_relu_backward)
_sigmoid_span, _sigmoid_backward_span = _span(_sigmoid), _span(_sigmoid_backward)
_tanh_span, _tanh_backward_span = _span(_tanh), _span(_tanh_backward)
_relu_rows, _leaky_rows = _bias_rows(_relu_backward), _bias_rows(_leaky_relu_backward)
_sigmoid_rows, _tanh_rows = _bias_rows(_sigmoid_backward), _bias_rows(_tanh_backward)


@jit
def _softmax(x, dy, out, backward):
    """The serial branches of ``activations.softmax`` / ``softmax_backward`` (y = x when backward)."""
    for r in range(x.shape[0]):
        if backward:
            _softmax_backward_row(x[r], dy[r], out[r])
        else:
            _softmax_row(x[r], out[r])


@jit
def _cross_entropy(logits, labels, dlogits):
    """The serial branch of ``losses.softmax_cross_entropy``: the mean loss, dlogits written."""
    n = logits.shape[0]
    inv_n = _math.typed(1 / n, logits)
    losses = np.empty(n, logits.dtype)
    for r in range(n):
        losses[r] = _cross_entropy_row(logits[r], labels[r], inv_n, dlogits[r])
    return ordered_sum(losses) * inv_n


@jit(fastmath=False)
def _activation(code, a, b, alpha, out):
    """An elementwise activation over flat arrays (b = a; alpha its slope or 0)."""
    if code == RELU:
        _relu_span(a, b, alpha, out)
    elif code == LEAKY_RELU:
        _leaky_span(a, b, alpha, out)
    elif code == SIGMOID:
        _sigmoid_span(a, b, alpha, out)
    else:
        _tanh_span(a, b, alpha, out)


@jit(fastmath=False)
def _activation_backward(code, a, dy, alpha, out):
    """Its gradient from ``a`` (the input for relu and leaky relu, the output otherwise) and ``dy``."""
    if code == RELU:
        _relu_backward_span(a, dy, alpha, out)
    elif code == LEAKY_RELU:
        _leaky_backward_span(a, dy, alpha, out)
    elif code == SIGMOID:
        _sigmoid_backward_span(a, dy, alpha, out)
    else:
        _tanh_backward_span(a, dy, alpha, out)


@jit(fastmath=False)
def _bias_activation_backward(code, y, dy, alpha, dz, db):
    if code == RELU:
        _relu_rows(y, dy, alpha, dz, db)
    elif code == LEAKY_RELU:
        _leaky_rows(y, dy, alpha, dz, db)
    elif code == SIGMOID:
        _sigmoid_rows(y, dy, alpha, dz, db)
    else:
        _tanh_rows(y, dy, alpha, dz, db)


@jit(fastmath=False)
def _spans(n):
    """The ``(lo, hi)`` pieces ``_parallel.run`` hands its body for ``n`` elements, as rows of a table."""
    count = 1 if n < PARALLEL_MIN else n_chunks(n)
    bounds = np.empty((count, 2), np.uint64)
    for c in range(count):
        if count == 1:
            bounds[c, 0], bounds[c, 1] = np.uint64(0), np.uint64(n)
        else:
            bounds[c, 0], bounds[c, 1] = chunk(c, n)
    return bounds


@jit(fastmath=False)
def _update(optimizer, h, params, grads, state1, state2):
    """One optimizer step over the flat buffers, ``h`` its row of the per-step table."""
    t = params
    for piece in _spans(params.size):
        lo, hi = piece[0], piece[1]
        if optimizer == SGD:
            _sgd(lo, hi, params, grads, None, _math.typed(h[0], t), _math.typed(h[1], t), _math.typed(h[2], t),
                 h[4] != 0, _math.typed(h[3], t), h[5] != 0)
        elif optimizer == SGD_MOMENTUM:
            _sgd(lo, hi, params, grads, state1, _math.typed(h[0], t), _math.typed(h[1], t), _math.typed(h[2], t),
                 h[4] != 0, _math.typed(h[3], t), h[5] != 0)
        else:
            _adam(lo, hi, params, grads, state1, state2, _math.typed(h[0], t), _math.typed(h[1], t),
                  _math.typed(h[2], t), _math.typed(h[3], t), _math.typed(h[4], t), _math.typed(h[5], t),
                  _math.typed(h[6], t), _math.typed(h[7], t), optimizer == ADAMW)


@jit(fastmath=False)
def _dropout_pass(x, out, seed, threshold, scale):
    """``kernels.cpu.dropout`` at offset 0 (its stream starts at mix(seed)), over the same pieces."""
    start = _mix(seed)
    zero = _math.typed(0, x)
    for piece in _spans(x.size):
        _dropout(piece[0], piece[1], x, out, start, threshold, scale, zero)


@jit(fastmath=False)
def _view(scratch, at, rows, width):
    return scratch[at:at + rows * width].reshape((rows, width))


@jit(fastmath=False)
def _correct(out, labels):
    """Rows whose first largest output (NumPy's argmax: the first NaN if any) is the label."""
    count = 0
    for r in range(out.shape[0]):
        best = 0
        for j in range(1, out.shape[1]):
            if np.isnan(out[r, best]):
                break
            if out[r, j] > out[r, best] or np.isnan(out[r, j]):
                best = j
        count += best == labels[r]
    return count


@jit(fastmath=False)
def train_steps(X, labels, order, s0, s1, batch, layers, alphas, seeds, params, grads, state1, state2, segments,
                optimizer, hyper, tiling, scratch, targets, norms, sums, norm_sums):
    """Steps ``s0 <= s < s1`` of an epoch over the rows ``order`` of ``X`` / ``labels`` in batches of
    ``batch``. ``layers`` is the integer layer table, ``alphas`` each layer's leaky slope (Dense, leaky
    relu) or dropout scale, ``seeds`` each dropout layer's (seed at step s0, keep threshold); ``segments``
    bound each parameter layer's slice of the flat buffers; ``hyper[s - s0]`` is step s's optimizer row;
    ``tiling`` the GEMM's (variant, kc, nc_bytes). Adds each step's loss times its rows to ``sums[0]``
    (in float64, as Python adds), its correct predictions to ``sums[1]``, its norms to ``norm_sums`` and
    leaves its loss in ``sums[2]``. Returns the first step not completed: s1, or the step whose loss or
    gradient norms were not finite (its update not applied)."""
    n, width = order.size, X.shape[1]
    count = layers.shape[0]
    variant, kc, nc_bytes = tiling[0], tiling[1], tiling[2]
    no_bias = np.empty(0, params.dtype)
    zero = _math.typed(0, params)
    for s in range(s0, s1):
        lo = s * batch
        rows = min(batch, n - lo)
        xb = _view(scratch, layers[0, X_AT], rows, width)
        yb = targets[:rows]
        for r in range(rows):
            xb[r] = X[order[lo + r]]
            yb[r] = labels[order[lo + r]]
        for i in range(count):
            kind, code, w_in, w_out = layers[i, KIND], layers[i, ACT], layers[i, IN_W], layers[i, OUT_W]
            x, y = _view(scratch, layers[i, X_AT], rows, w_in), _view(scratch, layers[i, Y_AT], rows, w_out)
            if kind == DENSE:
                w = params[layers[i, W_AT]:layers[i, W_AT] + w_in * w_out].reshape((w_in, w_out))
                gemm(x, w, params[layers[i, B_AT]:layers[i, B_AT] + w_out], code, alphas[i], y, variant, kc,
                     nc_bytes)
            elif kind == ACTIVATION and code == SOFTMAX:
                _softmax(x, x, y, False)
            elif kind == ACTIVATION:
                alpha = _math.typed(alphas[i], params) if code == LEAKY_RELU else zero
                _activation(code, x.ravel(), x.ravel(), alpha, y.ravel())
            elif layers[i, Y_AT] != layers[i, X_AT]:  # dropout at a rate > 0
                _dropout_pass(x.ravel(), y.ravel(), seeds[i, 0] + np.uint64(s - s0), seeds[i, 1],
                              _math.typed(alphas[i], params))
        out = _view(scratch, layers[count - 1, Y_AT], rows, layers[count - 1, OUT_W])
        dout = _view(scratch, layers[count - 1, DY_AT], rows, layers[count - 1, OUT_W])
        loss = _cross_entropy(out, yb, dout)
        if not np.isfinite(loss):
            return s
        correct = _correct(out, yb)
        for i in range(count - 1, -1, -1):
            kind, code, w_in, w_out = layers[i, KIND], layers[i, ACT], layers[i, IN_W], layers[i, OUT_W]
            x, y = _view(scratch, layers[i, X_AT], rows, w_in), _view(scratch, layers[i, Y_AT], rows, w_out)
            if kind != DENSE and layers[i, DX_AT] < 0:  # the first layer: no dx wanted
                continue
            dy = _view(scratch, layers[i, DY_AT], rows, w_out)
            dx = _view(scratch, max(layers[i, DX_AT], 0), rows if layers[i, DX_AT] >= 0 else 0, w_in)
            if kind == DENSE:
                gw = grads[layers[i, W_AT]:layers[i, W_AT] + w_in * w_out].reshape((w_in, w_out))
                gb = grads[layers[i, B_AT]:layers[i, B_AT] + w_out]
                if code == NONE:
                    _column_sums(dy, gb)
                    dz = dy
                else:
                    dz = _view(scratch, layers[i, DZ_AT], rows, w_out)
                    _bias_activation_backward(code, y, dy, _math.typed(alphas[i], params), dz, gb)
                gemm(x.T, dz, no_bias, NONE, alphas[i], gw, variant, kc, nc_bytes)
                if layers[i, DX_AT] >= 0:
                    w = params[layers[i, W_AT]:layers[i, W_AT] + w_in * w_out].reshape((w_in, w_out))
                    gemm(dz, w.T, no_bias, NONE, alphas[i], dx, variant, kc, nc_bytes)
            elif kind == ACTIVATION and code == SOFTMAX:
                _softmax(y, dy, dx, True)
            elif kind == ACTIVATION:
                alpha = _math.typed(alphas[i], params) if code == LEAKY_RELU else zero
                saved = x if code == RELU or code == LEAKY_RELU else y  # what the kernel differentiates from
                _activation_backward(code, saved.ravel(), dy.ravel(), alpha, dx.ravel())
            elif layers[i, Y_AT] != layers[i, X_AT]:
                _dropout_pass(dy.ravel(), dx.ravel(), seeds[i, 0] + np.uint64(s - s0), seeds[i, 1],
                              _math.typed(alphas[i], params))
        finite = True
        for j in range(segments.size - 1):
            norms[j] = np.sqrt(_sum_squares(grads, segments[j], segments[j + 1]))
            finite = finite and np.isfinite(norms[j])
        if not finite:
            return s
        _update(optimizer, hyper[s - s0], params, grads, state1, state2)
        sums[0] += np.float64(loss) * rows
        sums[1] += correct
        sums[2] = loss
        for j in range(norms.size):
            norm_sums[j] += norms[j]
    return s1
