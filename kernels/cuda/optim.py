"""Fused optimizer steps: one grid-stride pass over flat buffers, in place.

Hyperparameter expressions that do not depend on the element (1 - beta, bias corrections, ...) are
computed once on the host in double precision and passed in the buffers' dtype, as the reference's
Python scalars are. An absent state buffer is replaced by ``grad`` as a placeholder the kernel never reads.

A ``scale`` array (see the reference) is read on the device by every thread: 0 returns before the loop
(the step is skipped without the host knowing), otherwise each gradient element is multiplied by it as
it is read. Without one, ``grad`` is passed as its placeholder and ``has_scale`` is False.
"""

import math

from numba import cuda

from ._launch import ZERO, grid, kernel, sqrt


def _launch(kernel, param, grad, scale, *args):
    if param.shape[0]:
        dtype = param.dtype.type  # float hyperparameters in the buffers' dtype; arrays and flags as they are
        args = [a if hasattr(a, "shape") or isinstance(a, bool) else dtype(a) for a in args]
        kernel[grid(param.shape[0])](param, grad, grad if scale is None else scale, scale is not None, *args)


@cuda.jit(device=True)
def _skip(scale, has_scale):
    """Whether the step's gradient scale says to skip it."""
    return has_scale and scale[0] == ZERO  # float32 zero: no float64 compare in a float32 kernel


@cuda.jit(device=True)
def _grad(grad, i, scale, has_scale):
    return grad[i] * scale[0] if has_scale else grad[i]


@kernel
def _sgd(param, grad, scale, has_scale, velocity, lr, momentum, one_minus_dampening, weight_decay, has_momentum,
         nesterov, first):
    if _skip(scale, has_scale):
        return
    for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
        g = _grad(grad, i, scale, has_scale) + weight_decay * param[i]
        if has_momentum:
            vel = g if first else momentum * velocity[i] + one_minus_dampening * g
            velocity[i] = vel
            g = g + momentum * vel if nesterov else vel
        param[i] -= lr * g


def sgd_step(param, grad, lr, momentum, velocity, dampening, nesterov, weight_decay, step, scale=None):
    _launch(_sgd, param, grad, scale, grad if velocity is None else velocity, lr, momentum, 1 - dampening,
            weight_decay, momentum != 0, bool(nesterov), step == 1)


@kernel
def _adam(param, grad, scale, has_scale, m, v, decay, weight_decay, one_minus_beta1, beta2, one_minus_beta2,
          sqrt_bc2, step_size, eps, decoupled):
    if _skip(scale, has_scale):
        return
    for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
        p = param[i]
        if decoupled:
            p *= decay
            g = _grad(grad, i, scale, has_scale)
        else:
            g = _grad(grad, i, scale, has_scale) + weight_decay * p
        mi = m[i] + one_minus_beta1 * (g - m[i])
        vi = beta2 * v[i] + one_minus_beta2 * g * g
        m[i] = mi
        v[i] = vi
        param[i] = p - step_size * mi / (sqrt(vi) / sqrt_bc2 + eps)


def adam_step(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled, scale=None):
    _launch(_adam, param, grad, scale, m, v, 1 - lr * weight_decay, weight_decay, 1 - beta1, beta2, 1 - beta2,
            math.sqrt(1 - beta2**step), lr / (1 - beta1**step), eps, bool(decoupled))


@kernel
def _rmsprop(param, grad, scale, has_scale, square_avg, momentum_buffer, lr, alpha, one_minus_alpha, eps,
             weight_decay, momentum, has_momentum):
    if _skip(scale, has_scale):
        return
    for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
        g = _grad(grad, i, scale, has_scale) + weight_decay * param[i]
        sq = alpha * square_avg[i] + one_minus_alpha * g * g
        square_avg[i] = sq
        update = g / (sqrt(sq) + eps)
        if has_momentum:
            update += momentum * momentum_buffer[i]
            momentum_buffer[i] = update
        param[i] -= lr * update


def rmsprop_step(param, grad, square_avg, lr, alpha, eps, weight_decay, momentum, momentum_buffer, scale=None):
    _launch(_rmsprop, param, grad, scale, square_avg, grad if momentum_buffer is None else momentum_buffer, lr,
            alpha, 1 - alpha, eps, weight_decay, momentum, momentum > 0)


@kernel
def _adagrad(param, grad, scale, has_scale, sum_sq, lr, eps, weight_decay):
    if _skip(scale, has_scale):
        return
    for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
        g = _grad(grad, i, scale, has_scale) + weight_decay * param[i]
        s = sum_sq[i] + g * g
        sum_sq[i] = s
        param[i] -= lr * g / (sqrt(s) + eps)


def adagrad_step(param, grad, sum_sq, lr, eps, weight_decay, scale=None):
    _launch(_adagrad, param, grad, scale, sum_sq, lr, eps, weight_decay)


@kernel
def _adadelta(param, grad, scale, has_scale, square_avg, acc_delta, lr, rho, one_minus_rho, eps, weight_decay):
    if _skip(scale, has_scale):
        return
    for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
        g = _grad(grad, i, scale, has_scale) + weight_decay * param[i]
        sq = rho * square_avg[i] + one_minus_rho * g * g
        square_avg[i] = sq
        delta = sqrt(acc_delta[i] + eps) / sqrt(sq + eps) * g
        acc_delta[i] = rho * acc_delta[i] + one_minus_rho * delta * delta
        param[i] -= lr * delta


def adadelta_step(param, grad, square_avg, acc_delta, lr, rho, eps, weight_decay, scale=None):
    _launch(_adadelta, param, grad, scale, square_avg, acc_delta, lr, rho, 1 - rho, eps, weight_decay)
