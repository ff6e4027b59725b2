"""Fused optimizer steps: one grid-stride pass over flat buffers, in place, each element updated by the
optimizer's formula of ``kernels/_scalar.py`` (shared with the numba backend).

Hyperparameter expressions that do not depend on the element (1 - beta, bias corrections, ...) are
computed once on the host in double precision and passed in the buffers' dtype, as the reference's
Python scalars are. An absent state buffer (None) is replaced by ``grad`` as a placeholder the kernel never
reads or writes.

A ``scale`` array (see the reference) is read on the device by every thread: 0 returns before the loop
(the step is skipped without the host knowing), otherwise each gradient element is multiplied by it as
it is read. Without one, ``grad`` is passed as its placeholder and ``has_scale`` is False.
"""

import math

from numba import cuda

from .. import _scalar
from ._launch import ZERO, grid, kernel


def _launch(kernel, param, grad, scale, *args):
    if param.shape[0]:
        # an absent buffer (None) as the grad placeholder, hyperparameters in the buffers' dtype, the rest as is
        dtype = param.dtype.type
        args = [grad if a is None else a if hasattr(a, "shape") or isinstance(a, bool) else dtype(a) for a in args]
        kernel[grid(param.shape[0])](param, grad, grad if scale is None else scale, scale is not None, *args)


@cuda.jit(device=True)
def _skip(scale, has_scale):
    """Whether the step's gradient scale says to skip it."""
    return has_scale and scale[0] == ZERO  # float32 zero: no float64 compare in a float32 kernel


@cuda.jit(device=True)
def _grad(grad, i, scale, has_scale):
    return grad[i] * scale[0] if has_scale else grad[i]


@cuda.jit(device=True)
def _at(buf, i, present):
    """``buf[i]``, or a zero where the buffer is a placeholder."""
    return buf[i] if present else ZERO


@cuda.jit(device=True)
def _store(buf, i, value, present):
    """``buf[i] = value`` unless the buffer is a placeholder."""
    if present:
        buf[i] = value


@kernel
def _sgd(param, grad, scale, has_scale, velocity, lr, momentum, one_minus_dampening, weight_decay, has_momentum,
         nesterov, first):
    if _skip(scale, has_scale):
        return
    for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
        d, vel = _scalar.sgd(_grad(grad, i, scale, has_scale), param[i], _at(velocity, i, has_momentum), lr,
                             momentum, one_minus_dampening, weight_decay, has_momentum, nesterov, first)
        _store(velocity, i, vel, has_momentum)
        param[i] -= d


def sgd_step(param, grad, lr, momentum, velocity, dampening, nesterov, weight_decay, step, scale=None):
    _launch(_sgd, param, grad, scale, velocity, lr, momentum, 1 - dampening, weight_decay, momentum != 0,
            bool(nesterov), step == 1)


@kernel
def _adam(param, grad, scale, has_scale, m, v, decay, weight_decay, one_minus_beta1, beta2, one_minus_beta2,
          step_size, sqrt_bc2, eps, decoupled):
    if _skip(scale, has_scale):
        return
    for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
        param[i], m[i], v[i] = _scalar.adam(param[i], _grad(grad, i, scale, has_scale), m[i], v[i], decay,
                                            weight_decay, one_minus_beta1, beta2, one_minus_beta2, step_size,
                                            sqrt_bc2, eps, decoupled)


def adam_step(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled, scale=None):
    _launch(_adam, param, grad, scale, m, v, 1 - lr * weight_decay, weight_decay, 1 - beta1, beta2, 1 - beta2,
            lr / (1 - beta1**step), math.sqrt(1 - beta2**step), eps, bool(decoupled))


@kernel
def _rmsprop(param, grad, scale, has_scale, square_avg, momentum_buffer, lr, alpha, one_minus_alpha, eps,
             weight_decay, momentum, has_momentum):
    if _skip(scale, has_scale):
        return
    for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
        d, square_avg[i], buf = _scalar.rmsprop(_grad(grad, i, scale, has_scale), param[i], square_avg[i],
                                                _at(momentum_buffer, i, has_momentum), lr, alpha, one_minus_alpha,
                                                eps, weight_decay, momentum, has_momentum)
        _store(momentum_buffer, i, buf, has_momentum)
        param[i] -= d


def rmsprop_step(param, grad, square_avg, lr, alpha, eps, weight_decay, momentum, momentum_buffer, scale=None):
    _launch(_rmsprop, param, grad, scale, square_avg, momentum_buffer, lr, alpha, 1 - alpha, eps, weight_decay,
            momentum, momentum > 0)


@kernel
def _adagrad(param, grad, scale, has_scale, sum_sq, lr, eps, weight_decay):
    if _skip(scale, has_scale):
        return
    for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
        d, sum_sq[i] = _scalar.adagrad(_grad(grad, i, scale, has_scale), param[i], sum_sq[i], lr, eps, weight_decay)
        param[i] -= d


def adagrad_step(param, grad, sum_sq, lr, eps, weight_decay, scale=None):
    _launch(_adagrad, param, grad, scale, sum_sq, lr, eps, weight_decay)


@kernel
def _adadelta(param, grad, scale, has_scale, square_avg, acc_delta, lr, rho, one_minus_rho, eps, weight_decay):
    if _skip(scale, has_scale):
        return
    for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
        d, square_avg[i], acc_delta[i] = _scalar.adadelta(_grad(grad, i, scale, has_scale), param[i], square_avg[i],
                                                          acc_delta[i], lr, rho, one_minus_rho, eps, weight_decay)
        param[i] -= d


def adadelta_step(param, grad, square_avg, acc_delta, lr, rho, eps, weight_decay, scale=None):
    _launch(_adadelta, param, grad, scale, square_avg, acc_delta, lr, rho, 1 - rho, eps, weight_decay)
