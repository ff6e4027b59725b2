"""Tiled GEMM with a fused epilogue: ``out = act(op(a) @ op(b) + bias)``.

Each block computes a BM x BN tile of ``out``; per step of BK along K it stages a BM x BK tile of op(a)
and a BK x BN tile of op(b) in shared memory, and each thread accumulates a TM x TN register tile (its
rows ``ty + i * (BM // TM)`` and columns ``tx + j * (BN // TN)``, so neighbouring threads read neighbouring
shared-memory words and write neighbouring output columns). The loads read ``a``/``b`` with their own
strides, so transposed views are never copied; each load is ordered so that consecutive threads read
consecutive elements of a C-ordered operand. Bias and activation are applied to the register tile before
the single store.

Everything that decides the code is a compile-time constant of the kernel (tile shape, trans flags, bias,
activation): one specialised kernel per combination, with no branch on them in the loops. Every loop over
a thread's register arrays has constant bounds and constant indices once unrolled, which is what lets
NVVM keep the accumulators in registers (``bench/gpu_check.py`` counts local-memory loads in the PTX).
The shared tiles are padded by 32 / BK words per row, so the stores along K (op(a) for a C-ordered ``a``,
op(b) on the ``trans_b`` path, i.e. every ``dx = dy W^T``) hit distinct banks. Row tiles are on grid x
(2**31 - 1 blocks), column tiles on grid y (65535 blocks of BN columns).

Two tile shapes: large tiles (more work per shared-memory load) when the output has enough of them to
give every SM a block, else small tiles, so that a dense layer's smaller products still fill the GPU.
"""

import functools

import numba
import numpy as np
from numba import cuda

from .. import _scalar
from ._launch import geometry, kernel, sm_count


@cuda.jit(device=True)
def _identity(v, _, alpha):
    return v


# the forward formulas of kernels/_scalar.py, called as act(v, v, alpha)
ACTIVATIONS = {None: _identity, **{name: forward for name, (forward, _) in _scalar.ACTIVATIONS.items()}}


@cuda.jit(device=True)
def _stage(x, k_major, tile, e, width, BK, first, extent, k0, k_total, zero):
    """Store element ``e`` of a BK x ``width`` tile of ``x`` (rows ``k0:k0+BK`` of K and columns
    ``first:first+width`` of the other dimension, zero outside ``x``) at ``tile[kk, j]``. ``x`` is
    (K, other) when ``k_major``, else (other, K); either way consecutive ``e`` read consecutive elements
    of a C-ordered ``x``."""
    if k_major:
        kk, j = e // width, e % width
    else:
        j, kk = e // BK, e % BK
    gj, gk = first + j, k0 + kk
    v = zero
    if gj < extent and gk < k_total:
        v = x[gk, gj] if k_major else x[gj, gk]
    tile[kk, j] = v


@functools.cache
def _gemm_kernel(dtype, tiles, trans_a, trans_b, has_bias, activation):
    BM, BN, BK, TM, TN = tiles
    NTY, NTX = BM // TM, BN // TN  # threads per block along rows and columns
    THREADS = NTX * NTY
    A_LOADS, B_LOADS = BM * BK // THREADS, BK * BN // THREADS  # shared-memory stores per thread per K step
    assert A_LOADS * THREADS == BM * BK and B_LOADS * THREADS == BK * BN, tiles
    PAD = max(1, 32 // BK)  # BK threads in a row store along K: a stride of BM + PAD spreads them over banks
    SA, SB = (BK, BM + PAD), (BK, BN + PAD)  # shared tile shapes (constants, as cuda.shared.array needs)
    nb_dtype, zero = numba.from_dtype(dtype), dtype.type(0)
    act = ACTIVATIONS[activation]

    @kernel
    def gemm(a, b, bias, alpha, out):
        sa = cuda.shared.array(SA, nb_dtype)
        sb = cuda.shared.array(SB, nb_dtype)
        acc = cuda.local.array((TM, TN), nb_dtype)
        ra = cuda.local.array(TM, nb_dtype)
        rb = cuda.local.array(TN, nb_dtype)
        m, n = out.shape
        k_total = a.shape[0] if trans_a else a.shape[1]
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        tid = ty * NTX + tx
        row0, col0 = cuda.blockIdx.x * BM, cuda.blockIdx.y * BN
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = zero
        for k0 in range(0, k_total, BK):
            for load in range(A_LOADS):  # a is (K, M) when trans_a, else (M, K)
                _stage(a, trans_a, sa, tid + load * THREADS, BM, BK, row0, m, k0, k_total, zero)
            for load in range(B_LOADS):  # b is (K, N), or (N, K) when trans_b
                _stage(b, not trans_b, sb, tid + load * THREADS, BN, BK, col0, n, k0, k_total, zero)
            cuda.syncthreads()
            for kk in range(BK):
                for i in range(TM):
                    ra[i] = sa[kk, ty + i * NTY]
                for j in range(TN):
                    rb[j] = sb[kk, tx + j * NTX]
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] += ra[i] * rb[j]
            cuda.syncthreads()
        for i in range(TM):
            gi = row0 + ty + i * NTY
            for j in range(TN):
                gj = col0 + tx + j * NTX
                if gi < m and gj < n:
                    v = acc[i, j]
                    if has_bias:
                        v += bias[gj]
                    out[gi, gj] = act(v, v, alpha)

    return gemm


def _tile_count(m, n, tiles):
    return -(-m // tiles[0]) * -(-n // tiles[1])


def tiles_for(m, n):
    """The tile shape for an m x n output (see the module docstring)."""
    g = geometry()
    return g.large_tiles if _tile_count(m, n, g.large_tiles) >= sm_count() else g.small_tiles


def matmul(a, b, trans_a, trans_b, bias, activation, alpha, out):
    m, n = out.shape
    if m == 0 or n == 0:
        return
    tiles = tiles_for(m, n)
    BM, BN, _, TM, TN = tiles
    dtype = np.dtype(out.dtype)
    gemm = _gemm_kernel(dtype, tiles, bool(trans_a), bool(trans_b), bias is not None, activation)
    gemm[(-(-m // BM), -(-n // BN)), (BN // TN, BM // TM)](a, b, out[0] if bias is None else bias,
                                                            dtype.type(alpha), out)
