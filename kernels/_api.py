"""The public kernel API: validate, pick the backend, allocate outputs, call the backend's kernel.

Each function validates every argument before any memory is touched, then hands the backend flat
C-contiguous views for elementwise kernels and optimizer steps (a non-contiguous *input* is copied once;
buffers written in place must already be C-contiguous), and an output buffer that is either the user's
``out=`` or freshly allocated on the input's device.
"""

import math
import numbers

import numpy as np

from . import _checks as check
from ._dispatch import is_device_array, select
from .reference import metrics as _metrics

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


def _output_slope(alpha):
    """leaky_relu's ``alpha`` where its gradient is read from the forward output: ``y > 0`` exactly where
    ``x > 0`` only for ``alpha >= 0``, so a negative slope is refused."""
    return check.scalar("alpha", alpha, low=0.0)


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
    result is (M, N). ``activation`` is None or one of relu, leaky_relu (slope ``alpha`` >= 0, as
    :func:`bias_act_backward` needs), sigmoid, tanh, applied in the same pass as the bias. The transposed
    forms read the arrays as they are (any strides): ``matmul(x, dy, trans_a=True)`` is dW and
    ``matmul(dy, w, trans_b=True)`` is dx.
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
    alpha = _output_slope(alpha)
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
    """Mean hinge loss max(0, 1 - target * scores), target in {-1, +1}; returns ``(loss, dscores)``. Host
    targets are checked; device ones are not (a hidden copy): any other value makes its loss term and
    gradient NaN, as an out-of-range device label does in :func:`softmax_cross_entropy`."""
    return _pointwise_loss("hinge", "scores", scores, target, out, check.sign_targets)


def bias_grad(dy, *, out=None):
    """Column sums of a 2-D ``dy``: the gradient of a bias added to every row."""
    check.float_array("dy", dy, ndim=2)
    backend = select(dy=dy, out=out)
    out = check.out(out, (dy.shape[1],), dy.dtype, backend, like=dy, reads=dict(dy=dy))
    backend.bias_grad(backend.ascontiguous(dy), out)
    return out


def dropout(x, p, seed, *, offset=0, out=None):
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p).

    The mask depends only on (seed, offset + element index), so it is the same on every backend and
    thread count, and the backward pass is this same call on ``dy`` with the same ``p``, ``seed`` and
    ``offset``. ``offset`` (an integer in [0, 2**64)) makes ``x`` draw the mask of elements
    ``offset..offset + x.size - 1`` of a larger array: rows ``r..`` of a batch with ``f`` features take
    ``offset=r * f`` and get the same mask as in the whole batch (data-parallel ranks do this).
    """
    p = check.scalar("p", p, low=0.0, high=1.0, high_open=True)
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"offset must be an integer, got {type(offset).__name__}")
    if not 0 <= offset < 2**64:
        raise ValueError(f"offset must be in [0, 2**64), got {offset}")
    return _elementwise("dropout", x, out, p, check.seed(seed), int(offset))


# ---- optimizers ------------------------------------------------------------------------------------

def _optimizer_buffers(param, grad, scale=None, **state):
    """Validate param, grad, the gradient ``scale`` and the state buffers; returns (backend, flat views of
    param, grad and the state buffers in that order, scale as given)."""
    check.float_array("param", param)
    check.inplace("param", param)
    check.float_array("grad", grad)
    check.shape("grad", grad, param.shape, "the shape of param")
    for name, buf in state.items():
        if buf is not None:
            check.float_array(name, buf)
            check.shape(name, buf, param.shape, "the shape of param")
            check.inplace(name, buf)
    if scale is not None:
        check.float_array("scale", scale)
        check.shape("scale", scale, (1,), "one gradient scale")
    check.same_dtype(param=param, grad=grad, scale=scale, **state)
    check.disjoint(param=param, grad=grad, scale=scale, **state)
    backend = select(param=param, grad=grad, scale=scale, **state)
    flat = [None if a is None else _flat(backend, a) for a in (param, grad, *state.values())]
    return backend, flat, scale


def _lr(lr):
    return check.scalar("lr", lr, low=0.0)


def _decay(weight_decay):
    return check.scalar("weight_decay", weight_decay, low=0.0)


def sgd_step(param, grad, *, lr, momentum=0.0, velocity=None, dampening=0.0, nesterov=False,
             weight_decay=0.0, step=None, scale=None):
    """SGD with momentum, dampening, Nesterov and L2 weight decay, in place (torch.optim.SGD).

    With momentum, ``velocity`` is required; pass ``step=1`` on the first step so the buffer starts at
    the gradient as torch does (other values, or None, accumulate into the existing buffer).

    ``scale`` (every optimizer step takes it): None, or a 1-element array of param's dtype on its device,
    read by the kernel: the update uses ``grad * scale[0]`` (gradient clipping without a pass of its
    own), and ``scale[0] == 0`` skips the update, param and state untouched (a non-finite step).
    :func:`check_step` writes it on the device, so a training step clips or skips without a host read.
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
    backend, (p, g, vel), scale = _optimizer_buffers(param, grad, scale, velocity=velocity if momentum else None)
    backend.sgd_step(p, g, lr, momentum, vel, dampening, nesterov, weight_decay, step, scale)


def adam_step(param, grad, m, v, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              decoupled=False, scale=None):
    """Adam (``decoupled=True``: AdamW), in place on param, m and v (torch.optim.Adam / AdamW); ``scale``:
    as for :func:`sgd_step`."""
    step, lr, weight_decay = check.step(step), _lr(lr), _decay(weight_decay)
    beta1 = check.scalar("beta1", beta1, low=0.0, high=1.0, high_open=True)
    beta2 = check.scalar("beta2", beta2, low=0.0, high=1.0, high_open=True)
    eps = check.scalar("eps", eps, low=0.0)
    decoupled = check.flag("decoupled", decoupled)
    backend, (p, g, m_, v_), scale = _optimizer_buffers(param, grad, scale, m=m, v=v)
    backend.adam_step(p, g, m_, v_, step, lr, beta1, beta2, eps, weight_decay, decoupled, scale)


def rmsprop_step(param, grad, square_avg, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 momentum_buffer=None, scale=None):
    """RMSProp with optional momentum, in place (torch.optim.RMSprop, centered=False); ``scale``: as for
    :func:`sgd_step`."""
    lr, weight_decay = _lr(lr), _decay(weight_decay)
    alpha = check.scalar("alpha", alpha, low=0.0, high=1.0)
    eps = check.scalar("eps", eps, low=0.0)
    momentum = check.scalar("momentum", momentum, low=0.0)
    if momentum > 0 and momentum_buffer is None:
        raise ValueError("momentum_buffer must be given (a buffer shaped like param) when momentum > 0")
    backend, (p, g, sq, buf), scale = _optimizer_buffers(
        param, grad, scale, square_avg=square_avg, momentum_buffer=momentum_buffer if momentum > 0 else None)
    backend.rmsprop_step(p, g, sq, lr, alpha, eps, weight_decay, momentum, buf, scale)


def adagrad_step(param, grad, sum_sq, *, lr=1e-2, eps=1e-10, weight_decay=0.0, scale=None):
    """Adagrad, in place on param and sum_sq (torch.optim.Adagrad, lr_decay=0); ``scale``: as for
    :func:`sgd_step`."""
    lr, weight_decay = _lr(lr), _decay(weight_decay)
    eps = check.scalar("eps", eps, low=0.0)
    backend, (p, g, s), scale = _optimizer_buffers(param, grad, scale, sum_sq=sum_sq)
    backend.adagrad_step(p, g, s, lr, eps, weight_decay, scale)


def adadelta_step(param, grad, square_avg, acc_delta, *, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, scale=None):
    """Adadelta, in place on param, square_avg and acc_delta (torch.optim.Adadelta); ``scale``: as for
    :func:`sgd_step`."""
    lr, weight_decay = _lr(lr), _decay(weight_decay)
    rho = check.scalar("rho", rho, low=0.0, high=1.0)
    eps = check.scalar("eps", eps, low=0.0)
    backend, (p, g, sq, acc), scale = _optimizer_buffers(param, grad, scale, square_avg=square_avg,
                                                         acc_delta=acc_delta)
    backend.adadelta_step(p, g, sq, acc, lr, rho, eps, weight_decay, scale)


# ---- fused training-step kernels -------------------------------------------------------------------

def bias_act_backward(y, dy, activation, *, alpha=0.01, out=None, bias_out=None):
    """A Dense layer's backward pass around its matmul, in one pass over ``dy``: returns
    ``(dz, db)`` with ``dz = dy * activation'`` (read from the forward output ``y``) and ``db`` the
    column sums of ``dz`` (the bias gradient). Same results as ``<activation>_backward`` then
    ``bias_grad``; ``activation`` is one of relu, leaky_relu (slope ``alpha`` >= 0), sigmoid, tanh."""
    check.float_array("y", y, ndim=2)
    check.float_array("dy", dy, ndim=2)
    check.same_dtype(y=y, dy=dy)
    check.shape("dy", dy, y.shape, "the shape of y")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    alpha = _output_slope(alpha)
    backend = select(y=y, dy=dy, out=out, bias_out=bias_out)
    out = check.out(out, y.shape, y.dtype, backend, like=y, reads=dict(y=y, dy=dy))
    bias_out = check.out(bias_out, (y.shape[1],), y.dtype, backend, like=y, reads=dict(y=y, dy=dy),
                         name="bias_out")
    check.no_overlap("bias_out", bias_out, out=out)
    backend.bias_act_backward(backend.ascontiguous(y), backend.ascontiguous(dy), activation, alpha, out, bias_out)
    return out, bias_out


def dense_grad_norm(x, dy, bias_grad=None, *, out=None):
    """The L2 norm of a Dense layer's parameter gradient (``dW = x^T dy``, and ``bias_grad`` when given)
    from its factors, without forming dW (a float64 array of one value): ``||x^T dy||^2 = sum over row pairs
    (r, s) of (x_r . x_s)(dy_r . dy_s)``, in float64. It is the norm of the exact product (within the
    rounding of dW in x's dtype), at O(B^2 (K + N)) for ``x`` (B, K) and ``dy`` (B, N) where the norm of a
    formed dW costs O(B K N): for small batches. Where an element of x or dy is not finite, or the product
    may overflow x's dtype, it is the norm of dW as that dtype computes it (inf or NaN where that dW has
    them)."""
    import numpy as np

    check.float_array("x", x, ndim=2)
    check.float_array("dy", dy, ndim=2)
    check.same_dtype(x=x, dy=dy, bias_grad=bias_grad)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy must have as many rows as x ({x.shape[0]}), got shape {tuple(dy.shape)}")
    if bias_grad is not None:
        check.float_array("bias_grad", bias_grad, ndim=1)
        check.shape("bias_grad", bias_grad, (dy.shape[1],), "one value per column of dy")
    backend = select(x=x, dy=dy, bias_grad=bias_grad, out=out)
    # no bias: an empty array (no memory; slicing an empty Numba device array fails on a GPU)
    db = bias_grad if bias_grad is not None else backend.empty((0,), dy.dtype, dy)
    out = check.out(out, (1,), np.float64, backend, like=x, reads=dict(x=x, dy=dy, bias_grad=db))
    backend.dense_grad_norm(backend.ascontiguous(x), backend.ascontiguous(dy), backend.ascontiguous(db), out)
    return out


def segment_norms(x, offsets, *, out=None):
    """The L2 norm of each segment ``x[offsets[i]:offsets[i + 1]]`` of a flat array, all in one pass,
    accumulated in float64 (a float64 array of ``len(offsets) - 1`` values): the per-layer gradient
    norms of a model's flat gradient buffer. ``offsets`` are non-decreasing integers from 0 to at most
    ``x.size`` (a host array, or for device ``x`` a device array, whose values are not checked)."""
    import numpy as np

    check.float_array("x", x, ndim=1)
    if not hasattr(offsets, "dtype") or offsets.dtype.kind not in "iu":
        raise TypeError(f"offsets must be an integer array, got {getattr(offsets, 'dtype', type(offsets).__name__)}")
    if len(offsets.shape) != 1:
        raise ValueError(f"offsets must be 1-D, got shape {tuple(offsets.shape)}")
    if offsets.shape[0] < 1:
        raise ValueError("offsets must hold at least one boundary (0)")
    backend = select(x=x, offsets=offsets, out=out)
    if isinstance(offsets, np.ndarray):
        if offsets[0] < 0 or offsets[-1] > x.shape[0] or np.any(offsets[1:] < offsets[:-1]):
            raise ValueError(f"offsets must be non-decreasing within [0, {x.shape[0]}], got {offsets.tolist()}")
        offsets = offsets.astype(np.int64)
    out = check.out(out, (offsets.shape[0] - 1,), np.float64, backend, like=x, reads=dict(x=x, offsets=offsets))
    backend.segment_norms(backend.ascontiguous(x), offsets, out)
    return out


# ---- training-step bookkeeping on the device ---------------------------------------------------------

def metrics_size(layers):
    """The length of the float64 ``metrics`` buffer that :func:`check_step` and :func:`count_correct`
    write for a model with ``layers`` parameter layers (allocate it zeroed where the model lives)."""
    if isinstance(layers, bool) or not isinstance(layers, numbers.Integral) or layers < 0:
        raise ValueError(f"layers must be a non-negative integer, got {layers!r}")
    return _metrics.size(int(layers))


def unpack_metrics(values, layers):
    """The fields of a host copy of a ``metrics`` buffer, as a dict: ``loss_sum`` (loss * rows over the
    applied steps), ``correct``, ``steps`` (checked), ``bad_step`` (the first step, from 1, with a
    non-finite loss or norm; 0: none), ``bad_loss``, ``norm_sums`` and ``bad_norms`` (per layer)."""
    m, values = _metrics, np.asarray(values)
    check.shape("values", values, (metrics_size(layers),), f"the metrics of {layers} layers")
    return {"loss_sum": float(values[m.LOSS]), "correct": int(values[m.CORRECT]), "steps": int(values[m.STEPS]),
            "bad_step": int(values[m.BAD_STEP]), "bad_loss": float(values[m.BAD_LOSS]),
            "norm_sums": values[m.NORMS:m.NORMS + layers].copy(), "bad_norms": values[m.NORMS + layers:].copy()}


def count_correct(output, target, metrics, *, threshold=0.0):
    """Add the number of rows of ``output`` (N, C) that predict ``target`` to the correct count of a
    ``metrics`` buffer (see :func:`check_step`), in place on the device (no host read): integer class
    labels (N,) are matched by the row's argmax (first maximum, NaN as the maximum, like ``np.argmax``);
    float targets (N, C) need every output on the same side of 0 as its target is of ``threshold``."""
    check.float_array("output", output, ndim=2)
    n = output.shape[0]
    if not hasattr(target, "dtype") or not hasattr(target, "shape"):
        raise TypeError(f"target must be an array, got {type(target).__name__}")
    if np.dtype(target.dtype).kind in "iu":
        check.shape("target", target, (n,), "one class id per row of output")
    else:
        check.float_array("target", target, ndim=2)
        check.shape("target", target, output.shape, "the shape of output")
    threshold = check.scalar("threshold", threshold)
    _accumulator("metrics", metrics)
    backend = select(output=output, target=target, metrics=metrics)
    backend.count_correct(backend.ascontiguous(output), backend.ascontiguous(target), threshold, metrics)


def _accumulator(name, a, layers=None):
    """A float64 metrics buffer the bookkeeping kernels update in place: of ``metrics_size(layers)``
    elements, or of any such size when ``layers`` is None."""
    if not hasattr(a, "dtype") or np.dtype(a.dtype) != np.float64:
        raise TypeError(f"{name} must be a float64 array, got {getattr(a, 'dtype', type(a).__name__)}")
    if layers is not None:
        check.shape(name, a, (metrics_size(layers),), f"the metrics of {layers} layers")
    elif len(a.shape) != 1 or a.shape[0] < metrics_size(0) or (a.shape[0] - metrics_size(0)) % 2:
        raise ValueError(f"{name} must be a metrics buffer (1-D, metrics_size(layers) elements), got shape "
                         f"{tuple(a.shape)}")
    check.inplace(name, a)


def check_step(loss, norms, metrics, scale, *, rows, max_norm=None):
    """One training step's bookkeeping, on the device: records the step in ``metrics`` (see
    ``kernels/reference/metrics.py`` for the layout; :func:`unpack_metrics` reads a host copy) and
    writes the optimizer's gradient ``scale`` (the ``scale=`` of every optimizer step).

    A step with a finite ``loss`` (the mean over ``rows`` rows) and finite per-layer gradient ``norms``
    (1-D float64, e.g. from :func:`segment_norms`), and no non-finite step before it since ``metrics`` was
    zeroed, adds ``loss * rows`` and its norms to the sums and gets the scale that clips the global norm
    to ``max_norm`` (``max_norm / (norm + 1e-6)`` above it, else 1; None: no clipping). Any other step
    gets scale 0 (the optimizer skips it) and the first one is recorded with its loss and norms, so a
    host read at any later time can say which step failed and why. ``loss``: the loss kernels' result
    (a host scalar, or the 0-d device array the cuda backend returns)."""
    check.float_array("norms", norms, ndim=1)
    if np.dtype(norms.dtype) != np.float64:
        raise TypeError(f"norms must have dtype float64, got {norms.dtype}")
    _accumulator("metrics", metrics, norms.shape[0])
    check.float_array("scale", scale)
    check.shape("scale", scale, (1,), "one gradient scale")
    check.inplace("scale", scale)
    if isinstance(rows, bool) or not isinstance(rows, numbers.Integral) or rows < 1:
        raise ValueError(f"rows must be a positive integer, got {rows!r}")
    max_norm = math.inf if max_norm is None else check.scalar("max_norm", max_norm, low=0.0, low_open=True)
    on_device = is_device_array(loss)
    if hasattr(loss, "shape"):
        check.float_array("loss", loss)
        if math.prod(loss.shape) != 1:
            raise ValueError(f"loss must be a scalar or a 1-element array, got shape {tuple(loss.shape)}")
        loss = loss if on_device else np.asarray(loss).reshape(())[()]
    elif isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise TypeError(f"loss must be a real number or a 1-element array, got {type(loss).__name__}")
    check.no_overlap("metrics", metrics, norms=norms, scale=scale, loss=loss if on_device else None)
    check.no_overlap("scale", scale, norms=norms, loss=loss if on_device else None)
    backend = select(loss=loss if on_device else None, norms=norms, metrics=metrics, scale=scale)
    if backend.name == "cuda" and not on_device:
        raise TypeError("loss must be a device array (as the cuda loss kernels return it) when norms, metrics "
                        f"and scale are, got {type(loss).__name__}")
    backend.check_step(loss, int(rows), norms, max_norm, metrics, scale)


# ---- batch normalisation ---------------------------------------------------------------------------

def _batchnorm_columns(x, x_name="x", **columns):
    """Validate a 2-D float ``x`` and per-column vectors of its dtype; returns the backend."""
    check.float_array(x_name, x, ndim=2)
    for name, a in columns.items():
        check.float_array(name, a, ndim=1)
        check.shape(name, a, (x.shape[1],), f"one value per column of {x_name}")
    check.same_dtype(**{x_name: x}, **columns)
    return select(**{x_name: x}, **columns)


def _batchnorm_parts(backend, name, parts, x, x_name):
    """``parts`` (a (3, C) or (P, 3, C) float64 statistics array for ``x``'s C columns) as (P, 3, C)."""
    check.float_array(name, parts)
    if parts.dtype != np.float64:
        raise TypeError(f"{name} must have dtype float64 (from batchnorm_stats / batchnorm_backward_sums), "
                        f"got {parts.dtype}")
    shape = tuple(parts.shape)
    if len(shape) not in (2, 3) or shape[-2:] != (3, x.shape[1]) or (len(shape) == 3 and shape[0] < 1):
        raise ValueError(f"{name} must have shape (3, {x.shape[1]}) or (parts, 3, {x.shape[1]}) (three rows per "
                         f"column of {x_name}, for each part of the batch), got {shape}")
    select(**{x_name: x}, **{name: parts})
    return backend.ascontiguous(parts).reshape(shape if len(shape) == 3 else (1, *shape))


def _training_rows(x, stats, parts):
    """Refuse a training batch of fewer than 2 rows (torch.nn.BatchNorm1d does too: its variance needs two
    values per column): ``x``'s rows, or with ``stats`` the counts they hold (host arrays only: device
    ones are not read, which would cost a synchronisation, and with no columns there are no counts)."""
    if stats is None and x.shape[0] < 2:
        raise ValueError(f"x must have at least 2 rows in training (a batch's variance needs 2 values per "
                         f"column; batchnorm_eval takes any number), got shape {tuple(x.shape)}")
    if stats is not None and isinstance(parts, np.ndarray) and parts.shape[2]:
        rows = parts[:, 0, :].sum(axis=0).min()
        if rows < 2:
            raise ValueError(f"stats must count at least 2 rows in training (a batch's variance needs 2 values "
                             f"per column), got {rows:g} rows")


def batchnorm_stats(x):
    """Batch normalisation's statistics of ``x``'s rows: a float64 ``(3, C)`` array, rows ``count``,
    ``mean`` and ``m2`` (the sum of squared deviations from the mean) per column. Several parts' arrays,
    stacked ``(P, 3, C)`` (e.g. every rank's rows of one batch), give ``batchnorm_forward`` the statistics
    of the whole batch, merged without cancellation."""
    backend = _batchnorm_columns(x)
    stats = backend.empty((3, x.shape[1]), np.float64, x)
    backend.batchnorm_stats(backend.ascontiguous(x), stats)
    return stats


def batchnorm_forward(x, gamma, beta, running_mean, running_var, *, momentum=0.1, eps=1e-5, stats=None):
    """Batch normalisation in training (torch.nn.BatchNorm1d): returns ``(y, xhat, inv_std)`` with
    ``y = gamma * xhat + beta``, ``xhat = (x - mean) * inv_std`` from the batch's mean and biased
    variance, and updates ``running_mean``/``running_var`` in place (unbiased variance, ``momentum``).
    ``stats``: the batch's statistics (:func:`batchnorm_stats` of each part, stacked), when ``x`` is
    only a part of it (which may have no rows); default: ``x``'s own. The batch needs at least 2 rows
    (``ValueError`` otherwise, as torch; the counts of device ``stats`` are not read)."""
    momentum = check.scalar("momentum", momentum, low=0.0, high=1.0)
    eps = check.scalar("eps", eps, low=0.0, low_open=True)
    backend = _batchnorm_columns(x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    check.inplace("running_mean", running_mean)
    check.inplace("running_var", running_var)
    check.no_overlap("running_mean", running_mean, x=x, gamma=gamma, beta=beta, running_var=running_var, stats=stats)
    check.no_overlap("running_var", running_var, x=x, gamma=gamma, beta=beta, stats=stats)
    parts = None if stats is None else _batchnorm_parts(backend, "stats", stats, x, "x")
    _training_rows(x, stats, parts)
    if stats is None:
        parts = _batchnorm_parts(backend, "stats", batchnorm_stats(x), x, "x")
    y, xhat = backend.empty(x.shape, x.dtype, x), backend.empty(x.shape, x.dtype, x)
    inv_std = backend.empty((x.shape[1],), x.dtype, x)
    backend.batchnorm_forward(backend.ascontiguous(x), backend.ascontiguous(gamma), backend.ascontiguous(beta),
                              running_mean, running_var, parts, momentum, eps, y, xhat, inv_std)
    return y, xhat, inv_std


def batchnorm_eval(x, gamma, beta, running_mean, running_var, *, eps=1e-5):
    """Batch normalisation in evaluation: ``gamma * (x - running_mean) / sqrt(running_var + eps) + beta``,
    for any number of rows."""
    eps = check.scalar("eps", eps, low=0.0, low_open=True)
    backend = _batchnorm_columns(x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    y = backend.empty(x.shape, x.dtype, x)
    backend.batchnorm_eval(*(backend.ascontiguous(a) for a in (x, gamma, beta, running_mean, running_var)), eps, y)
    return y


def _backward_inputs(dy, xhat, **columns):
    """Validate the backward pass's ``dy``, ``xhat`` and per-column vectors; returns the backend."""
    _batchnorm_columns(dy, "dy", **columns)
    check.float_array("xhat", xhat, ndim=2)
    check.shape("xhat", xhat, dy.shape, "the shape of dy")
    check.same_dtype(dy=dy, xhat=xhat)
    return select(dy=dy, xhat=xhat, **columns)


def _local_sums(backend, dy, xhat):
    """The backward sums of ``dy``'s rows (float64, (3, C)), and the same in dy's dtype as dgamma, dbeta."""
    sums = backend.empty((3, dy.shape[1]), np.float64, dy)
    dgamma, dbeta = (backend.empty((dy.shape[1],), dy.dtype, dy) for _ in range(2))
    backend.batchnorm_backward_sums(backend.ascontiguous(dy), backend.ascontiguous(xhat), sums, dgamma, dbeta)
    return sums, dgamma, dbeta


def batchnorm_backward_sums(dy, xhat):
    """The column sums batch normalisation's backward pass needs from ``dy``'s rows: a float64 ``(3, C)``
    array, rows ``count``, ``sum(dy)`` (beta's gradient) and ``sum(dy * xhat)`` (gamma's). Stacked for
    every part of a batch, they are ``batchnorm_backward``'s ``sums``."""
    return _local_sums(_backward_inputs(dy, xhat), dy, xhat)[0]


def batchnorm_backward(dy, xhat, gamma, inv_std, *, sums=None):
    """Gradients of batch normalisation in training from the forward pass's ``xhat`` and ``inv_std``:
    returns ``(dx, dgamma, dbeta)``, the gradients from ``dy``'s rows. ``sums``: the whole batch's
    (:func:`batchnorm_backward_sums` of each part, stacked), when ``dy`` is only a part of it; default:
    ``dy``'s own (no rows: an empty ``dx``, zero ``dgamma`` and ``dbeta``)."""
    backend = _backward_inputs(dy, xhat, gamma=gamma, inv_std=inv_std)
    local, dgamma, dbeta = _local_sums(backend, dy, xhat)
    parts = _batchnorm_parts(backend, "sums", local if sums is None else sums, dy, "dy")
    dx = backend.empty(dy.shape, dy.dtype, dy)
    backend.batchnorm_backward(backend.ascontiguous(dy), backend.ascontiguous(xhat), backend.ascontiguous(gamma),
                               backend.ascontiguous(inv_std), parts, dx)
    return dx, dgamma, dbeta
