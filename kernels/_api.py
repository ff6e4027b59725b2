"""The public kernel API: validate, pick the backend, allocate outputs, call the backend's kernel.

Each function validates every argument before any memory is touched, then hands the backend flat
C-contiguous views for elementwise kernels and optimizer steps (a non-contiguous *input* is copied once;
buffers written in place must already be C-contiguous), and an output buffer that is either the user's
``out=`` or freshly allocated on the input's device.
"""

from . import _checks as check
from ._dispatch import select

ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh")


def _flat(backend, x):
    return backend.ascontiguous(x).reshape(-1)


def _elementwise(kernel, x, out, *params, name="x"):
    check.float_array(name, x)
    backend = select(**{name: x}, out=out)
    out = check.out(out, x.shape, x.dtype, backend, like=x, reads={name: x}, same_ok=True)
    getattr(backend, kernel)(_flat(backend, x), *params, out.reshape(-1))
    return out


def _elementwise_backward(kernel, a_name, a, dy, out, *params):
    check.float_array(a_name, a)
    check.float_array("dy", dy)
    check.same_dtype(**{a_name: a}, dy=dy)
    check.shape("dy", dy, a.shape, f"the shape of {a_name}")
    backend = select(**{a_name: a}, dy=dy, out=out)
    out = check.out(out, a.shape, a.dtype, backend, like=a, reads={a_name: a, "dy": dy}, same_ok=True)
    getattr(backend, kernel)(_flat(backend, a), _flat(backend, dy), *params, out.reshape(-1))
    return out


# ---- activations -----------------------------------------------------------------------------------

def relu(x, *, out=None):
    """max(x, 0), elementwise."""
    return _elementwise("relu", x, out)


def relu_backward(x, dy, *, out=None):
    """dy where the forward input x > 0, else 0."""
    return _elementwise_backward("relu_backward", "x", x, dy, out)


def leaky_relu(x, alpha=0.01, *, out=None):
    """x where x > 0, else alpha * x."""
    alpha = check.scalar("alpha", alpha)
    return _elementwise("leaky_relu", x, out, alpha)


def leaky_relu_backward(x, dy, alpha=0.01, *, out=None):
    """dy where the forward input x > 0, else alpha * dy."""
    alpha = check.scalar("alpha", alpha)
    return _elementwise_backward("leaky_relu_backward", "x", x, dy, out, alpha)


def sigmoid(x, *, out=None):
    """1 / (1 + exp(-x)), exact at saturation and without overflow."""
    return _elementwise("sigmoid", x, out)


def sigmoid_backward(y, dy, *, out=None):
    """dy * y * (1 - y), from the forward output y."""
    return _elementwise_backward("sigmoid_backward", "y", y, dy, out)


def tanh(x, *, out=None):
    """Hyperbolic tangent, elementwise."""
    return _elementwise("tanh", x, out)


def tanh_backward(y, dy, *, out=None):
    """dy * (1 - y**2), from the forward output y."""
    return _elementwise_backward("tanh_backward", "y", y, dy, out)


def _rows(kernel, arrays, out):
    (first, x), *_ = arrays.items()
    for name, a in arrays.items():
        check.float_array(name, a, ndim=2)
        check.shape(name, a, x.shape, f"the shape of {first}")
    check.same_dtype(**arrays)
    backend = select(**arrays, out=out)
    out = check.out(out, x.shape, x.dtype, backend, like=x, reads=arrays)
    getattr(backend, kernel)(*(backend.ascontiguous(a) for a in arrays.values()), out)
    return out


def softmax(x, *, out=None):
    """Softmax over each row of a 2-D array (max-subtracted, so huge logits are fine)."""
    return _rows("softmax", {"x": x}, out)


def softmax_backward(y, dy, *, out=None):
    """y * (dy - sum(dy * y) per row), from the forward output y."""
    return _rows("softmax_backward", {"y": y, "dy": dy}, out)


# ---- matmul ----------------------------------------------------------------------------------------

def matmul(a, b, *, trans_a=False, trans_b=False, bias=None, activation=None, alpha=0.01, out=None):
    """``activation(op(a) @ op(b) + bias)`` where op transposes when ``trans_a``/``trans_b`` is set.

    a is (M, K), or (K, M) with trans_a; b is (K, N), or (N, K) with trans_b; bias is (N,); the
    result is (M, N). ``activation`` is None or one of relu, leaky_relu (slope ``alpha``), sigmoid,
    tanh, applied in the same pass as the bias. The transposed forms read the arrays as they are
    (any strides): ``matmul(x, dy, trans_a=True)`` is dW and ``matmul(dy, w, trans_b=True)`` is dx.
    """
    check.float_array("a", a, ndim=2)
    check.float_array("b", b, ndim=2)
    trans_a, trans_b = check.flag("trans_a", trans_a), check.flag("trans_b", trans_b)
    if bias is not None:
        check.float_array("bias", bias, ndim=1)
    dtype = check.same_dtype(a=a, b=b, bias=bias)
    m, k = a.shape[::-1] if trans_a else a.shape
    k_b, n = b.shape[::-1] if trans_b else b.shape
    if k != k_b:
        raise ValueError(
            f"a and b do not compose: op(a) is ({m}, {k}) and op(b) is ({k_b}, {n}) "
            f"(a.shape={tuple(a.shape)}, trans_a={trans_a}; b.shape={tuple(b.shape)}, trans_b={trans_b})"
        )
    if bias is not None:
        check.shape("bias", bias, (n,), "one value per output column")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    alpha = check.scalar("alpha", alpha)
    backend = select(a=a, b=b, bias=bias, out=out)
    out = check.out(out, (m, n), dtype, backend, like=a, reads=dict(a=a, b=b, bias=bias))
    backend.matmul(a, b, trans_a, trans_b, bias, activation, alpha, out)
    return out


# ---- losses ----------------------------------------------------------------------------------------

def _nonempty(name, x):
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); a mean loss needs at least one element")


def softmax_cross_entropy(logits, labels, *, out=None):
    """Mean cross-entropy of softmax(logits) against integer class ids, and its gradient.

    Returns ``(loss, dlogits)`` with ``dlogits = (softmax(logits) - onehot(labels)) / N``; fused: the
    probabilities are never stored apart from ``dlogits``. Stable for any finite logits.
    """
    check.float_array("logits", logits, ndim=2)
    _nonempty("logits", logits)
    n, classes = logits.shape
    check.labels("labels", labels, n, classes)
    backend = select(logits=logits, labels=labels, out=out)
    out = check.out(out, logits.shape, logits.dtype, backend, like=logits, reads=dict(logits=logits, labels=labels))
    loss = backend.softmax_cross_entropy(backend.ascontiguous(logits), backend.ascontiguous(labels), out)
    return loss, out


def _pointwise_loss(kernel, pred_name, pred, target, out, check_target=None):
    check.float_array(pred_name, pred)
    check.float_array("target", target)
    check.same_dtype(**{pred_name: pred}, target=target)
    check.shape("target", target, pred.shape, f"the shape of {pred_name}")
    _nonempty(pred_name, pred)
    if check_target is not None:
        check_target("target", target)
    backend = select(**{pred_name: pred}, target=target, out=out)
    out = check.out(out, pred.shape, pred.dtype, backend, like=pred, reads={pred_name: pred, "target": target},
                    same_ok=True)
    loss = getattr(backend, kernel)(_flat(backend, pred), _flat(backend, target), out.reshape(-1))
    return loss, out


def mse(pred, target, *, out=None):
    """Mean squared error over all elements; returns ``(loss, dpred)``."""
    return _pointwise_loss("mse", "pred", pred, target, out)


def binary_cross_entropy(logits, target, *, out=None):
    """Binary cross-entropy on logits (stable log-sum-exp form), mean over all elements; ``(loss, dlogits)``."""
    return _pointwise_loss("binary_cross_entropy", "logits", logits, target, out)


def hinge(scores, target, *, out=None):
    """Mean hinge loss max(0, 1 - target * scores), target in {-1, +1}; returns ``(loss, dscores)``."""
    return _pointwise_loss("hinge", "scores", scores, target, out, check.sign_targets)


def bias_grad(dy, *, out=None):
    """Column sums of a 2-D ``dy``: the gradient of a bias added to every row."""
    check.float_array("dy", dy, ndim=2)
    backend = select(dy=dy, out=out)
    out = check.out(out, (dy.shape[1],), dy.dtype, backend, like=dy, reads=dict(dy=dy))
    backend.bias_grad(backend.ascontiguous(dy), out)
    return out


def dropout(x, p, seed, *, out=None):
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p).

    The mask depends only on (seed, element index), so it is the same on every backend and thread
    count, and the backward pass is this same call on ``dy`` with the same ``p`` and ``seed``.
    """
    p = check.scalar("p", p, low=0.0, high=1.0, high_open=True)
    return _elementwise("dropout", x, out, p, check.seed(seed))


# ---- optimizers ------------------------------------------------------------------------------------

def _optimizer_buffers(param, grad, **state):
    """Validate param, grad and the state buffers; returns (backend, flat views in the same order)."""
    check.float_array("param", param)
    check.inplace("param", param)
    check.float_array("grad", grad)
    check.shape("grad", grad, param.shape, "the shape of param")
    for name, buf in state.items():
        if buf is not None:
            check.float_array(name, buf)
            check.shape(name, buf, param.shape, "the shape of param")
            check.inplace(name, buf)
    check.same_dtype(param=param, grad=grad, **state)
    check.disjoint(param=param, grad=grad, **state)
    backend = select(param=param, grad=grad, **state)
    flat = [None if a is None else _flat(backend, a) for a in (param, grad, *state.values())]
    return backend, flat


def _lr(lr):
    return check.scalar("lr", lr, low=0.0)


def _decay(weight_decay):
    return check.scalar("weight_decay", weight_decay, low=0.0)


def sgd_step(param, grad, *, lr, momentum=0.0, velocity=None, dampening=0.0, nesterov=False,
             weight_decay=0.0, step=None):
    """SGD with momentum, dampening, Nesterov and L2 weight decay, in place (torch.optim.SGD).

    With momentum, ``velocity`` is required; pass ``step=1`` on the first step so the buffer starts at
    the gradient as torch does (other values, or None, accumulate into the existing buffer).
    """
    lr, weight_decay = _lr(lr), _decay(weight_decay)
    momentum = check.scalar("momentum", momentum, low=0.0)
    dampening = check.scalar("dampening", dampening, low=0.0, high=1.0)
    nesterov = check.flag("nesterov", nesterov)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening == 0")
    if momentum != 0 and velocity is None:
        raise ValueError("velocity must be given (a buffer shaped like param) when momentum != 0")
    step = 0 if step is None else check.step(step)
    backend, (p, g, vel) = _optimizer_buffers(param, grad, velocity=velocity if momentum else None)
    backend.sgd_step(p, g, lr, momentum, vel, dampening, nesterov, weight_decay, step)


def adam_step(param, grad, m, v, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              decoupled=False):
    """Adam (``decoupled=True``: AdamW), in place on param, m and v (torch.optim.Adam / AdamW)."""
    step, lr, weight_decay = check.step(step), _lr(lr), _decay(weight_decay)
    beta1 = check.scalar("beta1", beta1, low=0.0, high=1.0, high_open=True)
    beta2 = check.scalar("beta2", beta2, low=0.0, high=1.0, high_open=True)
    eps = check.scalar("eps", eps, low=0.0)
    decoupled = check.flag("decoupled", decoupled)
    backend, (p, g, m_, v_) = _optimizer_buffers(param, grad, m=m, v=v)
    backend.adam_step(p, g, m_, v_, step, lr, beta1, beta2, eps, weight_decay, decoupled)


def rmsprop_step(param, grad, square_avg, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 momentum_buffer=None):
    """RMSProp with optional momentum, in place (torch.optim.RMSprop, centered=False)."""
    lr, weight_decay = _lr(lr), _decay(weight_decay)
    alpha = check.scalar("alpha", alpha, low=0.0, high=1.0)
    eps = check.scalar("eps", eps, low=0.0)
    momentum = check.scalar("momentum", momentum, low=0.0)
    if momentum > 0 and momentum_buffer is None:
        raise ValueError("momentum_buffer must be given (a buffer shaped like param) when momentum > 0")
    backend, (p, g, sq, buf) = _optimizer_buffers(
        param, grad, square_avg=square_avg, momentum_buffer=momentum_buffer if momentum > 0 else None)
    backend.rmsprop_step(p, g, sq, lr, alpha, eps, weight_decay, momentum, buf)


def adagrad_step(param, grad, sum_sq, *, lr=1e-2, eps=1e-10, weight_decay=0.0):
    """Adagrad, in place on param and sum_sq (torch.optim.Adagrad, lr_decay=0)."""
    lr, weight_decay = _lr(lr), _decay(weight_decay)
    eps = check.scalar("eps", eps, low=0.0)
    backend, (p, g, s) = _optimizer_buffers(param, grad, sum_sq=sum_sq)
    backend.adagrad_step(p, g, s, lr, eps, weight_decay)


def adadelta_step(param, grad, square_avg, acc_delta, *, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0):
    """Adadelta, in place on param, square_avg and acc_delta (torch.optim.Adadelta)."""
    lr, weight_decay = _lr(lr), _decay(weight_decay)
    rho = check.scalar("rho", rho, low=0.0, high=1.0)
    eps = check.scalar("eps", eps, low=0.0)
    backend, (p, g, sq, acc) = _optimizer_buffers(param, grad, square_avg=square_avg, acc_delta=acc_delta)
    backend.adadelta_step(p, g, sq, acc, lr, rho, eps, weight_decay)
