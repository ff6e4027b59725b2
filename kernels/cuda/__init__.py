"""The cuda backend: hand-written numba-cuda kernels for CuPy and Numba device arrays.

Same function names and arguments as ``kernels.reference``. Outputs are allocated on the device as the
same kind of array as the input (CuPy in, CuPy out; Numba device array in, Numba device array out), and
device data is never copied to the host: losses return a 0-d device array, and out-of-range labels give
a NaN loss instead of an error (see ``losses``). Kernels compile on their first call for each dtype and
layout. Under the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the same code runs on the CPU, with
small blocks (see ``_launch``).

Launches go to one stream (CuPy's current stream for CuPy arrays, else Numba's default stream);
``CapturedStep`` replays a sequence of launches as one CUDA graph; ``launch_stats`` counts launches.
"""

from ._launch import STATS as launch_stats
from ._launch import CapturedStep, ascontiguous, empty
from .activations import (leaky_relu, leaky_relu_backward, relu, relu_backward, sigmoid,
                          sigmoid_backward, softmax, softmax_backward, tanh, tanh_backward)
from .batchnorm import (batchnorm_backward, batchnorm_backward_sums, batchnorm_eval, batchnorm_forward,
                        batchnorm_stats)
from .dropout import dropout
from .fused import bias_act_backward, segment_norms
from .losses import binary_cross_entropy, bias_grad, hinge, mse, softmax_cross_entropy
from .matmul import matmul
from .optim import adadelta_step, adagrad_step, adam_step, rmsprop_step, sgd_step

name = "cuda"

__all__ = [
    "name", "empty", "ascontiguous", "CapturedStep", "launch_stats",
    "matmul", "relu", "relu_backward", "leaky_relu", "leaky_relu_backward",
    "sigmoid", "sigmoid_backward", "tanh", "tanh_backward", "softmax", "softmax_backward",
    "softmax_cross_entropy", "mse", "binary_cross_entropy", "hinge", "bias_grad", "dropout", "sgd_step",
    "adam_step", "rmsprop_step", "adagrad_step", "adadelta_step", "bias_act_backward", "segment_norms",
    "batchnorm_forward", "batchnorm_eval", "batchnorm_backward", "batchnorm_stats", "batchnorm_backward_sums",
]
