"""Losses and bias_grad: every backend against the NumPy reference, gradients against finite
differences, numerically hard inputs, the parallel path, and the public API's argument checks."""

import re

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import kernels
from helpers import DTYPES, SIZES_1D, SIZES_2D, TOL, arrays, assert_close, numeric_grad, reference
from kernels.cpu.activations import PARALLEL_MIN
from test_activations import PLACED_SHAPES, SEEDS, results_by_placement, simulator_quiet

POSITIVE_2D = SIZES_2D.filter(bool)
SHAPES = st.one_of(SIZES_1D.filter(bool).map(lambda n: (n,)), st.tuples(POSITIVE_2D, POSITIVE_2D))
LABEL_DTYPES = st.sampled_from([np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64])


def _loss(backend, fn, pred, target):
    """(loss, gradient) on the host. Host backends return the loss as a NumPy scalar of the input dtype
    (checked here), the cuda backend as a 0-d device array (no synchronisation)."""
    loss, grad = fn(backend.to(pred), backend.to(target))
    if not backend.is_cuda:
        assert type(loss) is np.dtype(pred.dtype).type
    return backend.get(loss)[()], backend.get(grad)


def _targets(name, rng, shape, dtype):
    if name == "hinge":
        return np.where(rng.random(shape) < 0.5, -1, 1).astype(dtype)
    if name == "binary_cross_entropy":
        return rng.random(shape).astype(dtype)  # probabilities in [0, 1]
    return (rng.standard_normal(shape) * 3).astype(dtype)


POINTWISE = {"mse": kernels.mse, "binary_cross_entropy": kernels.binary_cross_entropy, "hinge": kernels.hinge}


def _assert_loss(loss, expected, dtype):
    assert loss.dtype == dtype
    assert_close(loss, expected, dtype=dtype)


# ---- every backend against the reference ------------------------------------------------------------

@given(data=st.data(), shape=st.tuples(POSITIVE_2D, POSITIVE_2D), label_dtype=LABEL_DTYPES)
def test_softmax_cross_entropy_matches_reference(fast_backend, data, shape, label_dtype):
    logits = data.draw(arrays(shape, scale=5.0))
    labels = np.random.default_rng(data.draw(st.integers(0, 99))).integers(0, shape[1], shape[0])
    labels = labels.astype(label_dtype)
    loss, dlogits = _loss(fast_backend, kernels.softmax_cross_entropy, logits, labels)
    expected_loss, expected = reference(kernels.softmax_cross_entropy, logits, labels)
    _assert_loss(loss, expected_loss, logits.dtype)
    assert_close(dlogits, expected)
    assert_close(dlogits.sum(axis=1), np.zeros(shape[0]), dtype=logits.dtype,
                 atol=4 * np.finfo(logits.dtype).eps)  # softmax minus one-hot: each row sums to 0


@pytest.mark.parametrize("name", POINTWISE)
@given(data=st.data(), shape=SHAPES)
def test_pointwise_loss_matches_reference(fast_backend, name, data, shape):
    pred = data.draw(arrays(shape))
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    target = _targets(name, rng, shape, pred.dtype)
    loss, grad = _loss(fast_backend, POINTWISE[name], pred, target)
    expected_loss, expected = reference(POINTWISE[name], pred, target)
    _assert_loss(loss, expected_loss, pred.dtype)
    assert_close(grad, expected)


@given(data=st.data(), shape=st.tuples(SIZES_2D, SIZES_2D))
def test_bias_grad_matches_reference(fast_backend, data, shape):
    dy = data.draw(arrays(shape))
    got = fast_backend.get(kernels.bias_grad(fast_backend.to(dy)))
    # column sums are added in another order: allow rounding proportional to the sum of |dy|
    atol = 4 * np.finfo(dy.dtype).eps * np.abs(dy).sum(axis=0).max(initial=0)
    assert_close(got, reference(kernels.bias_grad, dy), atol=atol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parallel_path_matches_reference(dtype):
    """Sizes above PARALLEL_MIN run in parallel chunks with partial sums (odd sizes: partial last chunks)."""
    rng = np.random.default_rng(3)
    n = PARALLEL_MIN + 1001
    pred = (rng.standard_normal(n) * 3).astype(dtype)
    cases = [(fn, pred, _targets(name, rng, n, dtype)) for name, fn in POINTWISE.items()]
    logits = (rng.standard_normal((PARALLEL_MIN // 997 + 2, 997)) * 3).astype(dtype)
    cases.append((kernels.softmax_cross_entropy, logits, rng.integers(0, 997, logits.shape[0])))
    tol = {**TOL[np.dtype(dtype)], "rtol": 50 * TOL[np.dtype(dtype)]["rtol"]}  # long sums, other order
    for fn, a, b in cases:
        with kernels.use_backend("numba"):
            loss, grad = fn(a, b)
        expected_loss, expected = reference(fn, a, b)
        assert_close(loss, expected_loss, dtype=dtype, **tol)
        assert_close(grad, expected)
    with kernels.use_backend("numba"):
        bias = kernels.bias_grad(logits)
    atol = 4 * np.finfo(dtype).eps * np.abs(logits).sum(axis=0).max()
    assert_close(bias, reference(kernels.bias_grad, logits), atol=atol)


# ---- results that depend only on the values, not on where the buffers sit ----------------------------

@given(shape=PLACED_SHAPES, dtype=DTYPES, seed=SEEDS)
@example(shape=(3, 4), dtype=np.float32, seed=0)  # exp-and-sum in one loop rounded differently here
def test_softmax_cross_entropy_does_not_depend_on_where_the_buffers_sit(shape, dtype, seed):
    """Loss and dlogits bit for bit the same with dlogits 0-16 elements after the logits and far from them
    (a loop that stored and summed at once ran LLVM's scalar version when they were close, which sums
    in another order: 119 of 200 random 3x4 float32 cases rounded differently)."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(shape) * 5).astype(dtype)
    labels = rng.integers(0, shape[1], shape[0])
    seen = results_by_placement(lambda x, out: kernels.softmax_cross_entropy(x, labels, out=out), [logits])
    assert len(seen) == 1, list(seen.values())


@pytest.mark.parametrize("name", POINTWISE)
@given(size=st.one_of(st.integers(1, 40), st.sampled_from([64, 255, 1000, 4099])), dtype=DTYPES, seed=SEEDS)
def test_pointwise_loss_does_not_depend_on_where_the_buffers_sit(name, size, dtype, seed):
    """The gradient after pred or after target at every offset, far from both, or written in place over
    either: the same loss and gradient bit for bit."""
    rng = np.random.default_rng(seed)
    pred = (rng.standard_normal(size) * 3).astype(dtype)
    target = _targets(name, rng, size, dtype)
    seen = results_by_placement(POINTWISE[name], [pred, target])
    for inplace in range(2):
        args = [pred.copy(), target.copy()]
        with kernels.use_backend("numba"):
            loss, grad = POINTWISE[name](*args, out=args[inplace])
        seen.setdefault(loss.tobytes() + grad.tobytes(), []).append(("in place", inplace))
    assert len(seen) == 1, list(seen.values())


# ---- gradients against finite differences (float64) -------------------------------------------------

def test_softmax_cross_entropy_gradient(backend):
    rng = np.random.default_rng(5)
    logits, labels = rng.standard_normal((4, 6)) * 2, np.array([0, 5, 2, 2])

    def loss(x):
        return float(_loss(backend, kernels.softmax_cross_entropy, x, labels)[0])

    _, dlogits = _loss(backend, kernels.softmax_cross_entropy, logits, labels)
    np.testing.assert_allclose(dlogits, numeric_grad(loss, logits), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", POINTWISE)
def test_pointwise_loss_gradient(backend, name):
    rng = np.random.default_rng(6)
    pred = rng.standard_normal((3, 5)) * 2
    target = _targets(name, rng, pred.shape, np.float64)
    if name == "hinge":  # keep the margins 1 - t * s away from the kink at 0
        margin = 1 - target * pred
        pred += np.where(np.abs(margin) < 0.1, 0.2 * target, 0)

    def loss(x):
        return float(_loss(backend, POINTWISE[name], x, target)[0])

    _, grad = _loss(backend, POINTWISE[name], pred, target)
    np.testing.assert_allclose(grad, numeric_grad(loss, pred), rtol=1e-6, atol=1e-9)


# ---- the pointwise losses against their textbook formulas (float64) ----------------------------------

def _formula_case(shape=(6, 7), seed=9):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape) * 3, rng


def test_mse_is_the_mean_squared_error(backend):
    """The mean over all elements of (p - t)**2, and its gradient 2 (p - t) / n."""
    pred, rng = _formula_case()
    target = rng.standard_normal(pred.shape) * 3
    loss, grad = _loss(backend, kernels.mse, pred, target)
    np.testing.assert_allclose(loss, np.mean((pred - target) ** 2), rtol=1e-13)
    np.testing.assert_allclose(grad, 2 * (pred - target) / pred.size, rtol=1e-13, atol=1e-16)


def test_hinge_is_the_mean_hinge_loss(backend):
    """The mean over all elements of max(0, 1 - t s) for targets t = ±1, and its (sub)gradient -t / n where
    the margin is positive, else 0; some margins on each side."""
    scores, rng = _formula_case()
    target = rng.choice([-1.0, 1.0], scores.shape)
    scores[0, :3] = target[0, :3] * np.array([1.5, 0.25, -0.5])  # margins -0.5, 0.75 and 1.5
    loss, grad = _loss(backend, kernels.hinge, scores, target)
    margin = 1 - target * scores
    assert (margin > 0).any() and (margin < 0).any()
    np.testing.assert_allclose(loss, np.mean(np.maximum(0, margin)), rtol=1e-13)
    np.testing.assert_array_equal(grad, np.where(margin > 0, -target / scores.size, 0))


def test_binary_cross_entropy_matches_torch(backend):
    """Mean binary cross-entropy of logits against probability targets, and its gradient, as torch's
    ``binary_cross_entropy_with_logits`` (mean reduction) computes them, moderate and large logits."""
    torch = pytest.importorskip("torch")
    logits, rng = _formula_case()
    logits[0, :4] = [30.0, -30.0, 80.0, -80.0]
    target = rng.random(logits.shape)
    target[1, :2] = [0.0, 1.0]
    loss, grad = _loss(backend, kernels.binary_cross_entropy, logits, target)
    s = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(s, torch.tensor(target, dtype=torch.float64))
    expected.backward()
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-13)
    np.testing.assert_allclose(grad, s.grad.numpy(), rtol=1e-12, atol=1e-18)


def test_bias_grad_is_the_gradient_of_a_bias(backend):
    rng = np.random.default_rng(8)
    dy, x = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))

    def objective(b):
        return float(np.sum((x + b) * dy))  # a bias b added to every row of x

    got = backend.get(kernels.bias_grad(backend.to(dy)))
    np.testing.assert_allclose(got, numeric_grad(objective, np.zeros(3)), rtol=1e-6)


# ---- numerically hard inputs --------------------------------------------------------------------------

HUGE = {np.float32: 3e38, np.float64: 1.7e308}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_of_huge_logits(fast_backend, dtype):
    """Finite loss and exact gradients where naive exp would overflow, silently (warnings are errors;
    the reference warns about x - max(x) overflowing for the row spanning the float range)."""
    huge = HUGE[dtype]
    logits = np.array([[1e4, -1e4, 0.0], [huge, -huge, 0.0], [-1e4, -1e4, -1e4]], dtype)
    labels = np.array([2, 0, 1], np.int64)
    with simulator_quiet(fast_backend):
        loss, dlogits = _loss(fast_backend, kernels.softmax_cross_entropy, logits, labels)
    # row losses: 1e4 (label 1e4 below the max), 0 (label at the max), log(3)
    _assert_loss(loss, (1e4 + 0 + np.log(3)) / 3, dtype)
    third = 1 / 3
    expected = np.array([[1, 0, -1], [0, 0, 0], [1 / 3, 1 / 3 - 1, 1 / 3]]) * third
    assert_close(dlogits, expected, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binary_cross_entropy_of_huge_logits(backend, dtype):
    huge = HUGE[dtype]
    logits = np.array([1e4, -1e4, huge, -huge, 0.0], dtype)
    target = np.array([1, 0, 1, 0, 1], dtype)
    with simulator_quiet(backend):
        loss, grad = _loss(backend, kernels.binary_cross_entropy, logits, target)
    _assert_loss(loss, np.log(2) / 5, dtype)  # only the logit 0 costs anything: log 2
    assert_close(grad, np.array([0, 0, 0, 0, -0.5]) / 5, dtype=dtype)


@pytest.mark.parametrize("name", POINTWISE)
def test_nan_propagates_into_loss_and_gradient(fast_backend, name):
    pred = np.array([np.nan, 0.5, -1.0], np.float32)
    target = np.array([1.0, -1.0, 1.0], np.float32) if name == "hinge" else np.array([1.0, 0.0, 1.0], np.float32)
    loss, grad = _loss(fast_backend, POINTWISE[name], pred, target)
    expected_loss, expected = reference(POINTWISE[name], pred, target)
    assert np.isnan(loss) and np.isnan(expected_loss)
    np.testing.assert_array_equal(np.isnan(grad), np.isnan(expected))


def test_softmax_cross_entropy_labels_at_the_class_bounds(fast_backend):
    logits = np.arange(12, dtype=np.float32).reshape(3, 4)
    labels = np.array([0, 3, 3], np.uint8)
    loss, dlogits = _loss(fast_backend, kernels.softmax_cross_entropy, logits, labels)
    expected_loss, expected = reference(kernels.softmax_cross_entropy, logits, labels)
    _assert_loss(loss, expected_loss, np.float32)
    assert_close(dlogits, expected)


# ---- argument checks of the public API ----------------------------------------------------------------

f32 = np.ones((2, 3), np.float32)


@pytest.mark.parametrize("call, exc, names", [
    (lambda: kernels.softmax_cross_entropy(f32, np.array([0, 1.0])), TypeError, ["labels", "float64"]),
    (lambda: kernels.softmax_cross_entropy(f32, np.array([0, 3])), ValueError, ["labels", "[0, 3)"]),
    (lambda: kernels.softmax_cross_entropy(f32, np.array([-1, 0])), ValueError, ["labels", "[-1, 0]"]),
    (lambda: kernels.softmax_cross_entropy(f32, np.array([0, 1, 2])), ValueError, ["labels", "(2,)"]),
    (lambda: kernels.softmax_cross_entropy(np.ones((0, 3), np.float32), np.zeros(0, int)), ValueError,
     ["logits", "empty"]),
    (lambda: kernels.softmax_cross_entropy(np.ones(3, np.float32), np.zeros(3, int)), ValueError,
     ["logits", "2-D"]),
    (lambda: kernels.softmax_cross_entropy(np.ones((2, 3), np.int64), np.zeros(2, int)), TypeError,
     ["logits", "int64"]),
    (lambda: kernels.softmax_cross_entropy(f32, np.zeros(2, int), out=np.empty((3, 2), np.float32)),
     ValueError, ["out", "(3, 2)"]),
    (lambda: kernels.mse(f32, np.ones((3, 2), np.float32)), ValueError, ["target", "(2, 3)"]),
    (lambda: kernels.mse(f32, np.ones((2, 3))), TypeError, ["target", "float64"]),
    (lambda: kernels.mse(np.ones((0, 3), np.float32), np.ones((0, 3), np.float32)), ValueError,
     ["pred", "empty"]),
    (lambda: kernels.binary_cross_entropy(f32, f32, out=np.empty(6, np.float32)), ValueError, ["out", "(6,)"]),
    (lambda: kernels.hinge(f32, np.zeros((2, 3), np.float32)), ValueError, ["target", "-1 and +1"]),
    (lambda: kernels.bias_grad(np.ones(3, np.float32)), ValueError, ["dy", "2-D"]),
    (lambda: kernels.bias_grad(f32, out=np.empty(2, np.float32)), ValueError, ["out", "(3,)"]),
])
def test_bad_arguments_are_named(call, exc, names):
    """The message starts with the offending argument's name and quotes the other fragments."""
    with pytest.raises(exc, match=rf"^{re.escape(names[0])}\b") as info:
        call()
    for fragment in names[1:]:
        assert fragment in str(info.value)


@pytest.mark.parametrize("call", [
    lambda out: kernels.softmax_cross_entropy(f32, np.zeros(2, int), out=out),
    lambda out: kernels.mse(f32, f32, out=out),
])
def test_read_only_out_is_refused_before_writing(call):
    out = np.full((2, 3), 7.0, np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        call(out)
    assert (out == 7).all()
