"""The fused training-step kernels (bias_act_backward, segment_norms): every backend against the
NumPy reference over many shapes and layouts, bit-equality of the numba version with the two calls
it replaces, the parallel paths, and the public API's argument checks."""

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kernels
from helpers import LAYOUTS, SIZES_1D, SIZES_2D, arrays, assert_close, reference, with_layout
from kernels.cpu.activations import PARALLEL_MIN
from kernels.cpu import _small, fused
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


@numba.njit(fastmath=False)
def _outer_squares_once(x, at, rows, dz, out):
    return fused.outer_squares(x.ctypes.data + at * x.itemsize, x.shape[1], x.shape[0], dz.ctypes.data, rows,
                               dz.shape[1], out.ctypes.data, out)


@numba.njit(fastmath=False)
def _outer_then_squares(x, at, rows, dz, out):
    _small._outer(x.ctypes.data + at * x.itemsize, 1, x.shape[1], dz.ctypes.data, dz.shape[1], x.shape[0],
                  out[:rows * dz.shape[1]].reshape(rows, dz.shape[1]))
    return fused._sum_squares(out, 0, rows * dz.shape[1])


@given(data=st.data(), dtype=st.sampled_from(["float32", "float64"]), k=st.sampled_from([1, 2]),
       rows=st.integers(0, 20), blocks=st.integers(1, 5))
def test_outer_squares_is_the_outer_product_and_its_sum_of_squares_in_one_pass(data, dtype, k, rows, blocks):
    """``outer_squares`` (the compiled step's batch-one product and squares of a piece): the same elements as
    the ``rows`` route's outer product (FMA chains from zero: -0 products give +0) and the same sum as
    ``_sum_squares`` of them, bit for bit, at K 1 and 2, both dtypes, rows of 1-5 blocks of 32."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    n, width = blocks * fused.SQUARE_BLOCK, rows + 3
    x = (rng.standard_normal((k, width)) * (rng.random((k, width)) > 0.2)).astype(dtype)  # zeros: signed products
    dz = rng.standard_normal((k, n)).astype(dtype)
    at = data.draw(st.integers(0, 3))  # the piece's first row of dW
    got, expected = np.full(rows * n + 1, 7, dtype), np.full(rows * n + 1, 7, dtype)  # the last one untouched
    total = _outer_squares_once(x, at, rows, dz, got)
    assert total.hex() == _outer_then_squares(x, at, rows, dz, expected).hex()
    assert got.tobytes() == expected.tobytes()


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
