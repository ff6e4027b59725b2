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
from numba import prange

from .. import _scalar
from . import _math  # noqa: F401  (resolves _scalar's primitives for this backend)
from ._jit import jit
from ._parallel import chunk, n_chunks, run


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


def _scale(param, scale):
    """The step's gradient scale in param's dtype: None for none (or 1), 0 to skip the step."""
    if scale is None or scale[0] == 1:
        return None
    return param.dtype.type(scale[0])


@jit
def _sgd(lo, hi, param, grad, velocity, lr, momentum, keep, nesterov, weight_decay, first, gscale):
    for i in range(lo, hi):
        d, v = _sgd_update(_grad(grad, i, gscale), param[i], _at(velocity, i), lr, momentum, keep, weight_decay,
                           velocity is not None, nesterov, first)
        _store(velocity, i, v)
        param[i] -= d


@jit(parallel=True)
def _sgd_chunks(n, *args):
    for c in prange(n_chunks(n)):
        lo, hi = chunk(c, n)
        _sgd(lo, hi, *args)


def sgd_step(param, grad, lr, momentum, velocity, dampening, nesterov, weight_decay, step, scale=None):
    """torch.optim.SGD's update; ``step == 1`` starts the velocity at the gradient, as torch does."""
    t, s = param.dtype.type, _scale(param, scale)
    if s != 0:
        run(_sgd, _sgd_chunks, param.size, param, grad, velocity, t(lr), t(momentum), t(1 - dampening), nesterov,
            t(weight_decay), step == 1, s)


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


@jit(parallel=True)
def _adam_chunks(n, *args):
    for c in prange(n_chunks(n)):
        lo, hi = chunk(c, n)
        _adam(lo, hi, *args)


def adam_step(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled, scale=None):
    """Adam (AdamW when ``decoupled``), with bias corrections computed once per step."""
    t, s = param.dtype.type, _scale(param, scale)
    if s != 0:
        run(_adam, _adam_chunks, param.size, param, grad, m, v, t(1 - lr * weight_decay), t(weight_decay),
            t(1 - beta1), t(beta2), t(1 - beta2), t(lr / (1 - beta1**step)), t(math.sqrt(1 - beta2**step)),
            t(eps), decoupled, s)


@jit
def _rmsprop(lo, hi, param, grad, square_avg, momentum_buffer, lr, alpha, c, eps, weight_decay, momentum,
             gscale):
    for i in range(lo, hi):
        d, square_avg[i], buf = _rmsprop_update(_grad(grad, i, gscale), param[i], square_avg[i],
                                                _at(momentum_buffer, i), lr, alpha, c, eps, weight_decay, momentum,
                                                momentum_buffer is not None)
        _store(momentum_buffer, i, buf)
        param[i] -= d


@jit(parallel=True)
def _rmsprop_chunks(n, *args):
    for c in prange(n_chunks(n)):
        lo, hi = chunk(c, n)
        _rmsprop(lo, hi, *args)


def rmsprop_step(param, grad, square_avg, lr, alpha, eps, weight_decay, momentum, momentum_buffer, scale=None):
    """RMSprop (not centered), with momentum when a ``momentum_buffer`` is given."""
    t, s = param.dtype.type, _scale(param, scale)
    if s != 0:
        run(_rmsprop, _rmsprop_chunks, param.size, param, grad, square_avg, momentum_buffer, t(lr), t(alpha),
            t(1 - alpha), t(eps), t(weight_decay), t(momentum), s)


@jit
def _adagrad(lo, hi, param, grad, sum_sq, lr, eps, weight_decay, gscale):
    for i in range(lo, hi):
        d, sum_sq[i] = _adagrad_update(_grad(grad, i, gscale), param[i], sum_sq[i], lr, eps, weight_decay)
        param[i] -= d


@jit(parallel=True)
def _adagrad_chunks(n, *args):
    for c in prange(n_chunks(n)):
        lo, hi = chunk(c, n)
        _adagrad(lo, hi, *args)


def adagrad_step(param, grad, sum_sq, lr, eps, weight_decay, scale=None):
    """Adagrad without learning-rate decay."""
    t, s = param.dtype.type, _scale(param, scale)
    if s != 0:
        run(_adagrad, _adagrad_chunks, param.size, param, grad, sum_sq, t(lr), t(eps), t(weight_decay), s)


@jit
def _adadelta(lo, hi, param, grad, square_avg, acc_delta, lr, rho, c, eps, weight_decay, gscale):
    for i in range(lo, hi):
        d, square_avg[i], acc_delta[i] = _adadelta_update(_grad(grad, i, gscale), param[i], square_avg[i],
                                                          acc_delta[i], lr, rho, c, eps, weight_decay)
        param[i] -= d


@jit(parallel=True)
def _adadelta_chunks(n, *args):
    for c in prange(n_chunks(n)):
        lo, hi = chunk(c, n)
        _adadelta(lo, hi, *args)


def adadelta_step(param, grad, square_avg, acc_delta, lr, rho, eps, weight_decay, scale=None):
    """Adadelta, updating both running averages in the same pass."""
    t, s = param.dtype.type, _scale(param, scale)
    if s != 0:
        run(_adadelta, _adadelta_chunks, param.size, param, grad, square_avg, acc_delta, t(lr), t(rho),
            t(1 - rho), t(eps), t(weight_decay), s)
