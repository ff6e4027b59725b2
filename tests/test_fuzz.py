"""Fuzzing the whole public API (``kernels`` and ``nn``) with hypothesis.

Every public kernel (all of ``kernels._api`` but the host-side ``metrics_size`` and ``unpack_metrics``)
gets random shapes (0 and 1 included; the batch-norm training kernels at least 2 rows), dtypes
(float16/32/64, integers, bool), layouts (C, Fortran, strided, negative and zero strides, read-only), flags
of any type, and ``out=`` buffers that are fresh, wrong in shape or dtype, read-only, non-contiguous or
aliasing an input exactly or partly. Each call, on the numba backend and on the reference, must either
raise TypeError/ValueError whose message starts with the name of one of the function's parameters (the
same error on both backends, with no buffer touched), or return (and write in place) what the reference
does on fresh, unaliased copies of the inputs, leaving its other inputs as they were. A crash or hang
fails the run; the example count is bounded for CI.
"""

import inspect
import os
import re

import numpy as np
import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

import kernels
import nn

FLOATS = [np.float32, np.float64]
OTHER_DTYPES = [np.float16, np.int32, np.int64, np.bool_]
LAYOUTS = ["C", "C", "C", "F", "strided", "negative", "zero", "readonly"]
SIDES = st.sampled_from([0, 1, 2, 3, 5, 8])
FLAGS = st.sampled_from([False, True] * 6 + [np.True_, np.False_, "no", 1, 0, None])


def _lay(x, layout):
    """``x``'s values (for ``zero``: its first row repeated) in the given layout."""
    if layout == "F":
        return np.asfortranarray(x)
    if layout == "strided":
        big = np.zeros(tuple(2 * s + 1 for s in x.shape), x.dtype)
        view = big[tuple(slice(1, None, 2) for _ in x.shape)]
        view[...] = x
        return view
    if layout == "negative":
        flip = tuple(slice(None, None, -1) for _ in x.shape)
        return np.ascontiguousarray(x[flip])[flip]
    if layout == "zero" and x.ndim and x.shape[0] > 1:
        return np.broadcast_to(x[:1], x.shape)
    if layout == "readonly":
        x = x.copy()
        x.flags.writeable = False
    return x


class Args:
    """Draws the arrays of one call, recording them so the call can be replayed on faithful clones."""

    def __init__(self, draw, dtype):
        self.draw, self.dtype = draw, dtype
        self.rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def dtype_of(self):
        return self.dtype if self.draw(st.integers(0, 19)) else self.draw(st.sampled_from(OTHER_DTYPES))

    def array(self, shape, positive=False, layout=True, dtype=None, values=None):
        """Random values (or ``values``), of a random dtype and layout unless given."""
        dtype = dtype or self.dtype_of()
        x = self.rng.standard_normal(shape) * 3 if values is None else np.asarray(values, np.float64)
        x = (np.abs(x) if positive else x).astype(dtype)
        return _lay(x, self.draw(st.sampled_from(LAYOUTS))) if layout else x

    def written(self, shape, positive=False, dtype=None, values=None):
        """A buffer a kernel writes in place (usually valid: C-contiguous, writeable, of ``dtype``)."""
        kind = self.draw(st.sampled_from(["ok"] * 20 + ["F", "readonly", "dtype"]))
        dtype = self.dtype_of() if kind == "dtype" else dtype or self.dtype
        x = self.array(shape, positive, layout=False, dtype=dtype, values=values)
        return _lay(x, kind) if kind in ("F", "readonly") else x

    def out(self, shape, inputs, dtype=None):
        """None, a good buffer (of ``dtype``), or one that is wrong or aliases one of ``inputs``."""
        kind = self.draw(st.sampled_from(["none", "none", "good", "shape", "dtype", "readonly", "F", "same",
                                          "partial"]))
        good = np.dtype(dtype or self.dtype)
        arrays = [a for a in inputs if isinstance(a, np.ndarray) and a.dtype == good]
        if kind == "none":
            return None
        if kind in ("same", "partial") and arrays:
            src = self.draw(st.sampled_from(arrays))
            if kind == "same" and src.shape == tuple(shape):
                return src
            flat = src.reshape(-1) if src.flags.c_contiguous else None
            if flat is not None and flat.size > 1 and flat.flags.writeable:
                size = int(np.prod(shape))
                start = self.draw(st.integers(0, flat.size - 1))
                if start + size <= flat.size:
                    return flat[start:start + size].reshape(shape)
        if kind == "shape":
            shape = tuple(s + 1 for s in shape) or (1,)
        dtype = np.dtype(self.dtype_of()) if kind == "dtype" else good
        out = np.full(shape, np.nan if dtype.kind == "f" else 7, dtype)
        return _lay(out, kind) if kind in ("readonly", "F") else out


def _clone(values):
    """Copies of every array in ``values`` (a list), keeping which ones share memory and how."""
    copies, result = {}, []
    for v in values:
        if not isinstance(v, np.ndarray) or v.size == 0:
            result.append(v.copy() if isinstance(v, np.ndarray) else v)
            continue
        root = v
        while isinstance(root.base, np.ndarray):
            root = root.base
        if id(root) not in copies:
            copies[id(root)] = (root, root.copy(order="K").ravel(order="K"))  # same memory order, 1-D
        old, new = copies[id(root)]
        offset = v.__array_interface__["data"][0] - old.__array_interface__["data"][0]
        clone = np.ndarray(v.shape, v.dtype, buffer=new, offset=offset, strides=v.strides)
        clone.flags.writeable = v.flags.writeable
        result.append(clone)
    return result


def _shape(a, ndim=None):
    ndim = ndim or a.draw(st.integers(1, 3))
    return tuple(a.draw(SIDES) for _ in range(ndim))


def _maybe_other_shape(a, shape):
    return shape if a.draw(st.integers(0, 9)) else _shape(a)


def _unary(a, name):
    shape = _shape(a)
    x = a.array(shape)
    kw = {}
    if name == "leaky_relu":
        kw["alpha"] = a.draw(st.sampled_from([0.01, 0.3, np.float32(0.2), float("nan"), "0.1"]))
    pos = [x]
    if name == "dropout":
        pos += [a.draw(st.sampled_from([0.0, 0.3, 0.99, 1.0, -0.1])), a.draw(st.sampled_from([0, 7, 2**63, -1, 1.5]))]
    kw["out"] = a.out(shape, [x])
    return pos, kw


def _binary(a, name):
    shape = _shape(a)
    x, dy = a.array(shape), a.array(_maybe_other_shape(a, shape))
    kw = {"alpha": a.draw(st.sampled_from([0.01, 0.5]))} if name == "leaky_relu_backward" else {}
    kw["out"] = a.out(shape, [x, dy])
    return [x, dy], kw


def _rows(a, name):
    shape = _shape(a, 2) if a.draw(st.integers(0, 7)) else _shape(a)
    arrays = [a.array(shape)] + ([a.array(_maybe_other_shape(a, shape))] if name == "softmax_backward" else [])
    return arrays, {"out": a.out(shape, arrays)}


def _matmul(a, name):
    m, k, n = a.draw(SIDES), a.draw(SIDES), a.draw(SIDES)
    trans_a, trans_b = a.draw(FLAGS), a.draw(FLAGS)
    x = a.array((k, m) if trans_a is True or trans_a is np.True_ else (m, k))
    w = a.array((n, k) if trans_b is True or trans_b is np.True_ else _maybe_other_shape(a, (k, n)))
    bias = a.array((n,)) if a.draw(st.booleans()) else None
    kw = dict(trans_a=trans_a, trans_b=trans_b, bias=bias, alpha=a.draw(st.sampled_from([0.01, 0.2])),
              activation=a.draw(st.sampled_from([None, "relu", "leaky_relu", "sigmoid", "tanh"] * 3 + ["gelu", True])))
    kw["out"] = a.out((m, n), [x, w, bias])
    return [x, w], kw


def _cross_entropy(a, name):
    shape = _shape(a, 2)
    logits = a.array(shape)
    labels = a.rng.integers(0, max(shape[1], 1) + a.draw(st.sampled_from([0, 0, 0, 1])), shape[0])
    labels = labels.astype(a.draw(st.sampled_from([np.int64, np.int32, np.uint8, np.float32])))
    return [logits, labels], {"out": a.out(shape, [logits])}


def _pointwise_loss(a, name):
    shape = _shape(a)
    pred = a.array(shape)
    target = a.array(_maybe_other_shape(a, shape))
    if name == "hinge" and target.dtype.kind == "f" and a.draw(st.integers(0, 4)):
        target = np.sign(target) + (target == 0)
    elif name == "binary_cross_entropy":
        target = np.abs(np.tanh(target)).astype(target.dtype)
    return [pred, target], {"out": a.out(shape, [pred, target])}


def _bias_grad(a, name):
    shape = _shape(a, 2) if a.draw(st.integers(0, 7)) else _shape(a)
    dy = a.array(shape)
    return [dy], {"out": a.out(shape[1:2] or (1,), [dy])}


# optimizer -> (state buffer names, which of them must be >= 0, keyword arguments to draw)
OPTIMIZERS = {
    "sgd_step": ((), dict(lr=[0.1, -1.0], momentum=[0.0, 0.9], nesterov=[False, True] * 3 + ["yes"], step=[None, 1, 2],
                          weight_decay=[0.0, 0.1])),
    "adam_step": (("m", "v"), dict(step=[1, 3, 1, 3, 0], lr=[1e-3], weight_decay=[0.0, 0.1],
                                   decoupled=[False, True] * 3 + [np.True_, 1])),
    "rmsprop_step": (("square_avg",), dict(lr=[0.01], momentum=[0.0, 0.9], weight_decay=[0.0, 0.1])),
    "adagrad_step": (("sum_sq",), dict(lr=[0.01], weight_decay=[0.0, 0.1])),
    "adadelta_step": (("square_avg", "acc_delta"), dict(rho=[0.9, 1.5], weight_decay=[0.0, 0.1])),
}


def _optimizer(a, name):
    states, choices = OPTIMIZERS[name]
    shape = _shape(a)
    param, grad = a.written(shape), a.array(_maybe_other_shape(a, shape))
    buffers = [a.written(shape, positive=True) for _ in states]
    kw = {k: a.draw(st.sampled_from(v)) for k, v in choices.items()}
    if name == "sgd_step" and (kw["momentum"] or a.draw(st.booleans())):
        kw["velocity"] = a.written(shape)
    if name == "rmsprop_step" and kw["momentum"]:
        kw["momentum_buffer"] = a.written(shape)
    everything = [param, grad, *buffers]
    if a.draw(st.integers(0, 4)) == 0:  # alias two of the buffers, exactly or partly
        i, j = a.draw(st.permutations(range(len(everything))))[:2]
        src = everything[j]
        everything[i] = src if a.draw(st.booleans()) or src.size < 2 else src.reshape(-1)[1:]
    if name == "sgd_step" or name == "rmsprop_step":
        return everything[:2 + len(states)], kw
    return everything, kw



ACTIVATIONS = ["relu", "leaky_relu", "sigmoid", "tanh"]


def _bias_act(a, name):
    shape = _shape(a, 2) if a.draw(st.integers(0, 7)) else _shape(a)
    y, dy = a.array(shape), a.array(_maybe_other_shape(a, shape))
    activation = a.draw(st.sampled_from(ACTIVATIONS * 3 + [None, "gelu", True]))
    kw = {"alpha": a.draw(st.sampled_from([0.01, 0.3, float("inf"), "0.1"])), "out": a.out(shape, [y, dy])}
    kw["bias_out"] = a.out(shape[1:2] or (1,), [y, dy, kw["out"]])
    return [y, dy, activation], kw


def _segment_norms(a, name):
    n = a.draw(st.sampled_from([0, 1, 2, 5, 8, 40]))
    x = a.array((n,) if a.draw(st.integers(0, 7)) else _shape(a))
    k = a.draw(st.integers(0, 5))
    offsets = np.sort(a.rng.integers(0, n + 1, k))
    offsets[:1] = 0
    kind = a.draw(st.sampled_from(["ok"] * 8 + ["beyond", "negative", "float", "list", "2-D"]))
    if kind == "beyond" and k:
        offsets[-1] = n + 1
    elif kind == "negative" and k:
        offsets[0] = -1
    offsets = offsets.astype(a.draw(st.sampled_from([np.int64, np.int64, np.int32, np.uint16, np.float64])))
    offsets = {"list": offsets.tolist(), "2-D": offsets[None]}.get(kind, offsets)
    if isinstance(offsets, np.ndarray) and offsets.ndim == 1:
        offsets = _lay(offsets, a.draw(st.sampled_from(LAYOUTS)))
    return [x, offsets], {"out": a.out((max(k - 1, 0),), [x], dtype=np.float64)}


def _dense_grad_norm(a, name):
    x = a.array(_shape(a, 2) if a.draw(st.integers(0, 7)) else _shape(a))
    n = a.draw(SIDES)
    dy = a.array((x.shape[0], n) if a.draw(st.integers(0, 7)) else _shape(a))
    bias = a.draw(st.sampled_from(["none", "good", "good", "other shape"]))
    kw = {"bias_grad": None if bias == "none" else a.array((n,) if bias == "good" else _shape(a))}
    return [x, dy], {**kw, "out": a.out((1,), [x, dy], dtype=np.float64)}


def _metrics(a, layers, dtype=np.float64):
    """A metrics buffer for ``layers`` layers (zeroed, or holding earlier steps), now and then of a wrong size."""
    size = kernels.metrics_size(layers) + a.draw(st.sampled_from([0] * 9 + [1, -1, 2]))
    values = np.zeros(size) if a.draw(st.booleans()) else a.rng.integers(0, 3, size)
    return a.written((size,), dtype=dtype, values=values)


def _alias_into(a, name, buffers, i, sources):
    """``buffers[i]`` replaced, sometimes, by a same-shaped view into one of ``sources`` (exactly or partly)."""
    if a.draw(st.integers(0, 4)):
        return
    target = buffers[i]
    src = a.draw(st.sampled_from(sources))
    if not (isinstance(src, np.ndarray) and src.flags.c_contiguous and src.flags.writeable
            and src.dtype == target.dtype and src is not target):
        return
    flat, size = src.reshape(-1), target.size
    start = a.draw(st.integers(0, max(flat.size - size, 0)))
    if size and start + size <= flat.size:
        buffers[i] = flat[start:start + size].reshape(target.shape)


def _count_correct(a, name):
    shape = _shape(a, 2) if a.draw(st.integers(0, 7)) else _shape(a)
    output = a.array(shape)
    n, c = shape[0], shape[-1]
    kind = a.draw(st.sampled_from(["labels", "labels", "scores", "list"]))
    if kind == "labels":
        target = a.rng.integers(-1, c + 1, n if a.draw(st.integers(0, 9)) else n + 1)
        target = _lay(target.astype(a.draw(st.sampled_from([np.int64, np.int32, np.uint8]))),
                      a.draw(st.sampled_from(LAYOUTS)))
    else:
        target = a.array(_maybe_other_shape(a, shape))
        target = target.tolist() if kind == "list" else target
    arrays = [output, target, _metrics(a, a.draw(st.integers(0, 3)))]
    _alias_into(a, name, arrays, 2, arrays[:2])
    return arrays, {"threshold": a.draw(st.sampled_from([0.0, 0.0, 0.5, -1.0, float("nan"), "0"]))}


def _check_step(a, name):
    layers = a.draw(st.sampled_from([0, 1, 2, 3]))
    values = a.rng.standard_normal(layers) ** 2
    if layers and a.draw(st.integers(0, 3)) == 0:
        values[a.draw(st.integers(0, layers - 1))] = a.draw(st.sampled_from([np.nan, np.inf]))
    norms = a.array((layers,) if a.draw(st.integers(0, 9)) else _shape(a),
                    dtype=np.float64 if a.draw(st.integers(0, 9)) else None,
                    values=values if a.draw(st.integers(0, 9)) else None)
    loss = a.draw(st.sampled_from([0.7, 0.7, 2.5, np.float32(0.3), float("nan"), float("inf"), "0.5", True, None,
                                   "array", "array", "2 elements"]))
    if isinstance(loss, str) and loss in ("array", "2 elements"):
        loss = a.array((1,) if loss == "array" else (2,), dtype=a.dtype)
    arrays = [loss, norms, _metrics(a, layers), a.written((1,) if a.draw(st.integers(0, 9)) else (2,))]
    _alias_into(a, name, arrays, 3, arrays[:3])  # scale inside metrics (float64) or the others
    _alias_into(a, name, arrays, 1, arrays[2:])  # norms inside metrics
    kw = {"rows": a.draw(st.sampled_from([1, 4, 4, np.int64(3), 0, -1, 2.0, True])),
          "max_norm": a.draw(st.sampled_from([None, None, 1.0, 0.1, 1e9, 0.0, -1.0, float("inf"), "1"]))}
    return arrays, kw


BN_ROWS, BN_COLUMNS = st.sampled_from([2, 3, 5, 8]), st.sampled_from([1, 2, 3, 5, 8])


def _bn_batch(a, training=True):
    """The shape of a batch: (rows, columns), at least 2 rows when ``training``; now and then not 2-D."""
    if not a.draw(st.integers(0, 11)):
        return _shape(a, a.draw(st.sampled_from([1, 3])))
    return (a.draw(BN_ROWS) if training else a.draw(SIDES)), a.draw(BN_COLUMNS)


def _bn_parts(a, x, sums):
    """``stats=``/``sums=`` for a 2-D batch ``x``: None (its own), its statistics computed here (of x whole
    or of two parts of its rows, stacked), or something wrong."""
    kind = a.draw(st.sampled_from(["none", "none", "whole", "parts", "parts", "float32", "shape", "empty"]))
    if kind == "none" or not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype.kind != "f" or len(x) < 2:
        return None
    x = np.asarray(x, np.float64)

    def stats(rows):
        if sums is not None:
            return np.stack([np.full(x.shape[1], rows.stop - rows.start, float), sums[0][rows].sum(0),
                             sums[1][rows].sum(0)])
        part = x[rows]
        return np.stack([np.full(x.shape[1], len(part), float), part.mean(0), ((part - part.mean(0)) ** 2).sum(0)])

    cut = a.draw(st.integers(1, len(x) - 1))
    value = stats(slice(0, len(x))) if kind != "parts" else np.stack([stats(slice(0, cut)),
                                                                      stats(slice(cut, len(x)))])
    if kind == "float32":
        value = value.astype(np.float32)
    elif kind == "shape":
        value = value[:2]
    elif kind == "empty":
        value = value[None, :, :0]
    return _lay(value, a.draw(st.sampled_from(LAYOUTS)))


def _batchnorm(a, name):
    shape = _bn_batch(a, training=name != "batchnorm_eval")
    x, c = a.array(shape), shape[-1]
    if name == "batchnorm_stats":
        return [x], {}
    gamma, beta = a.array(_maybe_other_shape(a, (c,))), a.array(_maybe_other_shape(a, (c,)))
    if name == "batchnorm_eval":
        arrays = [x, gamma, beta, a.array(_maybe_other_shape(a, (c,))), a.array((c,), positive=True)]
        return arrays, {"eps": a.draw(st.sampled_from([1e-5, 1e-5, 0.5, 0.0, -1.0, float("nan"), "1e-5"]))}
    arrays = [x, gamma, beta, a.written(_maybe_other_shape(a, (c,))), a.written((c,), positive=True)]
    _alias_into(a, name, arrays, a.draw(st.sampled_from([3, 4])), arrays)
    kw = {"momentum": a.draw(st.sampled_from([0.1, 0.1, 0.0, 1.0, 1.5, -0.1, None])),
          "eps": a.draw(st.sampled_from([1e-5, 1e-5, 0.5, 0.0, "1e-5"])), "stats": _bn_parts(a, x, None)}
    return arrays, kw


def _batchnorm_backward(a, name):
    shape = _bn_batch(a)
    dy, xhat, c = a.array(shape), a.array(_maybe_other_shape(a, shape)), shape[-1]
    if name == "batchnorm_backward_sums":
        return [dy, xhat], {}
    arrays = [dy, xhat, a.array(_maybe_other_shape(a, (c,))), a.array(_maybe_other_shape(a, (c,)), positive=True)]
    sums = None
    if dy.ndim == 2 and xhat.shape == dy.shape and dy.dtype.kind == xhat.dtype.kind == "f":
        sums = np.asarray(dy, np.float64), np.asarray(dy, np.float64) * np.asarray(xhat, np.float64)
    return arrays, {"sums": _bn_parts(a, dy, sums)}

BUILDERS = {**{n: _unary for n in ("relu", "sigmoid", "tanh", "leaky_relu", "dropout")},
            **{n: _binary for n in ("relu_backward", "leaky_relu_backward", "sigmoid_backward", "tanh_backward")},
            "softmax": _rows, "softmax_backward": _rows, "matmul": _matmul,
            "softmax_cross_entropy": _cross_entropy, "bias_grad": _bias_grad,
            **{n: _pointwise_loss for n in ("mse", "binary_cross_entropy", "hinge")},
            **{n: _optimizer for n in OPTIMIZERS}, "bias_act_backward": _bias_act, "segment_norms": _segment_norms,
            "dense_grad_norm": _dense_grad_norm,
            "count_correct": _count_correct, "check_step": _check_step,
            **{n: _batchnorm for n in ("batchnorm_forward", "batchnorm_eval", "batchnorm_stats")},
            **{n: _batchnorm_backward for n in ("batchnorm_backward", "batchnorm_backward_sums")}}


def _call(backend, fn, pos, kw):
    """fn on clones of the arguments; returns (result or exception, the cloned arguments after the call)."""
    values = _clone(pos + list(kw.values()))
    pos, kw = values[:len(pos)], dict(zip(kw, values[len(pos):]))
    with kernels.use_backend(backend):
        try:
            return fn(*pos, **kw), pos, kw
        except (TypeError, ValueError) as e:
            return e, pos, kw


def _names_a_parameter(message, params):
    """Whether ``message`` starts with one of ``params`` as a whole word (``a and b ...``, ``out must ...``)."""
    return re.match(rf"(?:{'|'.join(map(re.escape, params))})\b", message) is not None


def test_the_naming_rule_wants_the_parameter_first_and_whole():
    """The rule the fuzzer applies to error messages, on messages that must pass and must not."""
    assert _names_a_parameter("a and b do not compose: op(a) is (2, 3)", ["a", "b", "out"])
    assert _names_a_parameter("nesterov=True needs momentum > 0", ["lr", "nesterov"])
    assert _names_a_parameter("momentum_buffer must be given", ["momentum", "momentum_buffer"])
    assert not _names_a_parameter("internal error", ["a", "b"])
    assert not _names_a_parameter("bad value for m", ["m", "v"])
    assert not _names_a_parameter("vector must be 1-D", ["v"])
    assert not _names_a_parameter("grad must be 1-D", ["param", "m"])


def test_every_public_kernel_is_fuzzed():
    """BUILDERS covers every public function of kernels/_api.py but the two host-side metrics helpers."""
    from kernels import _api
    public = {n for n, f in vars(_api).items() if inspect.isfunction(f) and f.__module__ == _api.__name__
              and not n.startswith("_")}
    assert public - {"metrics_size", "unpack_metrics"} == set(BUILDERS)


# the buffers each kernel writes in place: positions and keyword names
WRITES = {**{n: [0, 2, 3, 4, "velocity", "momentum_buffer"] for n in OPTIMIZERS},
          "batchnorm_forward": [3, 4], "count_correct": [2], "check_step": [2, 3]}
OUTS = {"bias_act_backward": ("out", "bias_out")}  # the out= keywords, in the order the results end with


def _tolerance(dtype, pos, name):
    if np.dtype(dtype) == np.float64:
        return dict(rtol=1e-9, atol=1e-9)
    depth = max([1] + [max(x.shape) for x in pos if isinstance(x, np.ndarray) and x.ndim]) if name == "matmul" else 1
    return dict(rtol=2e-4, atol=2e-5 * depth * 10)


def _assert_same(got, want, tol):
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w, tol)
    elif want is None:
        assert got is None
    else:
        assert np.asarray(got).dtype == np.asarray(want).dtype and np.shape(got) == np.shape(want)
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), equal_nan=True, **tol)


def _arguments(pos, kw):
    """(position or keyword, value) of every argument of a call."""
    return list(enumerate(pos)) + list(kw.items())


@st.composite
def calls(draw):
    name = draw(st.sampled_from(sorted(BUILDERS)))
    dtype = draw(st.sampled_from(FLOATS))
    pos, kw = BUILDERS[name](Args(draw, dtype), name)
    return name, dtype, pos, kw


# ~400 examples take 5-20 s; FUZZ_EXAMPLES=20000 for a long hunt
@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 400)), deadline=None)
@given(call=calls())
def test_every_kernel_answers_right_or_refuses(call):
    name, dtype, pos, kw = call
    fn = getattr(kernels, name)
    arrays = [(k, v) for k, v in _arguments(pos, kw) if isinstance(v, np.ndarray)]
    shared = [(k, j) for i, (k, v) in enumerate(arrays) for j, w in arrays[i + 1:] if np.may_share_memory(v, w)]
    note(f"arguments sharing memory: {shared}")
    before = _clone(pos + list(kw.values()))
    got, got_pos, got_kw = _call("numba", fn, pos, kw)
    ref, ref_pos, ref_kw = _call("numpy", fn, pos, kw)
    event(f"{name}: {type(got).__name__}")
    if isinstance(got, Exception) or isinstance(ref, Exception):
        assert type(got) is type(ref) and str(got) == str(ref), f"numba: {got!r}, reference: {ref!r}"
        params = list(inspect.signature(fn).parameters)
        assert _names_a_parameter(str(got), params), f"{got!r} does not start with one of {params}"
        for old, new in zip(before, got_pos + list(got_kw.values())):  # refused before writing anything
            if isinstance(old, np.ndarray):
                np.testing.assert_array_equal(new, old)
        return
    # the answer on fresh, separate buffers (no out=, no aliasing), from the reference
    outs = OUTS.get(name, ("out",))
    fresh = {k: None if k in outs else v for k, v in kw.items()}
    want, want_pos, want_kw = _call("numpy", fn, [np.array(x) if isinstance(x, np.ndarray) else x for x in pos],
                                    {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in fresh.items()})
    tol = _tolerance(dtype, pos, name)
    wants = dict(_arguments(want_pos, want_kw))
    for result, args, kwargs in ((got, got_pos, got_kw), (ref, ref_pos, ref_kw)):
        _assert_same(result, want, tol)
        results = result if isinstance(result, tuple) else (result,)
        for k, r in zip(outs, results[-len(outs):]):
            if kwargs.get(k) is not None:
                assert r is kwargs[k], f"{k}= is not the buffer returned"
        arguments = _arguments(args, kwargs)
        written = [v for k, v in arguments if (k in WRITES.get(name, ()) or k in outs) and v is not None]
        for k, v in arguments:
            if k in WRITES.get(name, ()) and v is not None:  # written in place
                _assert_same(v, wants[k], tol)
            elif isinstance(v, np.ndarray) and not any(np.may_share_memory(v, w) for w in written):
                np.testing.assert_array_equal(v, before[k if isinstance(k, int) else len(pos) + list(kw).index(k)],
                                              f"{name} changed its input {k!r}")


NN_ACTIVATIONS = [None, "relu", "leaky_relu", "sigmoid", "tanh"]


def _train(backend, dims, activations, dtype, x, y, loss, optimizer):
    """A model built, trained one epoch and asked for predictions on ``backend``; (result or error)."""
    with kernels.use_backend(backend):
        try:
            layers = [nn.Dense(units, activation=act) for units, act in zip(dims, activations)]
            model = nn.Sequential(layers, dtype=dtype, seed=3)
            trainer = nn.Trainer(model, loss=loss, optimizer=optimizer)
            trainer.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0)
            return model.params.copy(), trainer.predict(x)
        except (TypeError, ValueError) as e:
            return e


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 400)) // 8, deadline=None)
@given(data=st.data())
def test_nn_trains_the_same_on_both_backends_or_refuses(data):
    """nn's public surface on fuzzed data: a model trained one epoch on numba matches the reference."""
    draw = data.draw
    a = Args(draw, draw(st.sampled_from(FLOATS)))
    n, d = draw(st.sampled_from([0, 1, 5, 9])), draw(st.sampled_from([1, 3, 6]))
    x = a.array((n, d)) if draw(st.integers(0, 5)) else a.array(_shape(a))
    loss = draw(st.sampled_from(["softmax_cross_entropy", "mse"]))
    dims = draw(st.lists(st.sampled_from([1, 2, 4]), min_size=1, max_size=3))
    activations = [draw(st.sampled_from(NN_ACTIVATIONS)) for _ in dims[:-1]] + [None]
    if loss == "softmax_cross_entropy":
        y = a.rng.integers(0, dims[-1], n)
    else:
        y = a.array((n, dims[-1]))
    optimizer = draw(st.sampled_from(["adam", "sgd", "rmsprop"]))
    dtype = draw(st.sampled_from(["float32", "float64", "float16"]))
    args = (dims, activations, dtype, x, y, loss, optimizer)
    got, want = _train("numba", *args), _train("numpy", *args)
    event(f"nn: {type(got).__name__}")
    if isinstance(got, Exception) or isinstance(want, Exception):
        assert type(got) is type(want) and str(got) == str(want), f"numba: {got!r}, reference: {want!r}"
        return
    tol = dict(rtol=1e-3, atol=1e-4) if dtype == "float32" else dict(rtol=1e-8, atol=1e-9)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, equal_nan=True, **tol)


# ---- defects the fuzzing found (mended): each case that showed one --------------------------------------------------

@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_batchnorm_forward_refuses_running_buffers_that_alias_its_inputs(backend):
    """running_mean as a view of x's first row (y came out [-0.9, 1] instead of [-1, 1]), or the same array
    as both running buffers: refused before anything is written."""
    x = np.array([[1.0], [3.0]])
    with kernels.use_backend(backend):
        with pytest.raises(ValueError, match="^running_mean must not share memory with x"):
            kernels.batchnorm_forward(x, np.ones(1), np.zeros(1), x[0], np.ones(1))
        both = np.ones(1)
        with pytest.raises(ValueError, match="^running_mean must not share memory with running_var"):
            kernels.batchnorm_forward(x, np.ones(1), np.zeros(1), both, both)
    np.testing.assert_array_equal(x, [[1.0], [3.0]])
    np.testing.assert_array_equal(both, [1.0])


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_check_step_refuses_a_scale_or_norms_inside_metrics(backend):
    """scale as a view of metrics (the loss sum came out 1.0 instead of 1.4) or norms inside it: refused."""
    metrics = np.zeros(kernels.metrics_size(1))
    with kernels.use_backend(backend):
        with pytest.raises(ValueError, match="^metrics must not share memory with scale"):
            kernels.check_step(0.7, np.zeros(1), metrics, metrics[:1], rows=2)
        with pytest.raises(ValueError, match="^metrics must not share memory with norms"):
            kernels.check_step(0.7, metrics[-1:], metrics, np.ones(1), rows=2)
    assert not metrics.any()


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint64, np.int64])
def test_segment_norms_refuses_decreasing_offsets_of_any_integer_dtype(backend, dtype):
    """Offsets [0, 3, 1, 4] are refused whatever their integer dtype (np.diff wrapped around for unsigned ones)."""
    with kernels.use_backend(backend), pytest.raises(ValueError, match="^offsets must be non-decreasing"):
        kernels.segment_norms(np.arange(4.0), np.array([0, 3, 1, 4], dtype))


def test_segment_norms_names_the_shape_of_2d_offsets():
    """A 2-D integer offsets array is refused for its shape (the message named its dtype)."""
    with pytest.raises(ValueError, match=r"^offsets must be 1-D, got shape \(1, 2\)"):
        kernels.segment_norms(np.arange(4.0), np.array([[0, 4]]))
