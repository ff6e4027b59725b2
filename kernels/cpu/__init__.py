"""The numba backend: hand-written Numba CPU kernels, the default for NumPy arrays.

Same function names and arguments as ``kernels.reference``; compiled on first call and cached on disk
(``cache=True``: next to the package when writable, else Numba's per-user cache directory, or
``NUMBA_CACHE_DIR`` when set).
"""

from .._threading import setup as _setup_threading

_setup_threading()  # before any kernel runs: Numba fixes its threading layer at the first parallel call

from ..reference import ascontiguous, empty, to_device, to_host, zeros  # noqa: E402  (host arrays)
from .activations import (leaky_relu, leaky_relu_backward, relu, relu_backward, sigmoid,
                          sigmoid_backward, softmax, softmax_backward, tanh, tanh_backward)
from .batchnorm import (batchnorm_backward, batchnorm_backward_sums, batchnorm_eval, batchnorm_forward,
                        batchnorm_stats)
from .dropout import dropout
from .fused import bias_act_backward, segment_norms, segment_norms_serial
from .losses import binary_cross_entropy, bias_grad, bias_grad_serial, hinge, mse, softmax_cross_entropy
from .matmul import matmul
from .metrics import check_step, count_correct
from .optim import adadelta_step, adagrad_step, adam_step, rmsprop_step, sgd_step
from ._parallel import scheduled

# the kernels whose prange loops chunk or split rows themselves (run() schedules dropout and the optimizers);
# bias_grad and segment_norms run their serial twins below PARALLEL_MIN (softmax_cross_entropy and
# bias_act_backward are scheduled the same way, inside losses and fused, behind their wrappers)
for _kernel in ("relu", "relu_backward", "leaky_relu", "leaky_relu_backward", "sigmoid", "sigmoid_backward", "tanh",
                "tanh_backward", "softmax", "softmax_backward", "mse", "binary_cross_entropy", "hinge", "bias_grad",
                "segment_norms"):
    globals()[_kernel] = scheduled(globals()[_kernel], globals().pop(_kernel + "_serial", None))
del _kernel

name = "numba"
