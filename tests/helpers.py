"""Shared test helpers: tolerances, array strategies with varied memory layouts, finite differences."""

import llvmlite.binding
import numba
import numpy as np
import pytest
from hypothesis import strategies as st

import kernels

DTYPES = st.sampled_from([np.float32, np.float64])
# Default tolerances against the NumPy reference, loose on purpose: rtol is ~170 ulps (float32) and ~4500 ulps
# (float64), atol a floor near zero. They must hold for every kernel compared with them (reductions summed in
# another order, FMA contraction, backward formulas that cancel, the optimizers); tests of elementwise kernels
# pass a tighter rtol where it holds (test_activations: forward passes within 8 ulps).
TOL = {np.dtype(np.float32): dict(rtol=2e-5, atol=2e-6), np.dtype(np.float64): dict(rtol=1e-12, atol=1e-13)}

# Sizes that catch edge handling: empty, one, odd, powers of two and their neighbours, a few thousand.
SIZES_1D = st.sampled_from([0, 1, 2, 3, 7, 15, 16, 17, 31, 33, 63, 64, 65, 127, 1000, 4099])
SIZES_2D = st.sampled_from([0, 1, 2, 3, 5, 8, 16, 17, 31, 33, 64, 65])
LAYOUTS = st.sampled_from(["C", "F", "strided", "negative", "zero"])


def assert_close(actual, expected, dtype=None, **tol):
    """Compare against the reference with the dtype's tolerance (``tol`` overrides it)."""
    expected = np.asarray(expected)
    dtype = np.dtype(dtype or expected.dtype)
    np.testing.assert_allclose(np.asarray(actual), expected, **{**TOL[dtype], **tol})


def with_layout(x, layout):
    """``x`` in the given memory layout: C order, Fortran order, a strided view, a view with negative
    strides, or (``zero``) a read-only view with stride 0 on the first axis, repeating ``x[0]``: the
    same values as ``x`` except for that one."""
    if layout == "negative":
        flip = tuple(slice(None, None, -1) for _ in x.shape)
        return np.ascontiguousarray(x[flip])[flip]
    if layout == "zero":
        return np.broadcast_to(x[:1], x.shape) if x.ndim and x.shape[0] > 1 else x
    if layout == "F":
        return np.asfortranarray(x)
    if layout == "strided":
        big = np.zeros(tuple(2 * s for s in x.shape), x.dtype)
        view = big[tuple(slice(None, None, 2) for _ in x.shape)]
        view[...] = x
        return view
    return np.ascontiguousarray(x)


@st.composite
def arrays(draw, shape, dtype=None, scale=3.0, layout=True):
    """A random array of ``shape`` (values roughly N(0, scale)), in a random layout."""
    dtype = draw(DTYPES) if dtype is None else dtype
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    return with_layout(x, draw(LAYOUTS)) if layout else x


def reference(fn, *args, **kwargs):
    """Call the public kernel ``fn`` on the NumPy reference backend."""
    with kernels.use_backend("numpy"):
        return fn(*args, **kwargs)


def numeric_grad(f, x, eps=1e-6):
    """Central finite differences of the scalar function ``f`` at the float64 array ``x``."""
    x = np.array(x, dtype=np.float64)
    grad = np.empty_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        hi = f(x)
        x[i] = old - eps
        lo = f(x)
        x[i] = old
        grad[i] = (hi - lo) / (2 * eps)
    return grad


def compiled_copy(body, dtype):
    """An uncached copy of the numba ``body`` compiled for its ``dtype`` signature (cached code cannot
    be inspected), and that signature."""
    sig = next(s for s in body.signatures if s[2].dtype == numba.from_dtype(np.dtype(dtype)))
    fresh = type(body)(body.py_func, targetoptions=body.targetoptions)
    fresh.compile(sig)
    return fresh, sig


needs_avx2 = pytest.mark.skipif("+avx2" not in llvmlite.binding.get_host_cpu_features().flatten(),
                                reason="looks for x86 AVX2/AVX-512 vector instructions")

