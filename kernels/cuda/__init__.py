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

import numpy as np
from numba import cuda

from ._launch import STATS as launch_stats
from ._launch import CapturedStep, ascontiguous, empty, is_cupy
from .activations import (leaky_relu, leaky_relu_backward, relu, relu_backward, scale, sigmoid,
                          sigmoid_backward, softmax, softmax_backward, tanh, tanh_backward)
from .batchnorm import (batchnorm_backward, batchnorm_backward_sums, batchnorm_eval, batchnorm_forward,
                        batchnorm_stats)
from .dropout import dropout
from .fused import bias_act_backward, dense_grad_norm, segment_norms
from .losses import binary_cross_entropy, bias_grad, hinge, mse, softmax_cross_entropy
from .matmul import matmul
from .metrics import check_step, count_correct
from .optim import adadelta_step, adagrad_step, adam_step, rmsprop_step, sgd_step

name = "cuda"


def zeros(shape, dtype, like):
    """A zeroed array on ``like``'s device, of the same kind (CuPy for CuPy, else a Numba device array)."""
    return to_device(np.zeros(shape, dtype), like)


def to_device(x, like):
    """A copy of host data ``x`` on ``like``'s device: CuPy when ``like`` is CuPy's, else Numba's."""
    if is_cupy(like):
        import cupy

        return cupy.asarray(x)
    return cuda.to_device(np.ascontiguousarray(x))


def to_host(x):
    """A NumPy copy of device array ``x``: a device-to-host copy (a synchronisation), the only one nn makes."""
    return x.get() if is_cupy(x) else x.copy_to_host()


__all__ = [
    "name", "empty", "zeros", "to_device", "to_host", "ascontiguous", "scale", "CapturedStep", "launch_stats",
    "matmul", "relu", "relu_backward", "leaky_relu", "leaky_relu_backward",
    "sigmoid", "sigmoid_backward", "tanh", "tanh_backward", "softmax", "softmax_backward",
    "softmax_cross_entropy", "mse", "binary_cross_entropy", "hinge", "bias_grad", "dropout", "sgd_step",
    "adam_step", "rmsprop_step", "adagrad_step", "adadelta_step", "bias_act_backward", "segment_norms",
    "dense_grad_norm", "batchnorm_forward", "batchnorm_eval", "batchnorm_backward", "batchnorm_stats",
    "batchnorm_backward_sums", "count_correct", "check_step",
]
