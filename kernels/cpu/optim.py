"""Fused optimizer steps: one pass over memory, reading param, grad and state once and writing param
and state once, vectorised, in parallel chunks on large buffers (see ``_parallel.py``).

Each loop body loads an element of every buffer, applies the optimizer's formula of ``kernels/_scalar.py``
(the reference's arithmetic for one element, shared with the cuda backend) and stores the new values;
Adam's loop is still written out (see the note on the formulas below: the shared one would change its
results by an ulp for AdamW with a gradient scale). The wrappers cast every hyperparameter, and the bias
corrections computed once per step, to the buffer's dtype before the loop, so float32 buffers get float32
math. Divisions (``_scalar.div``, ``np.true_divide``) have NumPy's semantics (x / 0 is inf or NaN, as in the
reference) without the zero check of Python's ``/``, which would keep the loop scalar. NaN in a gradient
reaches the parameter, as in the reference.

A ``scale`` array (see the reference) is host memory here, read by the wrapper: 0 returns before the
loop, 1 runs the loop compiled without a scale (bit for bit the code from before scales existed), any
other value multiplies each gradient element as it is read (``_grad``), so clipping costs no pass of
its own.
"""

import math

import numpy as np

from .. import _scalar
from ._jit import jit
from ._math import _fence, _fma  # (the import also resolves _scalar's primitives for this backend)
from ._parallel import chunked, run


@jit(inline="always")
def _grad(grad, i, gscale):
    """``grad[i]``, times the step's gradient scale unless that is None (a compile-time choice: the
    unscaled loop compiles to exactly the code it had before scales existed)."""
    return grad[i] if gscale is None else grad[i] * gscale


@jit(inline="always")
def _at(buf, i):
    """``buf[i]``, or a zero where the buffer is absent (None: a compile-time choice)."""
    return _scalar.ZERO if buf is None else buf[i]


@jit(inline="always")
def _store(buf, i, value):
    """``buf[i] = value`` unless the buffer is absent."""
    if buf is not None:
        buf[i] = value


# The formulas of kernels/_scalar.py, inlined into the loops' Numba IR before typing (as _grad is), so each
# loop compiles to the code it had when written out here, bit for bit, at the same compile time (a typed
# inline overload took twice as long). Under reassoc and contract, LLVM orders the operands of an expression
# like beta2 * v + c * g * g by where their loads stand, and that decides which product fuses into the
# FMA: a separately optimised function, or loads moved, give 1-ulp differences. That is why Adam's loop
# stays written out: its formula, which has to take the gradient scaled before its AdamW branch, differs by
# an ulp for AdamW with a gradient scale. The cuda backend uses the formula.
_sgd_update, _rmsprop_update, _adagrad_update, _adadelta_update = (
    jit(inline="always")(f) for f in (_scalar.sgd, _scalar.rmsprop, _scalar.adagrad, _scalar.adadelta))


def _run(body, body_chunks, param, scale, *args):
    """``body(lo, hi, param, *args, gscale)`` over param's elements (``_parallel.run``), ``gscale`` the step's
    gradient scale in param's dtype (None for none, or 1), unless that scale is 0: the step is skipped."""
    gscale = None if scale is None or scale[0] == 1 else param.dtype.type(scale[0])
    if gscale != 0:
        run(body, body_chunks, param.size, param, *args, gscale)


@jit
def _sgd(lo, hi, param, grad, velocity, lr, momentum, keep, nesterov, weight_decay, first, gscale):
    for i in range(lo, hi):
        d, v = _sgd_update(_grad(grad, i, gscale), param[i], _at(velocity, i), lr, momentum, keep, weight_decay,
                           velocity is not None, nesterov, first)
        _store(velocity, i, v)
        param[i] -= d


_sgd_chunks = chunked(_sgd)


@jit
def _sgd_outer(lo, hi, param, x, dz, velocity, lr, momentum, keep, nesterov, weight_decay, first):
    """``_sgd`` on the elements ``lo <= i < hi`` of a flat W (rows of ``dz.shape[1]``) with its gradient ``x^T dz``
    at a batch of one or two computed as it is read, never stored: each element the chain of FMAs from zero
    that the GEMM's ``rows`` route computes (``_small._outer``), so bit for bit ``_sgd`` on that product with
    half the memory traffic (the compiled step's first-layer pass: ``step._pieces``)."""
    n = np.uint64(dz.shape[1])
    zero = _fence(param.dtype.type(0))  # the FMA kept: the product's zeros and rounding as _outer has them
    two = x.shape[0] == 2
    for p in range(lo // n, (hi + n - np.uint64(1)) // n):
        at = p * n
        x0, x1 = x[0, p], x[x.shape[0] - 1, p]
        for j in range(max(lo, at) - at, min(hi, at + n) - at):
            g = _fma(x0, dz[0, j], zero)
            if two:
                g = _fma(x1, dz[1, j], g)
            d, v = _sgd_update(g, param[at + j], _at(velocity, at + j), lr, momentum, keep, weight_decay,
                               velocity is not None, nesterov, first)
            _store(velocity, at + j, v)
            param[at + j] -= d


def sgd_step(param, grad, lr, momentum, velocity, dampening, nesterov, weight_decay, step, scale=None):
    """torch.optim.SGD's update; ``step == 1`` starts the velocity at the gradient, as torch does."""
    t = param.dtype.type
    _run(_sgd, _sgd_chunks, param, scale, grad, velocity, t(lr), t(momentum), t(1 - dampening), nesterov,
         t(weight_decay), step == 1)


@jit
def _adam(lo, hi, param, grad, m, v, decay, weight_decay, c1, beta2, c2, step_size, sqrt_bc2, eps,
          decoupled, gscale):
    for i in range(lo, hi):
        p = param[i]
        if decoupled:
            p *= decay
            g = _grad(grad, i, gscale)
        else:
            g = _grad(grad, i, gscale) + weight_decay * p
        m_i = m[i] + c1 * (g - m[i])
        v_i = beta2 * v[i] + c2 * g * g
        m[i] = m_i
        v[i] = v_i
        param[i] = p - np.true_divide(step_size * m_i, np.true_divide(np.sqrt(v_i), sqrt_bc2) + eps)


_adam_chunks = chunked(_adam)


def adam_step(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled, scale=None):
    """Adam (AdamW when ``decoupled``), with bias corrections computed once per step."""
    t = param.dtype.type
    _run(_adam, _adam_chunks, param, scale, grad, m, v, t(1 - lr * weight_decay), t(weight_decay), t(1 - beta1),
         t(beta2), t(1 - beta2), t(lr / (1 - beta1**step)), t(math.sqrt(1 - beta2**step)), t(eps), decoupled)


@jit
def _rmsprop(lo, hi, param, grad, square_avg, momentum_buffer, lr, alpha, c, eps, weight_decay, momentum,
             gscale):
    for i in range(lo, hi):
        d, square_avg[i], buf = _rmsprop_update(_grad(grad, i, gscale), param[i], square_avg[i],
                                                _at(momentum_buffer, i), lr, alpha, c, eps, weight_decay, momentum,
                                                momentum_buffer is not None)
        _store(momentum_buffer, i, buf)
        param[i] -= d


_rmsprop_chunks = chunked(_rmsprop)


def rmsprop_step(param, grad, square_avg, lr, alpha, eps, weight_decay, momentum, momentum_buffer, scale=None):
    """RMSprop (not centered), with momentum when a ``momentum_buffer`` is given."""
    t = param.dtype.type
    _run(_rmsprop, _rmsprop_chunks, param, scale, grad, square_avg, momentum_buffer, t(lr), t(alpha), t(1 - alpha),
         t(eps), t(weight_decay), t(momentum))


@jit
def _adagrad(lo, hi, param, grad, sum_sq, lr, eps, weight_decay, gscale):
    for i in range(lo, hi):
        d, sum_sq[i] = _adagrad_update(_grad(grad, i, gscale), param[i], sum_sq[i], lr, eps, weight_decay)
        param[i] -= d


_adagrad_chunks = chunked(_adagrad)


def adagrad_step(param, grad, sum_sq, lr, eps, weight_decay, scale=None):
    """Adagrad without learning-rate decay."""
    t = param.dtype.type
    _run(_adagrad, _adagrad_chunks, param, scale, grad, sum_sq, t(lr), t(eps), t(weight_decay))


# Without fast-math flags: under them LLVM rounded sqrt(acc + eps) / sqrt(avg + eps) * g differently in the
# vector loop and its scalar remainder, so an element's update depended on where the call's range began and
# ended (the compiled step, which updates the first layer's W apart from the rest, differed by an ulp)
@jit(fastmath=False)
def _adadelta(lo, hi, param, grad, square_avg, acc_delta, lr, rho, c, eps, weight_decay, gscale):
    for i in range(lo, hi):
        d, square_avg[i], acc_delta[i] = _adadelta_update(_grad(grad, i, gscale), param[i], square_avg[i],
                                                          acc_delta[i], lr, rho, c, eps, weight_decay)
        param[i] -= d


_adadelta_chunks = chunked(_adadelta)


def adadelta_step(param, grad, square_avg, acc_delta, lr, rho, eps, weight_decay, scale=None):
    """Adadelta, updating both running averages in the same pass."""
    t = param.dtype.type
    _run(_adadelta, _adadelta_chunks, param, scale, grad, square_avg, acc_delta, t(lr), t(rho), t(1 - rho), t(eps),
         t(weight_decay))
