"""The small-M routes of the CPU GEMM (kernels.cpu._small): each route called directly against the NumPy
reference over shapes around its vectors and tiles (empty, one, odd, several K blocks), the operand layouts
each accepts (contiguous, strided, reversed, stride 0), bias and every activation, float32 and float64,
every register-tile variant; the choice (``route``); and ``kernels.matmul`` on shapes that take each route,
in all four transpose combinations."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kernels
from helpers import DTYPES
from kernels.cpu import _gemm, _small

from test_matmul import ACTIVATIONS, assert_gemm_close

# around the row kernel's 64 / 32 columns and its one-vector tail, the 6 x 16 tiles, the 2 x 5 dot tiles
SIDES = st.sampled_from([0, 1, 2, 3, 5, 7, 8, 9, 13, 17, 33, 63, 64, 65, 130])
ROW_COUNTS = st.sampled_from([0, 1, 2, 3, 6, 7, 13])
DEPTHS = st.sampled_from([0, 1, 2, 7, 8, 9, 33, 70, 257])


def _rows_contiguous(x, how):
    """``x`` as a view whose rows are contiguous: C order, a column window of a wider array, rows reversed,
    or every row the first one (row stride 0; for A only, where no value is compared against its own)."""
    if how == "window":
        wide = np.zeros((x.shape[0], x.shape[1] + 5), x.dtype)
        wide[:, 2:2 + x.shape[1]] = x
        return wide[:, 2:2 + x.shape[1]]
    if how == "reversed":
        return np.ascontiguousarray(x[::-1])[::-1]
    if how == "zero" and x.shape[0] > 1:
        return np.broadcast_to(x[:1], x.shape)
    return np.ascontiguousarray(x)


ROW_LAYOUTS = st.sampled_from(["C", "window", "reversed", "zero"])
ANY_LAYOUTS = st.sampled_from(["C", "F", "window", "reversed", "zero"])


def _layout(x, how):
    return np.asfortranarray(x) if how == "F" else _rows_contiguous(x, how)


def _operands(data, m, k, n, dtype, a_layouts, b_layouts, b_transposed):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    a = _layout((rng.standard_normal((m, k)) / np.sqrt(max(k, 1))).astype(dtype), data.draw(a_layouts))
    if b_transposed:  # B^T's rows contiguous: b is a transposed view
        b = _layout(rng.standard_normal((n, k)).astype(dtype), data.draw(b_layouts)).T
    else:
        b = _layout(rng.standard_normal((k, n)).astype(dtype), data.draw(b_layouts))
    bias = rng.standard_normal(n).astype(dtype) if data.draw(st.booleans()) else None
    return a, b, bias


def _strides(x):
    return tuple(s // x.itemsize for s in x.strides)


def _epilogue_args(data, bias, dtype):
    activation = data.draw(st.sampled_from(ACTIVATIONS))
    alpha = data.draw(st.sampled_from([0.01, 0.3]))
    return (np.empty(0, dtype) if bias is None else bias), activation, alpha


def _check(out, a, b, bias, activation, alpha):
    assert_gemm_close(out, np.ascontiguousarray(a), np.ascontiguousarray(b), bias, False, False,
                      activation=activation, alpha=alpha)


@given(data=st.data(), m=ROW_COUNTS, k=DEPTHS, n=SIDES, dtype=DTYPES)
def test_rows(data, m, k, n, dtype):
    """One-row register tiles over B's rows in place: A in any layout, B's rows contiguous."""
    a, b, bias = _operands(data, m, k, n, dtype, ANY_LAYOUTS, ROW_LAYOUTS, False)
    bias_, activation, alpha = _epilogue_args(data, bias, dtype)
    out = np.full((m, n), np.nan, dtype)  # every element must be written
    (sa_i, sa_k), (sb_k, _) = _strides(a), _strides(b)
    _small.rows(a.ctypes.data, sa_i, sa_k, b.ctypes.data, sb_k, 1, k, bias_, _gemm.ACTIVATION_CODES[activation], alpha,
                out)
    _check(out, a, b, bias, activation, alpha)


@given(data=st.data(), m=ROW_COUNTS, k=DEPTHS, n=SIDES, dtype=DTYPES, variant=st.sampled_from([0, 1, 2]))
def test_dots(data, m, k, n, dtype, variant):
    """Dot-product tiles on B^T in place: A's rows and B^T's rows contiguous along K, every variant's tile."""
    a, b, bias = _operands(data, m, k, n, dtype, ROW_LAYOUTS, ROW_LAYOUTS, True)
    bias_, activation, alpha = _epilogue_args(data, bias, dtype)
    out = np.full((m, n), np.nan, dtype)
    _small.dots(a.ctypes.data, _strides(a)[0], b.ctypes.data, _strides(b)[1], k, bias_,
                _gemm.ACTIVATION_CODES[activation], alpha, out, variant)
    _check(out, a, b, bias, activation, alpha)


@given(data=st.data(), m=ROW_COUNTS, k=DEPTHS.filter(bool), n=SIDES, dtype=DTYPES, variant=st.sampled_from([0, 1, 2]),
       kc=st.sampled_from([8, 128]))
def test_tiles(data, m, k, n, dtype, variant, kc):
    """The register-tile body on B in place (one N block, edge rows and columns, several K blocks): A in
    any layout, B's rows contiguous, every variant's tile."""
    a, b, bias = _operands(data, m, k, n, dtype, ANY_LAYOUTS, ROW_LAYOUTS, False)
    bias_, activation, alpha = _epilogue_args(data, bias, dtype)
    out = np.full((m, n), np.nan, dtype)
    (sa_i, sa_k), (sb_k, _) = _strides(a), _strides(b)
    _small.tiles(a.ctypes.data, sa_i, sa_k, b.ctypes.data, sb_k, k, bias_, _gemm.ACTIVATION_CODES[activation], alpha,
                 out, variant, kc, _gemm.body(np.dtype(dtype)))
    _check(out, a, b, bias, activation, alpha)



@given(data=st.data(), m=st.sampled_from([7, 13, 20, 32]), k=st.sampled_from([1, 9, 64, 128]),
       n=st.sampled_from([8, 16, 64, 72, 128]), dtype=DTYPES)
def test_tiles_last_rows_bitwise_as_the_gemm(data, m, k, n, dtype):
    """The rows below the last full row of tiles, computed as one-row tiles, equal bit for bit what the
    GEMM gives them in a zero-padded tile (the compiled epoch's trajectories depend on it)."""
    a, b, bias = _operands(data, m, k, n, dtype, ANY_LAYOUTS, st.just("C"), False)
    bias_, activation, alpha = _epilogue_args(data, bias, dtype)
    code, (variant, kc) = _gemm.ACTIVATION_CODES[activation], (0, 384)
    (sa_i, sa_k), (sb_k, _) = _strides(a), _strides(b)
    out, expected = np.full((m, n), np.nan, dtype), np.full((m, n), np.nan, dtype)
    _small.tiles(a.ctypes.data, sa_i, sa_k, b.ctypes.data, sb_k, k, bias_, code, alpha, out, variant, kc,
                 _gemm.body(np.dtype(dtype)))
    _gemm.gemm(a, b, bias_, code, alpha, expected, variant, kc, 1 << 30, _gemm.body(np.dtype(dtype)))
    np.testing.assert_array_equal(out, expected)


@given(data=st.data(), m=ROW_COUNTS, k=st.sampled_from([1, 2]), n=SIDES, dtype=DTYPES)
def test_outer_products_bitwise_as_the_gemm(data, m, k, n, dtype):
    """An outer product (K of 1 or 2: x^T dy at a batch of one or two) through ``rows`` equals bit for bit the
    GEMM's FMA chain from zero, signed zeros included (zeros of both signs among the operands)."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    a, b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    a.flat[::3], b.flat[::4] = -0.0, 0.0
    b_layouts = st.sampled_from(["C", "window", "reversed"])  # B's rows contiguous, distinct
    a, b = _layout(a, data.draw(ANY_LAYOUTS)), _rows_contiguous(b, data.draw(b_layouts))
    bias = rng.standard_normal(n).astype(dtype) if data.draw(st.booleans()) else None
    bias_, activation, alpha = _epilogue_args(data, bias, dtype)
    code = _gemm.ACTIVATION_CODES[activation]
    (sa_i, sa_k), (sb_k, _) = _strides(a), _strides(b)
    out, expected = np.full((m, n), np.nan, dtype), np.full((m, n), np.nan, dtype)
    _small.rows(a.ctypes.data, sa_i, sa_k, b.ctypes.data, sb_k, 1, k, bias_, code, alpha, out)
    _gemm.gemm(a, b, bias_, code, alpha, expected, 0, 384, 1 << 30, _gemm.body(np.dtype(dtype)))
    assert out.tobytes() == expected.tobytes()


@given(data=st.data(), m=st.sampled_from([1, 2]), k=st.sampled_from([1, 3, 10, 63]),
       n=st.sampled_from([1, 4, 5, 128, 131]), dtype=DTYPES)
def test_strided_columns_bitwise_as_the_gemm(data, m, k, n, dtype):
    """``dy @ W^T`` at a batch of one or two for a narrow W (B's columns strided, its rows along K
    contiguous): ``rows`` reads B in place, each element the GEMM register tile's chain of FMAs from zero."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    a = _layout(rng.standard_normal((m, k)).astype(dtype), data.draw(ANY_LAYOUTS))
    b = rng.standard_normal((n, k)).astype(dtype).T
    bias = rng.standard_normal(n).astype(dtype) if data.draw(st.booleans()) else None
    bias_, activation, alpha = _epilogue_args(data, bias, dtype)
    code = _gemm.ACTIVATION_CODES[activation]
    (sa_i, sa_k), (sb_k, sb_j) = _strides(a), _strides(b)
    assert _small.route(m, k, n, sa_k, sb_k, sb_j, 1, _gemm.PARALLEL_MIN_FLOPS) == _small.ROWS
    out, expected = np.full((m, n), np.nan, dtype), np.full((m, n), np.nan, dtype)
    _small.rows(a.ctypes.data, sa_i, sa_k, b.ctypes.data, sb_k, sb_j, k, bias_, code, alpha, out)
    _gemm.gemm(a, b, bias_, code, alpha, expected, 0, 384, 1 << 30, _gemm.body(np.dtype(dtype)))
    _check(out, a, b, bias, activation, alpha)
    if not _gemm.narrow(n, k, sa_k):  # the GEMM's register tiles (its dot tiles sum otherwise)
        assert out.tobytes() == expected.tobytes()


def test_route():
    """The choice for a dense layer's three products at a batch of 1, 8, 32 and 256 (784 -> 128, on 2
    threads; strides in elements: A (sa_k), B (sb_k, sb_j))."""
    route = _small.route
    flops = _gemm.PARALLEL_MIN_FLOPS
    assert route(1, 784, 128, 1, 128, 1, 2, flops) == _small.ROWS  # x @ W at batch 1: a GEMV
    assert route(1, 10, 128, 1, 1, 10, 2, flops) == _small.ROWS  # dy @ W^T, W narrow: its columns strided
    assert route(2, 784, 128, 1, 128, 1, 2, flops) == _small.ROWS
    assert route(1, 128, 784, 1, 1, 128, 2, flops) == _small.DOTS  # dy @ W^T: W's rows in place
    assert route(8, 128, 784, 1, 1, 128, 2, flops) == _small.DOTS
    assert route(8, 784, 128, 1, 128, 1, 2, flops) == _small.TILES  # B would be packed
    assert route(784, 1, 128, 784, 128, 1, 2, flops) == _small.ROWS  # x^T dy at batch 1: an outer product
    assert route(784, 8, 128, 784, 128, 1, 2, flops) == _small.GEMM  # x^T dy: M is 784
    assert route(32, 784, 128, 1, 128, 1, 2, flops) == _small.PARALLEL  # above the threshold: two threads
    assert route(32, 784, 128, 1, 128, 1, 1, flops) == _small.TILES
    assert route(32, 784, 10, 1, 10, 1, 1, flops) == _small.GEMM  # narrow: the GEMM's dot tiles
    assert route(32, 64, 128, 1, 128, 1, 1, flops) == _small.GEMM  # B small: the GEMM reads it in place too
    assert route(256, 784, 128, 1, 128, 1, 2, flops) == _small.PARALLEL
    assert route(0, 784, 128, 1, 128, 1, 2, flops) == _small.GEMM  # empty: the GEMM returns at once


# (M, K, N) taking each route through kernels.matmul when A and B are row-major (1 thread or 2)
ROUTED = [(1, 784, 128), (2, 300, 70), (1, 5, 3), (70, 1, 30), (5, 200, 90), (8, 784, 128), (31, 300, 130),
          (1, 0, 9)]


@pytest.mark.parametrize("trans", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["NN", "TN", "NT", "TT"])
@pytest.mark.parametrize("shape", ROUTED, ids=[f"{m}x{k}x{n}" for m, k, n in ROUTED])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_on_small_routes(shape, trans, dtype):
    (m, k, n), (trans_a, trans_b) = shape, trans
    rng = np.random.default_rng(m + 3 * k + 7 * n)
    a = (rng.standard_normal((k, m) if trans_a else (m, k)) / np.sqrt(max(k, 1))).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype)
    for activation in ACTIVATIONS:
        with kernels.use_backend("numba"):
            y = kernels.matmul(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias, activation=activation)
        assert_gemm_close(y, a, b, bias, trans_a, trans_b, activation=activation)
