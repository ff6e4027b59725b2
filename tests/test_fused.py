"""The fused training-step kernels (bias_act_backward, segment_norms, dense_grad_norm): every backend against
the NumPy reference over many shapes and layouts, bit-equality of the numba version with the two calls
it replaces, the parallel paths, and the public API's argument checks."""

import contextlib
import warnings

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kernels
from helpers import LAYOUTS, SIZES_1D, SIZES_2D, arrays, assert_close, reference, with_layout
from kernels.cpu.activations import PARALLEL_MIN
from kernels.cpu.fused import NORMS_PARALLEL_MIN

ACTIVATIONS = ["relu", "leaky_relu", "sigmoid", "tanh"]


def _separately(y, dy, activation, alpha):
    """dz and db by the two public kernels the fused one replaces."""
    extra = (alpha,) if activation == "leaky_relu" else ()
    dz = getattr(kernels, activation + "_backward")(y, dy, *extra)
    return dz, kernels.bias_grad(dz)


@given(data=st.data(), shape=st.tuples(SIZES_2D, SIZES_2D), activation=st.sampled_from(ACTIVATIONS))
def test_bias_act_backward_matches_reference(fast_backend, data, shape, activation):
    backend = fast_backend
    y = data.draw(arrays(shape))
    if activation in ("sigmoid", "tanh"):  # a forward output, in (0, 1) or (-1, 1), in any layout
        y = with_layout(np.tanh(y) if activation == "tanh" else 1 / (1 + np.exp(-y)), data.draw(LAYOUTS))
    dy = data.draw(arrays(shape, dtype=y.dtype))
    dz, db = kernels.bias_act_backward(backend.to(y), backend.to(dy), activation, alpha=0.2)
    ref_dz, ref_db = reference(kernels.bias_act_backward, y, dy, activation, alpha=0.2)
    assert_close(backend.get(dz), ref_dz)  # (compiled backends may contract a product into an FMA)
    atol = 4 * np.finfo(y.dtype).eps * np.abs(ref_dz).sum(axis=0).max(initial=0)  # column sums: any order
    assert_close(backend.get(db), ref_db, atol=atol)


DERIVATIVES = {"relu": lambda y: (y > 0) * 1.0, "leaky_relu": lambda y: np.where(y > 0, 1.0, 0.2),
               "sigmoid": lambda y: y * (1 - y), "tanh": lambda y: 1 - y * y}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bias_act_backward_is_the_activation_derivative_and_its_column_sums(backend, activation):
    """dz = dy * f'(z), f' written from the forward output y, and db = dz summed over the rows (float64)."""
    rng = np.random.default_rng(4)
    y = rng.standard_normal((9, 6))
    y[0, :2] = [0.0, -0.0]  # relu and leaky_relu: 0 is not positive
    if activation in ("sigmoid", "tanh"):
        y = np.tanh(y) if activation == "tanh" else 1 / (1 + np.exp(-y))
    dy = rng.standard_normal(y.shape)
    dz, db = kernels.bias_act_backward(backend.to(y), backend.to(dy), activation, alpha=0.2)
    expected = dy * DERIVATIVES[activation](y)
    np.testing.assert_allclose(backend.get(dz), expected, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(backend.get(db), expected.sum(axis=0), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", [(1, 1), (37, 19), (PARALLEL_MIN // 300 + 5, 300)])  # serial and parallel
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_numba_bias_act_backward_is_bit_identical_to_the_separate_kernels(shape, activation):
    rng = np.random.default_rng(0)
    y, dy = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    with kernels.use_backend("numba"):
        fused = kernels.bias_act_backward(y, dy, activation, alpha=0.3)
        separate = _separately(y, dy, activation, 0.3)
    for got, expected in zip(fused, separate):
        np.testing.assert_array_equal(got, expected)


def _offsets(data, n):
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=5)))
    return np.array([0, *cuts, n], np.int64)


@given(data=st.data(), n=SIZES_1D)
def test_segment_norms_match_reference(backend, data, n):
    x = data.draw(arrays((n,)))
    offsets = _offsets(data, n)
    got = backend.get(kernels.segment_norms(backend.to(x), backend.to(offsets)))
    expected = np.array([np.linalg.norm(x[a:b].astype(np.float64)) for a, b in zip(offsets[:-1], offsets[1:])])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(reference(kernels.segment_norms, x, offsets), expected, rtol=1e-12)


def test_segment_norms_parallel_path_and_special_values(fast_backend):
    n = NORMS_PARALLEL_MIN + 12345 if not fast_backend.simulated else 300
    rng = np.random.default_rng(1)
    x = rng.standard_normal(n).astype(np.float32)
    x[3] = np.float32(3e38)  # squares overflow float32, not the float64 sum
    offsets = np.array([0, 10, 10, n // 3, n - 5, n])
    x[n - 2] = np.inf
    x[n // 3 + 1] = np.nan
    got = fast_backend.get(kernels.segment_norms(fast_backend.to(x), fast_backend.to(offsets)))
    expected = reference(kernels.segment_norms, x, offsets)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert np.isfinite(got[0]) and got[0] > 3e38 and got[1] == 0 and np.isnan(got[3]) and got[4] == np.inf


def test_segment_norms_do_not_depend_on_the_thread_count():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip(f"numba has only {numba.config.NUMBA_NUM_THREADS} thread(s) here")
    x = np.random.default_rng(2).standard_normal(NORMS_PARALLEL_MIN * 3 + 7).astype(np.float32)
    offsets = np.array([0, 5, NORMS_PARALLEL_MIN * 2, x.size])
    results = []
    previous = numba.get_num_threads()
    try:
        with kernels.use_backend("numba"):
            for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
                numba.set_num_threads(threads)
                results.append(kernels.segment_norms(x, offsets))
    finally:
        numba.set_num_threads(previous)
    assert len(results) >= 2
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_numba_segment_norms_parallel_path_is_its_serial_twin_bit_for_bit():
    """Many segments of every kind (empty, inside one piece, across pieces and chunks, a prefix and a suffix
    outside them): each piece's sums go only to the segments it meets, the same sums as the serial loop's."""
    from kernels.cpu import fused

    rng = np.random.default_rng(3)
    x = rng.standard_normal(NORMS_PARALLEL_MIN + 5000).astype(np.float32)
    cuts = np.sort(rng.integers(7, x.size - 7, 300))
    offsets = np.concatenate([[7], cuts, cuts[:5], [fused.PIECE * 40, fused.PIECE * 40 + 1], [x.size - 7]])
    offsets = np.sort(offsets).astype(np.int64)  # repeated cuts: empty segments
    parallel, serial = np.empty(offsets.size - 1), np.empty(offsets.size - 1)
    fused.segment_norms(x, offsets, parallel)
    fused.segment_norms_serial(x, offsets, serial)
    assert parallel.tobytes() == serial.tobytes()
    expected = [np.linalg.norm(x[a:b].astype(np.float64)) for a, b in zip(offsets[:-1], offsets[1:])]
    np.testing.assert_allclose(parallel, expected, rtol=1e-12)


@given(data=st.data(), n=st.integers(0, 300))
def test_numba_sum_of_squares_takes_its_documented_order(data, n):
    """``_sum_squares``: 8 x 4 float64 partial sums over blocks of 32 elements, the sums then the lanes added
    pairwise, the rest one by one, whatever the offset. The square of a float32 is exact in float64, so an
    FMA is the add below; any reordering (fast-math, LLVM's choice where it inlines) would show."""
    from kernels.cpu import fused

    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    lo = data.draw(st.integers(0, 40))
    x = (rng.standard_normal(lo + n) * np.exp2(rng.integers(-20, 20, lo + n))).astype(np.float32)
    squares = x[lo:].astype(np.float64) ** 2
    blocks = n // fused.SQUARE_BLOCK
    acc = np.zeros(fused.SQUARE_BLOCK)
    for b in range(blocks):
        acc = acc + squares[b * fused.SQUARE_BLOCK:(b + 1) * fused.SQUARE_BLOCK]
    partial = list(acc.reshape(fused.SQUARE_SUMS, fused.SQUARE_LANES))
    while len(partial) > 1:
        partial = [partial[j] + partial[j + 1] for j in range(0, len(partial), 2)]
    lanes = list(partial[0])
    while len(lanes) > 1:
        lanes = [lanes[j] + lanes[j + 1] for j in range(0, len(lanes), 2)]
    total = lanes[0]
    for v in squares[blocks * fused.SQUARE_BLOCK:]:
        total = total + v
    assert fused._sum_squares(x, lo, lo + n).hex() == float(total).hex()


# ---- dense_grad_norm -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _simulator_quiet(backend):
    """The CUDA simulator runs kernels as NumPy scalar code, which warns at inf * 0 or a float32 overflow where a
    GPU (and the host backends) give NaN or inf silently: in its kernel threads too, so a filter, not errstate."""
    with warnings.catch_warnings():
        if backend.simulated:
            warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _grad_norm(backend, x, dy, bias_grad=None, **kwargs):
    with _simulator_quiet(backend):
        return backend.get(kernels.dense_grad_norm(backend.to(x), backend.to(dy), backend.to(bias_grad), **kwargs))


@given(data=st.data(), rows=st.integers(0, 4), k=st.integers(0, 40), n=st.integers(0, 40),
       dtype=st.sampled_from([np.float32, np.float64]), bias=st.booleans(), out=st.booleans())
def test_dense_grad_norm_is_the_norm_of_the_exact_product(backend, data, rows, k, n, dtype, bias, out):
    """In any layout (the API makes the operands contiguous), with and without the bias: the norm of the exact
    product, ``sqrt(||x^T dy||^2 + ||db||^2)`` in float64. The squares' error is float64 rounding of the Gram
    entries and their sum, bounded by ``(K + N + B^2 + 4) eps scale`` where ``scale = (sum_r ||x_r|| ||dy_r||)^2
    + ||db||^2``: a relative error of ~1e-14 unless the rows cancel in dW (scale >> ||dW||^2; a plain rtol of
    1e-12 fails there: random float32 draws at K = N = 1 reach 1e-11, and 3e-9 against the exact value)."""
    if backend.simulated:
        k, n = k % 13, n % 13  # every GPU thread is a Python thread
    x, dy = data.draw(arrays((rows, k), dtype=dtype)), data.draw(arrays((rows, n), dtype=dtype))
    db = data.draw(arrays((n,), dtype=dtype)) if bias else None
    buffer = backend.to(np.full(1, 7.0)) if out else None
    got = _grad_norm(backend, x, dy, db, out=buffer)
    assert got.shape == (1,) and got.dtype == np.float64
    if out:
        np.testing.assert_array_equal(backend.get(buffer), got)
    x64, d64 = x.astype(np.float64), dy.astype(np.float64)
    b64 = np.zeros(0) if db is None else db.astype(np.float64)
    expected = np.sqrt(np.sum((x64.T @ d64) ** 2) + np.sum(b64 ** 2))
    scale = np.sum(np.linalg.norm(x64, axis=1) * np.linalg.norm(d64, axis=1)) ** 2 + np.sum(b64 ** 2)
    assert abs(got[0] ** 2 - expected ** 2) <= (k + n + rows * rows + 4) * np.finfo(np.float64).eps * scale, (
        got[0], expected)


def _special_cases():
    f32, inf, nan = np.float32, np.inf, np.nan
    return {  # name: (x, dy, bias_grad, the norm)
        "float32 product overflows": (np.full((1, 3), 1e20, f32), np.full((1, 2), 1e20, f32), None, inf),
        "float64 product overflows": (np.full((2, 2), 1e200), np.full((2, 3), 1e200), None, inf),
        "inf times zero": (np.array([[inf, 1]], f32), np.array([[0, 2]], f32), None, nan),
        "nan in x": (np.array([[1, nan], [2, 3]], f32), np.ones((2, 2), f32), None, nan),
        "nan in dy, float64": (np.ones((2, 2)), np.array([[1, 2], [nan, 3]]), None, nan),
        "inf in x, nonzero partner": (np.array([[inf, 1], [1, 1]], f32), np.array([[2, 3], [1, 1]], f32), None, inf),
        "inf in dy, nonzero partner": (np.array([[2.0, 3.0]]), np.array([[1, -inf, 2]]), None, inf),
        "inf in the bias": (np.ones((1, 2), f32), np.ones((1, 2), f32), np.array([1, inf], f32), inf),
        "nan in the bias": (np.ones((1, 2), f32), np.ones((1, 2), f32), np.array([nan, 1], f32), nan),
    }


@pytest.mark.parametrize("case", list(_special_cases()))
def test_dense_grad_norm_special_values_are_those_of_the_formed_gradient(backend, case):
    """Where an input is not finite or dW overflows x's dtype, the norm is that of dW as the dtype computes it,
    silently (no RuntimeWarning)."""
    x, dy, db, expected = _special_cases()[case]
    got = _grad_norm(backend, x, dy, db)
    np.testing.assert_array_equal(got, [expected])


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 2), (2, 3, 2)], ids=lambda s: "x".join(map(str, s)))
def test_dense_grad_norm_near_float32_overflow_is_finite(backend, shape):
    """Elements of dW just below float32's largest (3e38): finite, the norm of the float32 product as NumPy forms
    it. (1, 1, 1) is within ``factor_limit`` (the factors), the others' bound is not (the exact path)."""
    rows, k, n = shape
    x = np.full((rows, k), 1.5e19, np.float32)
    dy = np.full((rows, n), 2e19, np.float32)
    dy[1:] = 0  # a second row adds nothing (3e38 twice would overflow) but the bound counts it
    got = _grad_norm(backend, x, dy)
    assert np.isfinite(got[0])
    np.testing.assert_allclose(got, [np.linalg.norm((x.T @ dy).astype(np.float64))], rtol=1e-6)


def test_dense_grad_norm_float64_rows_outside_the_trusted_range_take_the_exact_path(backend):
    """A row's sum of squares below 2^-480 (but not 0): its Gram products would leave float64's normal range,
    so the norm is the exact path's (dW formed in float64): the reference's, and for 3e-162 (whose square is a
    subnormal 9.88e-324, 10% off) x 1e70 the product 3e-92 itself, where the factors would give 3.14e-92."""
    rng = np.random.default_rng(5)
    x, dy = rng.standard_normal((2, 3)), rng.standard_normal((2, 4))
    x[0] = 1e-100  # squares 1e-200, summed 3e-200 < 2^-480 = 3.2e-145
    got = _grad_norm(backend, x, dy)
    np.testing.assert_allclose(got, reference(kernels.dense_grad_norm, x, dy), rtol=1e-14)
    np.testing.assert_allclose(got, [np.linalg.norm(x.T @ dy)], rtol=1e-14)
    got = _grad_norm(backend, np.array([[3e-162]]), np.array([[1e70]]))
    np.testing.assert_allclose(got, [3e-92], rtol=1e-15)
    # squares that round to 0 are not a row of zeros: 1e-170 x 1e70 is 1e-100, not 0
    got = _grad_norm(backend, np.array([[1e-170, 0]]), np.array([[1e70]]))
    np.testing.assert_allclose(got, [1e-100], rtol=1e-15)
    assert _grad_norm(backend, np.zeros((2, 3)), dy)[0] == 0  # rows of zeros: the factors, exactly 0


@pytest.mark.parametrize("rows", [1, 2])
def test_numba_dense_grad_norm_is_the_formed_float32_gradients_norm_within_its_rounding(rows):
    """784 x 128 (a first Dense layer's dW) at batch 1 and 2: the norm of the exact product differs from that of
    the float32 dW that matmul forms only by dW's rounding (documented): rtol 1e-6."""
    rng = np.random.default_rng(6)
    x, dy = rng.standard_normal((rows, 784)).astype(np.float32), rng.standard_normal((rows, 128)).astype(np.float32)
    db = rng.standard_normal(128).astype(np.float32)
    with kernels.use_backend("numba"):
        got = kernels.dense_grad_norm(x, dy, db)
        formed = np.concatenate([kernels.matmul(x, dy, trans_a=True).ravel(), db]).astype(np.float64)
    np.testing.assert_allclose(got, [np.linalg.norm(formed)], rtol=1e-6)


def test_dense_grad_norm_bad_arguments_raise_naming_them():
    x, dy = np.ones((3, 4), np.float32), np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"^dy must have as many rows as x \(3\), got shape \(2, 2\)"):
        kernels.dense_grad_norm(x, dy[:2])
    with pytest.raises(ValueError, match=r"^bias_grad must have shape \(2,\)"):
        kernels.dense_grad_norm(x, dy, np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"^bias_grad must be 1-D"):
        kernels.dense_grad_norm(x, dy, np.ones((1, 2), np.float32))
    with pytest.raises(TypeError, match=r"^dy must have the same dtype as x \(float32\)"):
        kernels.dense_grad_norm(x, dy.astype(np.float64))
    with pytest.raises(TypeError, match=r"^bias_grad must have the same dtype as x \(float32\)"):
        kernels.dense_grad_norm(x, dy, np.ones(2, np.float64))
    with pytest.raises(ValueError, match=r"^x must be 2-D"):
        kernels.dense_grad_norm(np.ones(4, np.float32), dy)
    with pytest.raises(ValueError, match=r"^dy must be 2-D"):
        kernels.dense_grad_norm(x, np.ones(3, np.float32))
    with pytest.raises(TypeError, match=r"^x must have dtype float32 or float64"):
        kernels.dense_grad_norm(x.astype(np.int32), dy)
    with pytest.raises(TypeError, match="^out must have dtype float64"):
        kernels.dense_grad_norm(x, dy, out=np.zeros(1, np.float32))


def test_bad_arguments_raise_naming_them():
    y = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="^activation must be one of"):
        kernels.bias_act_backward(y, y, "softmax")
    with pytest.raises(ValueError, match=r"^dy must have shape \(3, 4\)"):
        kernels.bias_act_backward(y, y[:2], "relu")
    with pytest.raises(TypeError, match=r"^dy must have the same dtype as y"):
        kernels.bias_act_backward(y, y.astype(np.float64), "relu")
    with pytest.raises(TypeError, match="^bias_out must have dtype float32"):
        kernels.bias_act_backward(y, y, "relu", bias_out=np.zeros(4, np.float64))
    with pytest.raises(ValueError, match="^out must not share memory with y"):
        kernels.bias_act_backward(y, y.copy(), "relu", out=y)
    x = np.ones(10, np.float32)
    with pytest.raises(TypeError, match="^offsets must be an integer array"):
        kernels.segment_norms(x, np.array([0.0, 10.0]))
    with pytest.raises(ValueError, match=r"^offsets must be non-decreasing within \[0, 10\]"):
        kernels.segment_norms(x, np.array([0, 11]))
    with pytest.raises(ValueError, match="^offsets must be non-decreasing"):
        kernels.segment_norms(x, np.array([0, 5, 3, 10]))
    with pytest.raises(ValueError, match=r"^x must be 1-D"):
        kernels.segment_norms(np.ones((2, 5), np.float32), np.array([0, 10]))


def test_leaky_relu_slope_read_from_the_output_must_not_be_negative(backend):
    """bias_act_backward reads leaky_relu's derivative from y > 0, which is x > 0 only for alpha >= 0 (with
    alpha = -0.5 it gave dz [1, 1] for x = [-2, 3], not [-0.5, 1]): a negative slope is refused there and
    in the matmul epilogue it is the backward of; leaky_relu_backward, from x, takes any slope."""
    x, dy = backend.to(np.array([[-2.0, 3.0]], np.float32)), backend.to(np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match=r"^alpha must be a finite number in \[0, inf\), got -0.5"):
        kernels.bias_act_backward(kernels.leaky_relu(x, -0.5), dy, "leaky_relu", alpha=-0.5)
    with pytest.raises(ValueError, match=r"^alpha must be a finite number in \[0, inf\)"):
        kernels.matmul(x, backend.to(np.eye(2, dtype=np.float32)), activation="leaky_relu", alpha=-0.5)
    np.testing.assert_array_equal(backend.get(kernels.leaky_relu_backward(x, dy, -0.5)), [[-0.5, 1.0]])
    dz, _ = kernels.bias_act_backward(kernels.leaky_relu(x, 0.0), dy, "leaky_relu", alpha=0.0)
    np.testing.assert_array_equal(backend.get(dz), [[0.0, 1.0]])


def test_parallel_kernels_thread_only_their_pranges():
    """``_jit.jit(parallel=True)`` makes a parallel loop of each ``prange`` and of nothing else, for every signature:
    an array expression or slice assignment made parallel would run one element per task under
    ``_parallel.dynamic`` (bias_act_backward's ``db[:] = 0``: 3.7x slower at 256x1024)."""
    import numba

    from kernels.cpu._jit import jit

    def body(x):
        y = x * 2  # an array expression
        y[:] = 0  # a slice assignment
        for i in numba.prange(x.size):
            y[i] += x[i]
        return y

    options = {k: v for k, v in jit(parallel=True)(body).targetoptions.items() if k != "nopython"}
    kernel = numba.njit(**options)(body)  # the same options, without the on-disk cache
    for dtype in (np.float32, np.float64):  # a second signature compiles with the same options
        np.testing.assert_array_equal(kernel(np.arange(5, dtype=dtype)), np.arange(5, dtype=dtype))
    assert [len(cres.metadata["parfor_diagnostics"].initial_parfors) for cres in kernel.overloads.values()] == [1, 1]
