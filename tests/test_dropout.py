"""Dropout: the mask is a function of (seed, element index) only, so every backend and thread count
produces the reference's output bit for bit; its keep rate, scaling, backward and argument checks."""

import importlib
import math
import re

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kernels
from helpers import DTYPES, LAYOUTS, SIZES_2D, arrays, compiled_copy, needs_avx2, reference, with_layout
from kernels.cpu._parallel import CHUNK, PARALLEL_MIN

P = st.sampled_from([0.0, 1e-7, 0.1, 0.5, 0.9, 0.999])
SEEDS = st.one_of(st.sampled_from([0, 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))


def _dropout(backend, x, p, seed):
    return backend.get(kernels.dropout(backend.to(x), p, seed))


@given(x=st.tuples(SIZES_2D, SIZES_2D).flatmap(arrays), p=P, seed=SEEDS)
def test_bitwise_equal_to_reference(fast_backend, x, p, seed):
    y = _dropout(fast_backend, x, p, seed)
    expected = reference(kernels.dropout, x, p, seed)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.tobytes() == expected.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_signed_zeros_as_in_reference(fast_backend, dtype):
    """Dropped elements are x * 0, as in the reference: NaN stays NaN, negative values give -0. (A NaN's
    payload is not compared: an H200 returns the canonical float32 NaN 0x7fffffff for NaN * 0.)"""
    x = np.tile(np.array([np.nan, -0.0, 0.0, -1.5, 2.5, -1e30], dtype), 50)
    y = _dropout(fast_backend, x, 0.5, 11)
    expected = reference(kernels.dropout, x, 0.5, 11)
    assert np.isnan(y[::6]).all() and np.isnan(expected[::6]).all()
    finite = np.arange(len(x)) % 6 != 0
    assert y[finite].tobytes() == expected[finite].tobytes()
    assert np.signbit(y[3::6]).all()


@pytest.mark.parametrize("n", [PARALLEL_MIN - 1, PARALLEL_MIN + 3 * CHUNK + 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_same_mask_for_1_and_2_threads(n, dtype, threads):
    """Serial and parallel sizes, on 1 and 2 threads: the reference's output bit for bit."""
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"numba has only {numba.config.NUMBA_NUM_THREADS} thread(s) here")
    x = np.random.default_rng(n).standard_normal(n).astype(dtype)
    expected = reference(kernels.dropout, x, 0.3, 1234)
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        with kernels.use_backend("numba"):
            y = kernels.dropout(x, 0.3, 1234)
    finally:
        numba.set_num_threads(previous)
    assert y.tobytes() == expected.tobytes()


def test_mask_of_an_element_does_not_depend_on_the_size():
    x = np.ones(PARALLEL_MIN + 1000, np.float32)
    whole = kernels.dropout(x, 0.5, 99)
    for n in (1, 17, PARALLEL_MIN - 1):
        assert kernels.dropout(x[:n], 0.5, 99).tobytes() == whole[:n].tobytes()


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("seed", [0, 2**64 - 1])
def test_keep_rate(p, seed):
    """The kept fraction is within 5 binomial standard deviations of 1 - p, in the whole array and in
    each of 16 blocks (so no chunk of the parallel loop is biased)."""
    n, blocks = 1 << 20, 16
    kept = kernels.dropout(np.ones(n, np.float32), p, seed) != 0
    for part in [kept, *np.split(kept, blocks)]:
        sd = math.sqrt(p * (1 - p) / part.size)
        assert abs(part.mean() - (1 - p)) < 5 * sd, (part.mean(), 1 - p)


@given(x=st.tuples(SIZES_2D, SIZES_2D).flatmap(arrays), p=st.sampled_from([0.1, 0.3, 0.5, 0.7]), seed=SEEDS)
def test_inverted_scaling(backend, x, p, seed):
    """Every element is either 0 or exactly x * dtype(1 / (1 - p)), the scale rounded once as the
    reference rounds it; with many elements, some of each."""
    y = _dropout(backend, x, p, seed)
    scaled = x * x.dtype.type(1 / (1 - p))
    np.testing.assert_array_equal(y, np.where(y == 0, 0, scaled))
    if x.size >= 200:
        assert 0 < np.count_nonzero(y) < x.size


@given(x=st.tuples(SIZES_2D, SIZES_2D).flatmap(arrays), seed=SEEDS)
def test_p_zero_is_the_identity(backend, x, seed):
    assert _dropout(backend, x, 0.0, seed).tobytes() == np.ascontiguousarray(x).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_different_seeds_give_different_masks(backend, dtype):
    x = np.ones(2000, dtype)
    masks = [_dropout(backend, x, 0.5, seed) != 0 for seed in (0, 1, 2, 2**32, 2**63, 2**64 - 1)]
    for i, a in enumerate(masks):
        for b in masks[i + 1:]:
            assert 0.3 < np.mean(a != b) < 0.7  # independent masks disagree on about half the elements


@given(shape=st.tuples(SIZES_2D, SIZES_2D), dtype=DTYPES, layout=LAYOUTS, p=P, seed=SEEDS)
def test_backward_zeroes_the_same_elements(backend, shape, dtype, layout, p, seed):
    """The backward pass is the same call on dy: it drops exactly the elements the forward dropped."""
    rng = np.random.default_rng(seed % 2**32)
    x = (1 + rng.random(shape)).astype(dtype)  # no zeros of its own: y == 0 only where dropped
    dy = with_layout(-(1 + rng.random(shape)).astype(dtype), layout)
    y = _dropout(backend, with_layout(x, layout), p, seed)
    dx = _dropout(backend, dy, p, seed)
    np.testing.assert_array_equal(dx == 0, y == 0)
    np.testing.assert_array_equal(dx[dx != 0], dy[dx != 0] * dtype(1 / (1 - p)))


def test_out_buffer_is_used():
    x = np.arange(1, 101, dtype=np.float32)
    out = np.full_like(x, np.nan)
    assert kernels.dropout(x, 0.5, 3, out=out) is out
    assert out.tobytes() == reference(kernels.dropout, x, 0.5, 3).tobytes()


@pytest.mark.parametrize("p, seed, error, name", [
    (-0.1, 0, ValueError, "p"),
    (1.0, 0, ValueError, "p"),
    (float("nan"), 0, ValueError, "p"),
    ("0.5", 0, TypeError, "p"),
    (0.5, -1, ValueError, "seed"),
    (0.5, 2**64, ValueError, "seed"),
    (0.5, 1.5, TypeError, "seed"),
    (0.5, True, TypeError, "seed"),
])
def test_rejects_bad_arguments(p, seed, error, name):
    with pytest.raises(error, match=rf"^{name}\b"):
        kernels.dropout(np.ones(4, np.float32), p, seed)


@pytest.mark.slow
@needs_avx2
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_loop_is_vectorised(dtype):
    """The hash runs on vectors of uint64 (packed 64-bit multiplies on ymm/zmm), not one element at a time."""
    with kernels.use_backend("numba"):
        kernels.dropout(np.ones(64, dtype), 0.5, 1)
    fresh, sig = compiled_copy(importlib.import_module("kernels.cpu.dropout")._dropout, dtype)
    assert re.search(r"vpmul\w*\s[^\n]*[yz]mm", fresh.inspect_asm(sig))
