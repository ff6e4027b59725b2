"""Optimizer steps, in place on ``param`` and the state buffers, following the algorithms torch.optim
documents for the same names and defaults (``step`` counts from 1).

``scale``: None, or a 1-element array of the buffers' dtype read by the kernel (a trainer's
``check_step`` writes it on the device): the step uses ``grad * scale[0]`` (gradient clipping), and
``scale[0] == 0`` skips the update, leaving param and state untouched (a non-finite step).
"""

import math

import numpy as np


def _scaled(grad, scale):
    """The gradient the step uses, or None to skip the step."""
    if scale is None or scale[0] == 1:
        return grad
    return None if scale[0] == 0 else grad * scale[0]


def _decayed(grad, param, weight_decay, scale):
    """The scaled gradient plus L2 weight decay, or None to skip the step."""
    grad = _scaled(grad, scale)
    return None if grad is None else grad + weight_decay * param


def _average_square(average, decay, g):
    """``average = decay * average + (1 - decay) * g**2``, in place (Adam's v, RMSProp's, Adadelta's)."""
    average *= decay
    average += (1 - decay) * g * g


def sgd_step(param, grad, lr, momentum, velocity, dampening, nesterov, weight_decay, step, scale=None):
    g = _decayed(grad, param, weight_decay, scale)
    if g is None:
        return
    if momentum != 0:
        if step == 1:  # torch.optim.SGD starts the buffer at the first gradient, undamped
            velocity[...] = g
        else:
            velocity *= momentum
            velocity += (1 - dampening) * g
        g = g + momentum * velocity if nesterov else velocity
    param -= lr * g


def adam_step(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled, scale=None):
    grad = _scaled(grad, scale)
    if grad is None:
        return
    if decoupled:  # AdamW: decay the weights, not the gradient
        param *= 1 - lr * weight_decay
        g = grad
    else:
        g = grad + weight_decay * param
    m += (1 - beta1) * (g - m)
    _average_square(v, beta2, g)
    denom = np.sqrt(v) / math.sqrt(1 - beta2**step) + eps
    param -= (lr / (1 - beta1**step)) * m / denom


def rmsprop_step(param, grad, square_avg, lr, alpha, eps, weight_decay, momentum, momentum_buffer, scale=None):
    g = _decayed(grad, param, weight_decay, scale)
    if g is None:
        return
    _average_square(square_avg, alpha, g)
    update = g / (np.sqrt(square_avg) + eps)
    if momentum > 0:
        momentum_buffer *= momentum
        momentum_buffer += update
        update = momentum_buffer
    param -= lr * update


def adagrad_step(param, grad, sum_sq, lr, eps, weight_decay, scale=None):
    g = _decayed(grad, param, weight_decay, scale)
    if g is None:
        return
    sum_sq += g * g
    param -= lr * g / (np.sqrt(sum_sq) + eps)


def adadelta_step(param, grad, square_avg, acc_delta, lr, rho, eps, weight_decay, scale=None):
    g = _decayed(grad, param, weight_decay, scale)
    if g is None:
        return
    _average_square(square_avg, rho, g)
    delta = np.sqrt(acc_delta + eps) / np.sqrt(square_avg + eps) * g
    _average_square(acc_delta, rho, delta)
    param -= lr * delta
