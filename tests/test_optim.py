"""Optimizer steps: every backend against the NumPy reference, 50-step trajectories against torch.optim,
the public API's argument checks, and vectorised numba loops."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kernels
from helpers import (DTYPES, LAYOUTS, SIZES_1D, SIZES_2D, TOL, compiled_copy, needs_avx2, reference,
                     with_layout)
from kernels.cpu import optim
from kernels.cpu._parallel import CHUNK, PARALLEL_MIN

SHAPES = st.one_of(SIZES_1D.map(lambda n: (n,)), st.tuples(SIZES_2D, SIZES_2D))
LR = st.sampled_from([0.0, 1e-3, 0.01, 0.1, 0.5])
DECAY = st.sampled_from([0.0, 1e-4, 0.01, 0.3])
EPS = st.sampled_from([1e-10, 1e-8, 1e-6, 0.1])
UNIT = st.sampled_from([0.0, 0.5, 0.9, 0.99])  # averaging rates in [0, 1]


@st.composite
def _sgd(draw):
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov else draw(st.sampled_from([0.0, 0.1, 0.5]))
    hyper = dict(lr=draw(LR), momentum=momentum, dampening=dampening, nesterov=nesterov,
                 weight_decay=draw(DECAY), step=draw(st.sampled_from([None, 1, 2, 7])))
    return hyper, ({"velocity": "signed"} if momentum else {})


@st.composite
def _adam(draw):
    hyper = dict(step=draw(st.sampled_from([1, 2, 10, 1000])), lr=draw(LR), beta1=draw(UNIT),
                 beta2=draw(st.sampled_from([0.0, 0.9, 0.999])), eps=draw(EPS), weight_decay=draw(DECAY),
                 decoupled=draw(st.booleans()))
    return hyper, {"m": "signed", "v": "nonnegative"}


@st.composite
def _rmsprop(draw):
    momentum = draw(st.sampled_from([0.0, 0.9]))
    hyper = dict(lr=draw(LR), alpha=draw(UNIT), eps=draw(EPS), weight_decay=draw(DECAY), momentum=momentum)
    return hyper, {"square_avg": "nonnegative", **({"momentum_buffer": "signed"} if momentum else {})}


@st.composite
def _adagrad(draw):
    return dict(lr=draw(LR), eps=draw(EPS), weight_decay=draw(DECAY)), {"sum_sq": "nonnegative"}


@st.composite
def _adadelta(draw):
    hyper = dict(lr=draw(st.sampled_from([0.0, 0.1, 1.0])), rho=draw(UNIT), eps=draw(EPS),
                 weight_decay=draw(DECAY))
    return hyper, {"square_avg": "nonnegative", "acc_delta": "nonnegative"}


# name -> (public kernel, strategy drawing (hyperparameters, {state buffer: sign}))
OPTIMIZERS = {"sgd": (kernels.sgd_step, _sgd()), "adam": (kernels.adam_step, _adam()),
              "rmsprop": (kernels.rmsprop_step, _rmsprop()), "adagrad": (kernels.adagrad_step, _adagrad()),
              "adadelta": (kernels.adadelta_step, _adadelta())}

# name -> (hyperparameters using every feature, state buffers)
FULL_CASES = {
    "sgd": (dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, step=3), {"velocity": "signed"}),
    "adam": (dict(step=3, lr=0.01, weight_decay=0.01), {"m": "signed", "v": "nonnegative"}),
    "rmsprop": (dict(lr=0.01, weight_decay=0.01, momentum=0.9),
                {"square_avg": "nonnegative", "momentum_buffer": "signed"}),
    "adagrad": (dict(lr=0.1, weight_decay=0.01), {"sum_sq": "nonnegative"}),
    "adadelta": (dict(weight_decay=0.01), {"square_avg": "nonnegative", "acc_delta": "nonnegative"}),
}


def _buffers(rng, shape, dtype, states):
    """param, grad and the state buffers (nonnegative ones where the algorithm keeps squares)."""
    param, grad = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    state = {name: rng.standard_normal(shape).astype(dtype) for name in states}
    for name, sign in states.items():
        if sign == "nonnegative":
            state[name] = np.abs(state[name])
    return param, grad, state


def _step(fn, param, grad, state, hyper, backend=None):
    """One step of ``fn`` on copies of param and state, on ``backend`` (host arrays when None); returns
    them as host arrays."""
    to, get = (backend.to, backend.get) if backend else ((lambda a: a), np.asarray)
    param_dev = to(param.copy())
    state_dev = {name: to(a.copy()) for name, a in state.items()}
    fn(param_dev, to(grad), **state_dev, **hyper)
    return get(param_dev), {name: get(a) for name, a in state_dev.items()}


def _reference_step(fn, param, grad, state, hyper):
    return _step(lambda *a, **k: reference(fn, *a, **k), param, grad, state, hyper)


def _assert_step_close(actual, expected, before, dtype, exact=None):
    """Equal to the reference within a few ulps of the operands (the old value and the change), or, where
    the update is ill-conditioned (e.g. weight decay cancelling the gradient), within a few times the
    reference's own rounding error, measured against ``exact``: the same step computed in float64."""
    tol = TOL[np.dtype(dtype)]
    bound = tol["atol"] + tol["rtol"] * (np.abs(before) + np.abs(expected) + np.abs(expected - before))
    if exact is not None:
        bound = bound + 4 * np.abs(expected.astype(np.float64) - exact)
    err = np.abs(actual.astype(np.float64) - expected)
    bad = ~(err <= bound)
    assert not bad.any(), (f"{bad.sum()} of {bad.size} differ; first at {np.argwhere(bad)[0]}: "
                           f"{actual[bad][0]!r} != {expected[bad][0]!r}")


@pytest.mark.parametrize("name", OPTIMIZERS)
@given(data=st.data(), shape=SHAPES, dtype=DTYPES, layout=LAYOUTS, seed=st.integers(0, 2**32 - 1))
def test_step_matches_reference(fast_backend, name, data, shape, dtype, layout, seed):
    fn, case = OPTIMIZERS[name]
    hyper, states = data.draw(case)
    param, grad, state = _buffers(np.random.default_rng(seed), shape, dtype, states)
    grad = with_layout(grad, layout)  # a non-contiguous gradient is accepted (copied once)
    p_ref, s_ref = _reference_step(fn, param, grad, state, hyper)
    p_exact, s_exact = _reference_step(fn, param.astype(np.float64), grad.astype(np.float64),
                                       {k: a.astype(np.float64) for k, a in state.items()}, hyper)
    p_out, s_out = _step(fn, param, grad, state, hyper, fast_backend)
    assert p_out.dtype == dtype
    _assert_step_close(p_out, p_ref, param, dtype, p_exact)
    for key in state:
        assert s_out[key].dtype == dtype
        _assert_step_close(s_out[key], s_ref[key], state[key], dtype, s_exact[key])


@pytest.mark.parametrize("name", OPTIMIZERS)
@given(data=st.data(), n=st.integers(1, 80), dtype=DTYPES, seed=st.integers(0, 2**32 - 1))
def test_numba_step_of_a_range_in_two_calls_is_the_step_in_one(name, data, n, dtype, seed):
    """An element's update does not depend on where the call's range starts or ends (its vector loop or its
    scalar remainder), bit for bit: the compiled training step updates the first layer's W apart from the
    rest of the parameters and must match the per-kernel step's single call."""
    fn, strategy = OPTIMIZERS[name]
    hyper, states = data.draw(strategy)
    cut = data.draw(st.integers(0, n))
    param, grad, state = _buffers(np.random.default_rng(seed), (n,), dtype, states)
    with kernels.use_backend("numba"):
        whole, whole_state = _step(fn, param, grad, state, hyper)
        parts, parts_state = param.copy(), {k: v.copy() for k, v in state.items()}
        for sl in (slice(0, cut), slice(cut, n)):
            if sl.stop > sl.start:
                fn(parts[sl], grad[sl], **{k: v[sl] for k, v in parts_state.items()}, **hyper)
    assert whole.tobytes() == parts.tobytes()
    assert all(whole_state[k].tobytes() == parts_state[k].tobytes() for k in state)


@given(data=st.data(), rows=st.integers(1, 2), w_in=st.integers(1, 40), n=st.integers(1, 40), dtype=DTYPES,
       velocity=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_sgd_on_the_outer_product_as_it_is_read_is_sgd_on_the_product(data, rows, w_in, n, dtype, velocity, seed):
    """``_sgd_outer`` (the compiled step's first-layer update at a batch of one or two) updates any range of W and
    its velocity bit for bit as ``_sgd`` on ``x^T dz`` from kernels.matmul, zeros of either sign included."""
    rng = np.random.default_rng(seed)
    special = np.array([0.0, -0.0, 1.0, -1.0])

    def values(shape):
        return np.where(rng.random(shape) < 0.2, rng.choice(special, shape), rng.standard_normal(shape)).astype(dtype)

    x, dz, w, v = values((rows, w_in)), values((rows, n)), values(w_in * n), values(w_in * n)
    lo = data.draw(st.integers(0, w.size))
    hi = data.draw(st.integers(lo, w.size))
    t = np.dtype(dtype).type
    hyper = (t(0.05), t(0.9), t(data.draw(st.sampled_from([1.0, 0.9]))), data.draw(st.booleans()),
             t(data.draw(st.sampled_from([0.0, 1e-3]))), data.draw(st.booleans()))
    with kernels.use_backend("numba"):
        grad = kernels.matmul(x, dz, trans_a=True).reshape(-1)
    expected, expected_v, got, got_v = w.copy(), v.copy(), w.copy(), v.copy()
    optim._sgd(np.uint64(lo), np.uint64(hi), expected, grad, expected_v if velocity else None, *hyper, None)
    optim._sgd_outer(np.uint64(lo), np.uint64(hi), got, x, dz, got_v if velocity else None, *hyper)
    assert got.tobytes() == expected.tobytes()
    assert got_v.tobytes() == expected_v.tobytes()


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("n", [PARALLEL_MIN - 1, PARALLEL_MIN, 3 * CHUNK + PARALLEL_MIN + 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_parallel_chunks_match_reference(name, n, threads):
    """Around the size where the numba kernels go parallel, with 1 and 2 threads."""
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"numba has only {numba.config.NUMBA_NUM_THREADS} thread(s) here")
    fn, _ = OPTIMIZERS[name]
    hyper, states = FULL_CASES[name]
    param, grad, state = _buffers(np.random.default_rng(n), (n,), np.float32, states)
    p_ref, s_ref = _reference_step(fn, param, grad, state, hyper)
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        with kernels.use_backend("numba"):
            p_out, s_out = _step(fn, param, grad, state, hyper)
    finally:
        numba.set_num_threads(previous)
    _assert_step_close(p_out, p_ref, param, np.float32)
    for key in state:
        _assert_step_close(s_out[key], s_ref[key], state[key], np.float32)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_gradient_reaches_the_parameter(backend, name, dtype):
    fn, _ = OPTIMIZERS[name]
    hyper, states = FULL_CASES[name]
    param, grad, state = _buffers(np.random.default_rng(7), (37,), dtype, states)
    grad[[0, 17, 36]] = np.nan
    p_ref, _ = _reference_step(fn, param, grad, state, hyper)
    p_out, _ = _step(fn, param, grad, state, hyper, backend)
    np.testing.assert_array_equal(np.isnan(p_out), np.isnan(grad))
    _assert_step_close(p_out[~np.isnan(grad)], p_ref[~np.isnan(grad)], param[~np.isnan(grad)], dtype)


# ---- 50-step trajectories against torch.optim ------------------------------------------------------

# (id, kernel, its keyword arguments, state buffers, torch.optim class, its keyword arguments); the step
# counter is passed as step= to kernels that take one.
TORCH_CASES = [
    ("sgd", kernels.sgd_step, dict(lr=0.05), (), "SGD", dict(lr=0.05)),
    ("sgd-momentum-dampening-decay", kernels.sgd_step,
     dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01), ("velocity",),
     "SGD", dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    ("sgd-nesterov", kernels.sgd_step, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
     ("velocity",), "SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    ("adam", kernels.adam_step, dict(lr=0.01), ("m", "v"), "Adam", dict(lr=0.01)),
    ("adam-l2", kernels.adam_step, dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1),
     ("m", "v"), "Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("adamw", kernels.adam_step, dict(lr=0.01, weight_decay=0.1, decoupled=True), ("m", "v"),
     "AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("rmsprop", kernels.rmsprop_step, dict(lr=0.01, weight_decay=0.01), ("square_avg",),
     "RMSprop", dict(lr=0.01, weight_decay=0.01)),
    ("rmsprop-momentum", kernels.rmsprop_step, dict(lr=0.01, alpha=0.9, momentum=0.9),
     ("square_avg", "momentum_buffer"), "RMSprop", dict(lr=0.01, alpha=0.9, momentum=0.9)),
    ("adagrad", kernels.adagrad_step, dict(lr=0.1, weight_decay=0.01), ("sum_sq",),
     "Adagrad", dict(lr=0.1, weight_decay=0.01)),
    ("adadelta", kernels.adadelta_step, dict(lr=1.0, rho=0.95, weight_decay=0.01), ("square_avg", "acc_delta"),
     "Adadelta", dict(lr=1.0, rho=0.95, weight_decay=0.01)),
]
# Measured worst relative error over 50 steps: 7e-14 in float64, 4e-5 in float32 (RMSprop with momentum).
TRAJECTORY_TOL = {np.float64: dict(rtol=1e-12, atol=1e-13), np.float32: dict(rtol=1e-4, atol=1e-5)}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_trajectory_matches_torch(backend, case, dtype):
    torch = pytest.importorskip("torch")
    _, fn, kwargs, states, torch_name, torch_kwargs = case
    rng = np.random.default_rng(3)
    n, steps = 37, 50
    start = rng.standard_normal(n).astype(dtype)
    grads = rng.standard_normal((steps, n)).astype(dtype)
    weight = torch.from_numpy(start.copy()).requires_grad_()
    optimizer = getattr(torch.optim, torch_name)([weight], **torch_kwargs)
    param = backend.to(start.copy())
    state = {name: backend.to(np.zeros(n, dtype)) for name in states}
    takes_step = fn in (kernels.sgd_step, kernels.adam_step)
    for t, g in enumerate(grads, start=1):
        weight.grad = torch.from_numpy(g.copy())
        optimizer.step()
        fn(param, backend.to(g), **state, **kwargs, **(dict(step=t) if takes_step else {}))
        np.testing.assert_allclose(backend.get(param), weight.detach().numpy(), **TRAJECTORY_TOL[dtype],
                                   err_msg=f"after step {t}")
    assert not np.allclose(backend.get(param), start)  # the trajectory went somewhere


# ---- argument checks of the public API ---------------------------------------------------------------

def _adam_args(n=8, dtype=np.float32):
    return dict(param=np.zeros(n, dtype), grad=np.ones(n, dtype), m=np.zeros(n, dtype), v=np.zeros(n, dtype))


def _read_only(a):
    a.flags.writeable = False
    return a


def _strided(a):
    return np.zeros(2 * a.size, a.dtype)[::2]


ADAM_ERRORS = {  # id -> (arguments changed from valid ones, error, the argument its message names)
    "step-0": (dict(step=0), ValueError, "step"),
    "step-float": (dict(step=1.0), TypeError, "step"),
    "lr-negative": (dict(lr=-0.1), ValueError, "lr"),
    "beta1-1": (dict(beta1=1.0), ValueError, "beta1"),
    "beta2-above-1": (dict(beta2=1.5), ValueError, "beta2"),
    "eps-nan": (dict(eps=float("nan")), ValueError, "eps"),
    "weight_decay-negative": (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    "grad-shape": (dict(grad=np.ones(9, np.float32)), ValueError, "grad"),
    "v-shape": (dict(v=np.zeros((2, 4), np.float32)), ValueError, "v"),
    "m-dtype": (dict(m=np.zeros(8, np.float64)), TypeError, "m"),
    "grad-dtype": (dict(grad=np.ones(8, np.float64)), TypeError, "grad"),
    "param-int": (dict(param=np.zeros(8, np.int32)), TypeError, "param"),
    "param-read-only": (dict(param=_read_only(np.zeros(8, np.float32))), ValueError, "param"),
    "v-read-only": (dict(v=_read_only(np.zeros(8, np.float32))), ValueError, "v"),
    "param-strided": (dict(param=_strided(np.zeros(8, np.float32))), ValueError, "param"),
    "m-strided": (dict(m=_strided(np.zeros(8, np.float32))), ValueError, "m"),
    "scale-shape": (dict(scale=np.ones(2, np.float32)), ValueError, "scale"),
    "scale-dtype": (dict(scale=np.ones(1, np.float64)), TypeError, "scale"),
    "scale-list": (dict(scale=[1.0]), TypeError, "scale"),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@given(shape=SHAPES, dtype=DTYPES, seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([0.0, 1.0, 0.25, 3.0]))
def test_scaled_step_matches_reference(backend, name, shape, dtype, seed, scale):
    """``scale=[s]``: the step with ``grad * s``; s == 0 skips it, param and state untouched; the scale
    is read on the device (a device array there), so clipping and skipping need no host read."""
    fn, _ = OPTIMIZERS[name]
    hyper, states = FULL_CASES[name]
    param, grad, state = _buffers(np.random.default_rng(seed), shape, dtype, states)
    scaled = {**hyper, "scale": backend.to(np.array([scale], dtype))}
    p_out, s_out = _step(fn, param, grad, state, scaled, backend)
    if scale == 0:
        np.testing.assert_array_equal(p_out, param)
        for key in state:
            np.testing.assert_array_equal(s_out[key], state[key])
        return
    p_ref, s_ref = _reference_step(fn, param, grad * dtype(scale), state, hyper)  # what clipping used to do
    p_exact, s_exact = _reference_step(fn, param.astype(np.float64), grad.astype(np.float64) * scale,
                                       {k: a.astype(np.float64) for k, a in state.items()}, hyper)
    _assert_step_close(p_out, p_ref, param, dtype, p_exact)
    for key in state:
        _assert_step_close(s_out[key], s_ref[key], state[key], dtype, s_exact[key])
    if not backend.is_cuda and (scale == 1 or backend.name == "numpy"):  # bitwise: no scale / a separate pass
        np.testing.assert_array_equal(p_out, _step(fn, param, grad * dtype(scale), state, hyper, backend)[0])


@pytest.mark.parametrize("change, error, name", ADAM_ERRORS.values(), ids=ADAM_ERRORS)
def test_adam_rejects_bad_arguments(change, error, name):
    args = {**_adam_args(), **change}
    hyper = {k: args.pop(k) for k in list(args) if k not in ("param", "grad", "m", "v", "scale")}
    hyper["scale"] = args.pop("scale", None)
    before = {k: np.array(a) for k, a in args.items()}
    with pytest.raises(error, match=rf"^{name}\b"):
        kernels.adam_step(args["param"], args["grad"], args["m"], args["v"], **{"step": 1, **hyper})
    for k, a in args.items():  # nothing was touched
        np.testing.assert_array_equal(a, before[k])


OTHER_ERRORS = {  # id -> (call on a valid param and grad, error, the argument its message names)
    "sgd-momentum-without-velocity": (lambda p, g: kernels.sgd_step(p, g, lr=0.1, momentum=0.9), ValueError,
                                      "velocity"),
    "sgd-nesterov-without-momentum": (lambda p, g: kernels.sgd_step(p, g, lr=0.1, nesterov=True), ValueError,
                                      "nesterov"),
    "sgd-nesterov-with-dampening": (lambda p, g: kernels.sgd_step(
        p, g, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True, velocity=np.zeros_like(p)), ValueError,
        "nesterov"),
    "sgd-strided-velocity": (lambda p, g: kernels.sgd_step(p, g, lr=0.1, momentum=0.9, velocity=_strided(p)),
                             ValueError, "velocity"),
    "sgd-dampening-2": (lambda p, g: kernels.sgd_step(p, g, lr=0.1, dampening=2.0), ValueError, "dampening"),
    "sgd-step-0": (lambda p, g: kernels.sgd_step(p, g, lr=0.1, momentum=0.9, velocity=np.zeros_like(p), step=0),
                   ValueError, "step"),
    "rmsprop-momentum-without-buffer": (lambda p, g: kernels.rmsprop_step(p, g, np.zeros_like(p), momentum=0.9),
                                        ValueError, "momentum_buffer"),
    "rmsprop-strided-square_avg": (lambda p, g: kernels.rmsprop_step(p, g, _strided(p)), ValueError,
                                   "square_avg"),
    "rmsprop-alpha-above-1": (lambda p, g: kernels.rmsprop_step(p, g, np.zeros_like(p), alpha=1.5), ValueError,
                              "alpha"),
    "adagrad-read-only-sum_sq": (lambda p, g: kernels.adagrad_step(p, g, _read_only(np.zeros_like(p))),
                                 ValueError, "sum_sq"),
    "adagrad-lr-inf": (lambda p, g: kernels.adagrad_step(p, g, np.zeros_like(p), lr=float("inf")), ValueError,
                       "lr"),
    "adadelta-acc_delta-shape": (lambda p, g: kernels.adadelta_step(p, g, np.zeros_like(p),
                                                                    np.zeros(3, p.dtype)), ValueError, "acc_delta"),
    "adadelta-rho-negative": (lambda p, g: kernels.adadelta_step(p, g, np.zeros_like(p), np.zeros_like(p),
                                                                 rho=-0.1), ValueError, "rho"),
}


@pytest.mark.parametrize("call, error, name", OTHER_ERRORS.values(), ids=OTHER_ERRORS)
def test_optimizers_reject_bad_arguments(call, error, name):
    param, grad = np.zeros(8, np.float32), np.ones(8, np.float32)
    with pytest.raises(error, match=rf"^{name}\b"):
        call(param, grad)
    np.testing.assert_array_equal(param, 0)


@pytest.mark.parametrize("layout", ["F", "strided", "negative", "zero"])
def test_noncontiguous_grad_is_accepted(layout):
    rng = np.random.default_rng(5)
    param, grad, m, v = (rng.standard_normal((17, 9)).astype(np.float32) for _ in range(4))
    v, grad = np.abs(v), np.ascontiguousarray(with_layout(grad, layout))  # the values the view will show
    expected = [a.copy() for a in (param, m, v)]
    kernels.adam_step(expected[0], grad, expected[1], expected[2], step=2, weight_decay=0.1)
    kernels.adam_step(param, with_layout(grad, layout), m, v, step=2, weight_decay=0.1)
    for actual, want in zip((param, m, v), expected):
        np.testing.assert_array_equal(actual, want)


# ---- the compiled loops are vectorised ----------------------------------------------------------------

@pytest.mark.slow
@needs_avx2
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_loops_are_vectorised(name, dtype):
    """Packed SIMD arithmetic on ymm/zmm registers, including packed square roots where the update
    has one: a scalar loop (say, after a ``/`` with Python's zero check) fails this. And float32 math
    for float32 buffers (a float64 literal in the loop would widen it)."""
    fn, _ = OPTIMIZERS[name]
    hyper, states = FULL_CASES[name]
    param, grad, state = _buffers(np.random.default_rng(0), (64,), dtype, states)
    with kernels.use_backend("numba"):
        fn(param, grad, **state, **hyper)
    fresh, sig = compiled_copy(getattr(optim, f"_{name}"), dtype)
    asm = fresh.inspect_asm(sig)
    if dtype == np.float32:  # float32 math throughout: no value is widened to double
        assert "fpext" not in fresh.inspect_llvm(sig)
    suffix = "ps" if dtype == np.float32 else "pd"
    assert re.search(rf"v(fmadd\d+|mul|add){suffix}\s[^\n]*[yz]mm", asm)
    if name != "sgd":
        assert re.search(rf"v(r?sqrt\d*){suffix}\s[^\n]*[yz]mm", asm)


# ---- the parallel drivers made by _parallel.chunked ---------------------------------------------------

_BODIES = """
from kernels.cpu._jit import jit
from kernels.cpu._parallel import chunked


@jit
def _add(lo, hi, x, a):
    for i in range(lo, hi):
        x[i] += a


@jit
def _mul(lo, hi, x, a):
    for i in range(lo, hi):
        x[i] *= a


_add_chunks, _mul_chunks = chunked(_add), chunked(_mul)
"""
_CALL_DRIVERS = """
import numpy as np, bodies
for name in ("add", "mul"):
    driver, x = getattr(bodies, f"_{name}_chunks"), np.full(5, 2.0)
    driver(x.size, x, 3.0)
    print(name, x[0], sum(driver.stats.cache_hits.values()))
"""


def test_chunked_drivers_are_cached_apart_and_with_their_body(tmp_path):
    """Drivers made by ``_parallel.chunked`` for two bodies of one signature: a new process loads each from
    the disk cache with its own code (not the other's: they share a template, and Numba keys the cache on
    file and name), and an edit of the bodies' file compiles them again (a cached driver holds its body)."""
    (tmp_path / "bodies.py").write_text(_BODIES)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(root), str(tmp_path)])}

    def call():
        return subprocess.run([sys.executable, "-c", _CALL_DRIVERS], env=env, capture_output=True, text=True,
                              check=True).stdout.splitlines()

    assert call() == ["add 5.0 0", "mul 6.0 0"]  # compiled
    assert call() == ["add 5.0 1", "mul 6.0 1"]  # loaded from the cache
    (tmp_path / "bodies.py").write_text(_BODIES.replace("x[i] += a", "x[i] += a + a"))
    assert call() == ["add 8.0 0", "mul 6.0 0"]  # compiled again


def test_the_optimizer_drivers_are_cached_beside_their_bodies():
    """What kernels/cpu/step.py looks up: ``_<name>_chunks``, a parallel Numba dispatcher cached on disk under
    that name in optim.py's cache (so its cache goes stale with optim.py's edits, as its body's does)."""
    for name in OPTIMIZERS:
        body, driver = getattr(optim, f"_{name}"), getattr(optim, f"_{name}_chunks")
        assert isinstance(driver, numba.core.registry.CPUDispatcher) and driver.targetoptions["parallel"]
        assert driver.py_func.__qualname__ == f"_{name}_chunks" and driver.stats.cache_path == body.stats.cache_path
        assert driver.py_func.__code__.co_filename == body.py_func.__code__.co_filename == optim.__file__
