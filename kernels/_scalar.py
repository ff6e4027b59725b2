"""Element-wise maths written once for every compiled backend: plain Python functions of scalars.

The formulas (activations, their gradients, the optimizers' per-element updates) are compiled by each
backend from these same functions: the numba backend inlines them into its loops (``kernels/cpu/_math.py``
and ``optim.py``), the cuda backend compiles them as device functions (``kernels/cuda/_launch.py``), and the
CUDA simulator runs them as Python. They call only arithmetic, comparisons and the primitives below.

The primitives ``exp``, ``tanh``, ``sqrt`` and ``div`` resolve per target (each backend calls
:func:`implement`): on the CPU to ``_math``'s vectorisable ``exp``/``tanh``, ``np.sqrt`` and
``np.true_divide``; on CUDA to libdevice's and ``/``; in Python (the simulator) to ``math``'s, typed like
the argument, and ``/``. Constants are float32 (``ZERO``, ``ONE``): exact, and they never promote float32
arithmetic to float64. Every argument is typed like the arrays (the kernels cast hyperparameters before
their loops), so float32 buffers get float32 maths.

Numba's on-disk cache does not see edits to this file from the kernels that inline it: clear the
``__pycache__`` of ``kernels/cpu`` after changing a formula.
"""

import math

import numpy as np

ZERO = np.float32(0)
ONE = np.float32(1)

# ---- primitives: one implementation per target; these Python bodies serve the CUDA simulator --------


def exp(x):
    """e**x in x's float type."""
    return type(x)(math.exp(x))


def tanh(x):
    """Hyperbolic tangent in x's float type."""
    return type(x)(math.tanh(x))


def sqrt(x):
    """Square root in x's float type."""
    return type(x)(math.sqrt(x))


def div(a, b):
    """IEEE a / b (x / 0 is inf or NaN), without the zero check of Python's ``/`` in Numba CPU code, which
    would keep a loop from vectorising (the activations' compile options leave it out; the optimizers'
    loops are compiled with Numba's default error model)."""
    return a / b


def implement(overload, implementations):
    """Compile each primitive as the function ``implementations`` maps it to, on the Numba target whose
    ``overload`` decorator is given (``numba.extending``'s or ``numba.cuda.extending``'s). Inlined, so the
    calling kernel's flags (fast-math, error model) apply to it."""
    for primitive, fn in implementations.items():
        overload(primitive, inline="always")(_calling(fn, binary=primitive is div))


def _calling(fn, binary):
    """The overload body of a primitive implemented by ``fn`` (its parameters must match the primitive's)."""
    return (lambda a, b: lambda a, b: fn(a, b)) if binary else (lambda x: lambda x: fn(x))


# ---- activations: ``f(a, b, alpha)``, a forward pass ignoring b, a gradient taking b = dy ----------------


def relu(x, _, alpha):
    return ZERO if x < ZERO else x  # NaN is not < 0: it stays NaN, as with np.maximum


def relu_backward(x, dy, alpha):
    return dy * (ONE if x > ZERO else ZERO)  # dy * (x > 0) exactly: inf * 0 is NaN as in NumPy


def leaky_relu(x, _, alpha):
    return x if x > ZERO else alpha * x


def leaky_relu_backward(x, dy, alpha):
    return dy if x > ZERO else alpha * dy


def sigmoid(x, _, alpha):
    """1 / (1 + e**-x) from exp(-|x|) only: no overflow, exact limits 0 and 1, NaN propagates."""
    z = exp(-abs(x))
    return (ONE if x >= ZERO else z) / (ONE + z)


def sigmoid_backward(y, dy, alpha):
    return dy * (y * (ONE - y))


def tanh_forward(x, _, alpha):
    return tanh(x)


def tanh_backward(y, dy, alpha):
    return dy * (ONE - y * y)


ACTIVATIONS = {"relu": (relu, relu_backward), "leaky_relu": (leaky_relu, leaky_relu_backward),
               "sigmoid": (sigmoid, sigmoid_backward), "tanh": (tanh_forward, tanh_backward)}

# ---- optimizer updates of one element ------------------------------------------------------------------
# The arithmetic of kernels/reference/optim.py, with the step's constants (1 - beta, bias corrections, ...)
# computed once by the caller. ``g`` is the gradient element (already scaled), ``p`` the parameter element.
# They return the new state values and either the new parameter (adam) or the decrement the caller
# subtracts from the parameter after storing the state (the others: the order of the loop they replace on
# the CPU, which keeps its results bit for bit). A state value whose buffer is absent (``has_*`` False) is
# passed as anything and returned unchanged.


def sgd(g, p, v, lr, momentum, keep, weight_decay, has_velocity, nesterov, first):
    """SGD: (decrement, velocity). ``keep`` is 1 - dampening; ``first`` starts the velocity at the
    gradient, as torch does."""
    g = g + weight_decay * p
    if has_velocity:
        v = g if first else momentum * v + keep * g
        g = g + momentum * v if nesterov else v
    return lr * g, v


def adam(p, g, m, v, decay, weight_decay, one_minus_beta1, beta2, one_minus_beta2, step_size, sqrt_bc2, eps,
         decoupled):
    """Adam, or AdamW when ``decoupled`` (param times ``decay`` = 1 - lr wd): (param, m, v). ``step_size``
    is lr / (1 - beta1**step), ``sqrt_bc2`` sqrt(1 - beta2**step)."""
    if decoupled:
        p *= decay
    else:
        g = g + weight_decay * p
    m = m + one_minus_beta1 * (g - m)
    v = beta2 * v + one_minus_beta2 * g * g
    return p - div(step_size * m, div(sqrt(v), sqrt_bc2) + eps), m, v


def rmsprop(g, p, square_avg, buf, lr, alpha, one_minus_alpha, eps, weight_decay, momentum, has_momentum):
    """RMSprop (not centered), with a momentum buffer when ``has_momentum``: (decrement, square_avg, buf)."""
    g = g + weight_decay * p
    square_avg = alpha * square_avg + one_minus_alpha * g * g
    update = div(g, sqrt(square_avg) + eps)
    if has_momentum:
        update = momentum * buf + update
        buf = update
    return lr * update, square_avg, buf


def adagrad(g, p, sum_sq, lr, eps, weight_decay):
    """Adagrad without learning-rate decay: (decrement, sum_sq)."""
    g = g + weight_decay * p
    sum_sq = sum_sq + g * g
    return div(lr * g, sqrt(sum_sq) + eps), sum_sq


def adadelta(g, p, square_avg, acc_delta, lr, rho, one_minus_rho, eps, weight_decay):
    """Adadelta: (decrement, square_avg, acc_delta)."""
    g = g + weight_decay * p
    square_avg = rho * square_avg + one_minus_rho * g * g
    delta = div(sqrt(acc_delta + eps), sqrt(square_avg + eps)) * g
    acc_delta = rho * acc_delta + one_minus_rho * delta * delta
    return lr * delta, square_avg, acc_delta


OPTIMIZERS = (sgd, adam, rmsprop, adagrad, adadelta)
