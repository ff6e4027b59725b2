"""Fuzzing the whole public API (``kernels`` and ``nn``) with hypothesis.

Every kernel gets random shapes (0 and 1 included), dtypes (float16/32/64, integers, bool), layouts (C,
Fortran, strided, negative and zero strides, read-only), flags of any type, and ``out=`` buffers that are
fresh, wrong in shape or dtype, read-only, non-contiguous or aliasing an input exactly or partly. Each call,
on the numba backend and on the reference, must either raise TypeError/ValueError naming one of the
function's parameters (the same error on both backends, with no buffer touched), or return what the
reference returns on fresh, unaliased copies of the inputs. A crash or hang fails the run; the example
count is bounded for CI.
"""

import inspect
import os

import numpy as np
import pytest
from hypothesis import event, given, settings
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

    def array(self, shape, positive=False, layout=True, dtype=None):
        dtype = dtype or self.dtype_of()
        x = self.rng.standard_normal(shape) * 3
        x = (np.abs(x) if positive else x).astype(dtype)
        return _lay(x, self.draw(st.sampled_from(LAYOUTS))) if layout else x

    def written(self, shape, positive=False):
        """A buffer a kernel writes in place (usually valid: C-contiguous, writeable, the right dtype)."""
        kind = self.draw(st.sampled_from(["ok"] * 20 + ["F", "readonly", "dtype"]))
        x = self.array(shape, positive, layout=False, dtype=self.dtype_of() if kind == "dtype" else self.dtype)
        return _lay(x, kind) if kind in ("F", "readonly") else x

    def out(self, shape, inputs):
        """None, a good buffer, or one that is wrong or aliases one of ``inputs``."""
        kind = self.draw(st.sampled_from(["none", "none", "good", "shape", "dtype", "readonly", "F", "same",
                                          "partial"]))
        arrays = [a for a in inputs if isinstance(a, np.ndarray) and a.dtype == self.dtype]
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
        dtype = np.dtype(self.dtype_of() if kind == "dtype" else self.dtype)
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


BUILDERS = {**{n: _unary for n in ("relu", "sigmoid", "tanh", "leaky_relu", "dropout")},
            **{n: _binary for n in ("relu_backward", "leaky_relu_backward", "sigmoid_backward", "tanh_backward")},
            "softmax": _rows, "softmax_backward": _rows, "matmul": _matmul,
            "softmax_cross_entropy": _cross_entropy, "bias_grad": _bias_grad,
            **{n: _pointwise_loss for n in ("mse", "binary_cross_entropy", "hinge")},
            **{n: _optimizer for n in OPTIMIZERS}}


def _call(backend, fn, pos, kw):
    """fn on clones of the arguments; returns (result or exception, the cloned arguments after the call)."""
    values = _clone(pos + list(kw.values()))
    pos, kw = values[:len(pos)], dict(zip(kw, values[len(pos):]))
    with kernels.use_backend(backend):
        try:
            return fn(*pos, **kw), pos, kw
        except (TypeError, ValueError) as e:
            return e, pos, kw


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


@st.composite
def calls(draw):
    name = draw(st.sampled_from(sorted(BUILDERS)))
    pos, kw = BUILDERS[name](Args(draw, draw(st.sampled_from(FLOATS))), name)
    return name, pos, kw


# ~400 examples take 5-20 s; FUZZ_EXAMPLES=20000 for a long hunt
@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 400)), deadline=None)
@given(call=calls())
def test_every_kernel_answers_right_or_refuses(call):
    name, pos, kw = call
    fn = getattr(kernels, name)
    before = _clone(pos + list(kw.values()))
    got, got_pos, got_kw = _call("numba", fn, pos, kw)
    ref, ref_pos, ref_kw = _call("numpy", fn, pos, kw)
    event(f"{name}: {type(got).__name__}")
    if isinstance(got, Exception) or isinstance(ref, Exception):
        assert type(got) is type(ref) and str(got) == str(ref), f"numba: {got!r}, reference: {ref!r}"
        params = inspect.signature(fn).parameters
        assert any(p in str(got) for p in params), f"{got} names none of {list(params)}"
        for old, new in zip(before, got_pos + list(got_kw.values())):  # refused before writing anything
            if isinstance(old, np.ndarray):
                np.testing.assert_array_equal(new, old)
        return
    # the answer on fresh, separate buffers (no out=, no aliasing), from the reference
    fresh = {k: None if k == "out" else v for k, v in kw.items()}
    want, want_pos, want_kw = _call("numpy", fn, [np.array(x) if isinstance(x, np.ndarray) else x for x in pos],
                                    {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in fresh.items()})
    tol = _tolerance(pos[0].dtype, pos, name)
    for result, args, kwargs in ((got, got_pos, got_kw), (ref, ref_pos, ref_kw)):
        _assert_same(result, want, tol)
        if kwargs.get("out") is not None:
            assert (result[1] if isinstance(result, tuple) else result) is kwargs["out"]
        if name in OPTIMIZERS:  # the buffers written in place
            for i in [0] + list(range(2, len(args))):
                _assert_same(args[i], want_pos[i], tol)
            for k in ("velocity", "momentum_buffer"):
                if kwargs.get(k) is not None:
                    _assert_same(kwargs[k], want_kw[k], tol)


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
