"""The numba backend: hand-written Numba CPU kernels, the default for NumPy arrays.

Same function names and arguments as ``kernels.reference``; compiled on first call and cached on disk
(``cache=True``: next to the package when writable, else Numba's per-user cache directory, or
``NUMBA_CACHE_DIR`` when set).
"""

from ..reference import ascontiguous, empty  # host arrays, as for the reference
from .activations import (leaky_relu, leaky_relu_backward, relu, relu_backward, sigmoid,
                          sigmoid_backward, softmax, softmax_backward, tanh, tanh_backward)
from .batchnorm import batchnorm_backward, batchnorm_eval, batchnorm_forward
from .dropout import dropout
from .fused import bias_act_backward, segment_norms
from .losses import binary_cross_entropy, bias_grad, hinge, mse, softmax_cross_entropy
from .matmul import matmul
from .optim import adadelta_step, adagrad_step, adam_step, rmsprop_step, sgd_step

name = "numba"
