"""Compiled kernels for training neural networks: one API, three backends.

``numpy`` is the plain reference (the specification), ``numba`` the compiled CPU kernels (the default
for NumPy arrays), ``cuda`` the numba-cuda kernels (chosen automatically for CuPy / Numba device
arrays). Override with :func:`set_backend` or ``with use_backend(...)``.
"""

import atexit as _atexit
import os as _os

from ._api import (adadelta_step, adagrad_step, adam_step, bias_grad, binary_cross_entropy, dropout, hinge,
                   leaky_relu, leaky_relu_backward, matmul, mse, relu, relu_backward, rmsprop_step,
                   sgd_step, sigmoid, sigmoid_backward, softmax, softmax_backward, softmax_cross_entropy,
                   tanh, tanh_backward)
from ._api import (batchnorm_backward, batchnorm_backward_sums, batchnorm_eval, batchnorm_forward,
                   batchnorm_stats, bias_act_backward, dense_grad_norm, segment_norms)
from ._api import check_step, count_correct, metrics_size, unpack_metrics
from ._dispatch import get_backend, is_device_array, set_backend, use_backend
from ._threading import threading_info
from ._warmup import warmup

__all__ = [
    "matmul", "relu", "relu_backward", "leaky_relu", "leaky_relu_backward", "sigmoid", "sigmoid_backward",
    "tanh", "tanh_backward", "softmax", "softmax_backward", "softmax_cross_entropy", "mse",
    "binary_cross_entropy", "hinge", "bias_grad", "dropout", "sgd_step", "adam_step", "rmsprop_step",
    "adagrad_step", "adadelta_step", "set_backend", "get_backend", "use_backend", "is_device_array",
    "warmup", "cpu_info", "threading_info", "bias_act_backward", "segment_norms", "dense_grad_norm",
    "batchnorm_forward", "batchnorm_eval", "batchnorm_backward", "batchnorm_stats", "batchnorm_backward_sums",
    "check_step", "count_correct", "metrics_size", "unpack_metrics",
]

if _os.environ.get("KERNELS_PERF_MAP", "0") not in ("", "0"):  # name the JIT code in `perf record` (profile.py)
    _atexit.register(lambda: __import__("kernels.profile").profile.perf_map())


def cpu_info():
    """The CPU as LLVM reports it and the CPU GEMM's configuration chosen for it: vector width, register
    tile variant (``KERNELS_GEMM_VARIANT`` overrides it), tiles and blocking. See kernels/cpu/_cpuinfo.py."""
    from .cpu._cpuinfo import cpu_info as info

    return info()
