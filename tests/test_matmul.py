"""Matmul: every backend against the NumPy reference, over shapes that exercise every path of the packed
GEMM (empty, single, odd sizes, partial tiles, several K blocks, the parallel split by rows and by
columns, B packed or read in place), all four transpose combinations, C/F/strided layouts, the fused
bias + activation epilogue, float32 and float64; and the public API's argument checks."""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kernels
from helpers import DTYPES, TOL, arrays, reference, with_layout

ACTIVATIONS = [None, "relu", "leaky_relu", "sigmoid", "tanh"]
# Around the register tiles (6 rows; 32 float32 / 16 float64 columns) and K blocks; smaller
# under the CUDA simulator, which runs every GPU thread in Python.
SIDES = {False: st.sampled_from([0, 1, 2, 6, 7, 13, 16, 33, 65]), True: st.sampled_from([0, 1, 2, 7, 13, 33])}
DEPTHS = {False: st.sampled_from([0, 1, 7, 33, 600]), True: st.sampled_from([0, 1, 7, 33])}


def large(backend):
    """Skip a large case under the CUDA simulator."""
    if backend.simulated:
        pytest.skip("too large for the CUDA simulator")
    return backend


def _operands(data, m, k, n, trans_a, trans_b, dtype, with_bias):
    a = data.draw(arrays((k, m) if trans_a else (m, k), dtype))
    b = data.draw(arrays((n, k) if trans_b else (k, n), dtype))
    bias = data.draw(arrays((n,), dtype)) if with_bias else None
    return a, b, bias


def _matmul(backend, a, b, bias=None, **kwargs):
    return backend.get(kernels.matmul(backend.to(a), backend.to(b), bias=backend.to(bias), **kwargs))


def assert_gemm_close(y, a, b, bias, trans_a, trans_b, **kwargs):
    """``y`` within the rounding error a K-term dot product may have (both sides of the comparison can
    be off by ``K eps (|a| |b|)`` per element; the activations are 1-Lipschitz) of the reference."""
    expected = reference(kernels.matmul, a, b, trans_a=trans_a, trans_b=trans_b, bias=bias, **kwargs)
    assert y.dtype == expected.dtype and y.shape == expected.shape
    op_a, op_b = (a.T if trans_a else a), (b.T if trans_b else b)
    magnitude = np.abs(op_a).astype(np.float64) @ np.abs(op_b)
    if bias is not None:
        magnitude += np.abs(bias)
    eps = np.finfo(y.dtype).eps
    bound = 2 * (op_a.shape[1] + 2) * eps * magnitude + 8 * eps * np.abs(expected) + TOL[y.dtype]["atol"]
    error = np.abs(y.astype(np.float64) - expected)
    assert (error <= bound).all(), f"max error {error.max()} where bound {bound.flat[error.argmax()]}"


@given(data=st.data(), trans_a=st.booleans(), trans_b=st.booleans(), dtype=DTYPES, with_bias=st.booleans(),
       activation=st.sampled_from(ACTIVATIONS), alpha=st.sampled_from([0.01, 0.3]))
def test_matches_reference(fast_backend, data, trans_a, trans_b, dtype, with_bias, activation, alpha):
    sides, depths = SIDES[fast_backend.is_cuda], DEPTHS[fast_backend.is_cuda]
    m, k, n = data.draw(sides), data.draw(depths), data.draw(sides)
    a, b, bias = _operands(data, m, k, n, trans_a, trans_b, dtype, with_bias)
    y = _matmul(fast_backend, a, b, bias, trans_a=trans_a, trans_b=trans_b, activation=activation, alpha=alpha)
    assert_gemm_close(y, a, b, bias, trans_a, trans_b, activation=activation, alpha=alpha)


# Larger explicit shapes: numba only (the CUDA simulator would run every GPU thread in Python; on a
# real GPU they run too).
# (M, K, N): 1023/1025 straddle every block size; (2000, 300, 10) and (10, 300, 2000) split the work by
# rows and by columns across threads; (5000, 64, 3) and (3, 64, 5000) are tall-skinny and short-wide on
# one thread; (300, 200, 100) is parallel with B packed; (40, 100, 150) is serial with B read in place;
# (200, 700, 600) and (130, 300, 1024) pack B, or B^T in 8 x 8 transposed blocks with partial edges, in
# two K blocks and on two threads.
LARGE = [(1023, 1023, 1023), (1025, 1025, 1025), (5000, 64, 3), (3, 64, 5000), (2000, 300, 10),
         (10, 300, 2000), (300, 200, 100), (40, 100, 150), (1, 2000, 1), (700, 1, 700), (200, 700, 600),
         (130, 300, 1024)]


@pytest.mark.parametrize("trans", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["NN", "TN", "NT", "TT"])
@pytest.mark.parametrize("shape", LARGE, ids=[f"{m}x{k}x{n}" for m, k, n in LARGE])
def test_large_shapes(fast_backend, shape, trans):
    large(fast_backend)
    (m, k, n), (trans_a, trans_b) = shape, trans
    rng = np.random.default_rng(m * 7 + n)
    # scaled so op(a) @ op(b) + bias has unit variance: tanh and sigmoid stay off their flat tails, so the
    # comparison sees the product's digits and not just its signs
    a = (rng.standard_normal((k, m) if trans_a else (m, k)) / np.sqrt(2 * k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    bias = (rng.standard_normal(n) / np.sqrt(2)).astype(np.float32)
    activation = ACTIVATIONS[(m + k + n) % len(ACTIVATIONS)]
    y = _matmul(fast_backend, a, b, bias, trans_a=trans_a, trans_b=trans_b, activation=activation)
    if activation in ("tanh", "sigmoid"):  # what the scaling is for: few outputs on the flat tails
        tail = np.abs(y) if activation == "tanh" else np.abs(2 * y - 1)
        assert np.mean(tail > 0.99) < 0.05
    assert_gemm_close(y, a, b, bias, trans_a, trans_b, activation=activation)


@pytest.mark.parametrize("layout", ["C", "F", "strided", "negative", "zero"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float64_and_layouts_on_the_parallel_path(fast_backend, dtype, layout):
    large(fast_backend)
    rng = np.random.default_rng(3)
    a = with_layout(rng.standard_normal((257, 700)).astype(dtype), layout)  # two K blocks
    b = with_layout(rng.standard_normal((700, 129)).astype(dtype), layout)
    y = _matmul(fast_backend, a, b, activation="sigmoid")
    assert_gemm_close(y, a, b, None, False, False, activation="sigmoid")


@pytest.mark.parametrize("n", [1, 4, 5, 6, 10, 16, 17])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_narrow_outputs(fast_backend, dtype, n):
    """N <= 16 with A's rows contiguous takes the dot-product tiles: edge rows and columns of the 5 x 5
    tiles, K not a multiple of the vector lanes, A a view with a row stride wider than K, N = 17 just past
    the route; on the parallel path (M = 1001) too, except under the CUDA simulator."""
    rng = np.random.default_rng(n)
    for m, k in [(23, 37)] + ([] if fast_backend.simulated else [(1001, 300)]):
        a = rng.standard_normal((m, k + 3)).astype(dtype)[:, 2:k + 2]
        b = rng.standard_normal((k, n)).astype(dtype)
        bias = rng.standard_normal(n).astype(dtype)
        for activation in ACTIVATIONS:
            y = _matmul(fast_backend, a, b, bias, activation=activation, alpha=0.3)
            assert_gemm_close(y, a, b, bias, False, False, activation=activation, alpha=0.3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposes_are_read_through_strides(backend, dtype):
    """The backward forms of a dense layer, dW = x^T dy and dx = dy W^T, on views as they come."""
    rng = np.random.default_rng(4)
    x, dy, w = (rng.standard_normal(s).astype(dtype) for s in ((37, 20), (37, 9), (20, 9)))
    dw = _matmul(backend, x, dy, trans_a=True)
    dx = _matmul(backend, dy, w, trans_b=True)
    assert_gemm_close(dw, x, dy, None, True, False)
    assert_gemm_close(dx, dy, w, None, False, True)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(dw, x.T.astype(np.float64) @ dy, rtol=0, atol=100 * eps * np.abs(x).max() ** 2)
    np.testing.assert_allclose(dx, dy.astype(np.float64) @ w.T, rtol=0, atol=100 * eps * np.abs(w).max() ** 2)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_empty_k_gives_the_activated_bias(fast_backend, activation):
    bias = np.array([-2.0, 0.0, 3.0], np.float32)
    a, b = np.zeros((4, 0), np.float32), np.zeros((0, 3), np.float32)
    y = _matmul(fast_backend, a, b, bias, activation=activation)
    expected = reference(kernels.matmul, a, b, bias=bias, activation=activation)
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    assert (y == expected[0]).all()
    if activation == "relu":
        np.testing.assert_array_equal(y[0], [0.0, 0.0, 3.0])


def test_out_is_overwritten_not_accumulated(fast_backend):
    """The first K block stores and later ones add: whatever ``out`` held before must not leak in."""
    # under the CUDA simulator: three K tiles of 16 (the GPU's tiles are 8 or 16 deep)
    m, k, n = (20, 40, 18) if fast_backend.simulated else (50, 600, 70)
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    out = fast_backend.to(np.full((m, n), np.nan, np.float32))
    y = kernels.matmul(fast_backend.to(a), fast_backend.to(b), out=out)
    assert y is out
    assert_gemm_close(fast_backend.get(out), a, b, None, False, False)


# Each run: serial (64^3) and parallel (300^3) products, plain or with a transposed a (another layout,
# so another specialisation of the serial wrapper).
_CACHE_RUN = """
import sys, numpy as np, kernels
rng = np.random.default_rng(0)
for m in (64, 300):
    a = rng.standard_normal((m, m)).astype(np.float32)
    y = kernels.matmul(a, a, trans_a=sys.argv[1] == "T")
    assert np.allclose(y, (a.T if sys.argv[1] == "T" else a) @ a, atol=1e-3)
"""


@pytest.mark.slow
def test_gemm_survives_numba_cache_reuse_across_processes(tmp_path):
    """Regression: when a cached wrapper called the parallel GEMM, the wrapper compiled for a new layout in
    a process that had loaded the parallel kernel from the cache crashed the next process that loaded it
    (numba issue 8578): NN, then TN, then TN again segfaulted. Each run here is a fresh process sharing
    one cache directory."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "KERNELS_BACKEND": "numba"}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    for layout in "NTTN":
        run = subprocess.run([sys.executable, "-c", _CACHE_RUN, layout], env=env, capture_output=True, text=True)
        assert run.returncode == 0, f"run {layout} exited with {run.returncode}: {run.stderr[-2000:]}"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_propagates_through_the_product_and_the_epilogue(backend, activation):
    a, b = np.ones((7, 5), np.float64), np.ones((5, 40), np.float64)
    a[3, 2] = np.nan
    y = _matmul(backend, a, b, activation=activation)
    assert np.isnan(y[3]).all() and not np.isnan(np.delete(y, 3, axis=0)).any()


# ---- argument checks (the public API, before any backend runs) ---------------------------------------

def test_incompatible_shapes_name_both_arguments():
    with pytest.raises(ValueError, match=r"a and b do not compose.*\(3, 4\).*\(5, 2\)"):
        kernels.matmul(np.zeros((3, 4)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"trans_b=True"):
        kernels.matmul(np.zeros((3, 4)), np.zeros((4, 2)), trans_b=True)


def test_bias_shape_dtype_and_rank_are_checked():
    a, b = np.zeros((3, 4), np.float32), np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        kernels.matmul(a, b, bias=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="bias must be 1-D"):
        kernels.matmul(a, b, bias=np.zeros((1, 2), np.float32))
    with pytest.raises(TypeError, match="bias must have the same dtype as a"):
        kernels.matmul(a, b, bias=np.zeros(2, np.float64))


def test_out_overlapping_an_input_is_refused():
    a = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="out must not share memory with a"):
        kernels.matmul(a, np.zeros((4, 4), np.float32), out=a)
    b = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="out must not share memory with b"):
        kernels.matmul(np.zeros((4, 4), np.float32), b, out=b)


def test_unknown_activation_and_bad_out_are_refused():
    a, b = np.zeros((3, 4), np.float32), np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="activation must be None or one of.*'gelu'"):
        kernels.matmul(a, b, activation="gelu")
    with pytest.raises(ValueError, match=r"out must have shape \(3, 2\)"):
        kernels.matmul(a, b, out=np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="out must have dtype float32"):
        kernels.matmul(a, b, out=np.zeros((3, 2), np.float64))
    with pytest.raises(ValueError, match="a must be 2-D"):
        kernels.matmul(np.zeros(4, np.float32), b)
