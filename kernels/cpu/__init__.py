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
from .fused import bias_act_backward, dense_grad_norm
from .fused import segment_norms_scheduled as segment_norms
from .losses import binary_cross_entropy, hinge, mse, softmax_cross_entropy
from .losses import bias_grad_scheduled as bias_grad
from .matmul import matmul
from .metrics import check_step, count_correct
from .optim import adadelta_step, adagrad_step, adam_step, rmsprop_step, sgd_step
from ._parallel import scheduled

# the kernels whose prange loops chunk or split rows themselves (run() schedules dropout and the optimizers);
# the four with serial twins (softmax_cross_entropy, bias_grad, bias_act_backward, segment_norms) are
# scheduled in their modules, each at its own parallel threshold
for _kernel in ("relu", "relu_backward", "leaky_relu", "leaky_relu_backward", "sigmoid", "sigmoid_backward", "tanh",
                "tanh_backward", "softmax", "softmax_backward", "mse", "binary_cross_entropy", "hinge"):
    globals()[_kernel] = scheduled(globals()[_kernel])
del _kernel

name = "numba"
