"""Compiled kernels for training neural networks: one API, three backends.

``numpy`` is the plain reference (the specification), ``numba`` the compiled CPU kernels (the default
for NumPy arrays), ``cuda`` the numba-cuda kernels (chosen automatically for CuPy / Numba device
arrays). Override with :func:`set_backend` or ``with use_backend(...)``.
"""

import numpy as np

from ._api import (adadelta_step, adagrad_step, adam_step, bias_grad, binary_cross_entropy, dropout, hinge,
                   leaky_relu, leaky_relu_backward, matmul, mse, relu, relu_backward, rmsprop_step,
                   sgd_step, sigmoid, sigmoid_backward, softmax, softmax_backward, softmax_cross_entropy,
                   tanh, tanh_backward)
from ._dispatch import get_backend, is_device_array, set_backend, use_backend
from ._threading import threading_info

__all__ = [
    "matmul", "relu", "relu_backward", "leaky_relu", "leaky_relu_backward", "sigmoid", "sigmoid_backward",
    "tanh", "tanh_backward", "softmax", "softmax_backward", "softmax_cross_entropy", "mse",
    "binary_cross_entropy", "hinge", "bias_grad", "dropout", "sgd_step", "adam_step", "rmsprop_step",
    "adagrad_step", "adadelta_step", "set_backend", "get_backend", "use_backend", "is_device_array",
    "threading_info", "warmup",
]


def warmup(backend="numba", dtypes=("float32", "float64")):
    """Call every kernel once on small host arrays so the first real call does not pay the compile.

    With the numba backend's on-disk cache this loads compiled code instead of compiling, after the
    first run on a machine. Returns the backend name.
    """
    with use_backend(backend):
        for dtype in map(np.dtype, dtypes):
            x = np.linspace(-2, 2, 96, dtype=dtype).reshape(8, 12)
            w = np.linspace(-1, 1, 144, dtype=dtype).reshape(12, 12)
            bias = np.zeros(12, dtype)
            for act in (None, "relu", "leaky_relu", "sigmoid", "tanh"):
                matmul(x, w, bias=bias, activation=act)
            matmul(x, x, trans_a=True)
            matmul(x, w, trans_b=True)
            big = np.ones((128, 128), dtype)  # 2^22 flops: the multithreaded GEMM, when threads > 1
            matmul(big, big)
            for fwd, bwd, from_input in ((relu, relu_backward, True), (leaky_relu, leaky_relu_backward, True),
                                         (sigmoid, sigmoid_backward, False), (tanh, tanh_backward, False),
                                         (softmax, softmax_backward, False)):
                y = fwd(x)
                bwd(x if from_input else y, x)
            labels = np.arange(8) % 12
            softmax_cross_entropy(x, labels)
            mse(x, x)
            binary_cross_entropy(x, x)
            hinge(x, np.sign(x) + (x == 0))
            bias_grad(x)
            dropout(x, 0.5, 0)
            p, g, s1, s2 = (np.zeros(1 << 16, dtype) for _ in range(4))  # large: the parallel drivers
            dropout(p, 0.5, 0)
            sgd_step(p, g, lr=0.1, momentum=0.9, velocity=s1, nesterov=True, weight_decay=0.1, step=1)
            adam_step(p, g, s1, s2, step=1, weight_decay=0.1)
            adam_step(p, g, s1, s2, step=1, weight_decay=0.1, decoupled=True)
            rmsprop_step(p, g, s1, momentum=0.9, momentum_buffer=s2)
            adagrad_step(p, g, s1)
            adadelta_step(p, g, s1, s2)
    return backend
