"""The NumPy reference backend: every kernel written plainly. It is the specification the numba and
cuda backends are tested against; read a function here to know what the fast versions compute.

Backend functions receive validated arguments (see ``kernels._api``): elementwise kernels and optimizer
steps get flat C-contiguous views, and every output buffer is passed in.
"""

import numpy as np

from .activations import (leaky_relu, leaky_relu_backward, relu, relu_backward, sigmoid,
                          sigmoid_backward, softmax, softmax_backward, tanh, tanh_backward)
from .batchnorm import (batchnorm_backward, batchnorm_backward_sums, batchnorm_eval, batchnorm_forward,
                        batchnorm_stats)
from .dropout import dropout
from .fused import bias_act_backward, dense_grad_norm, segment_norms
from .losses import binary_cross_entropy, bias_grad, hinge, mse, softmax_cross_entropy
from .matmul import matmul
from .metrics import check_step, count_correct
from .optim import adadelta_step, adagrad_step, adam_step, rmsprop_step, sgd_step

name = "numpy"


def empty(shape, dtype, like):
    """An uninitialised host array."""
    return np.empty(shape, dtype)


def zeros(shape, dtype, like):
    """A zeroed host array."""
    return np.zeros(shape, dtype)


def to_device(x, like):
    """Host data where the kernels run: here the host, so ``x`` as an array (no copy when it is one)."""
    return np.asarray(x)


def to_host(x):
    """``x`` as a NumPy array (host arrays are already there: no copy)."""
    return np.asarray(x)


def ascontiguous(x):
    """``x`` itself when C-contiguous, else a C-contiguous copy."""
    return np.ascontiguousarray(x)
