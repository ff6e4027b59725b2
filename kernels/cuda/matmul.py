"""Tiled GEMM with a fused epilogue: ``out = act(op(a) @ op(b) + bias)``.

Each block computes a BM x BN tile of ``out``; per step of BK along K it stages a BM x BK tile of op(a)
and a BK x BN tile of op(b) in shared memory, and each thread accumulates a TM x TN register tile (its
rows ``ty + i * (BM // TM)`` and columns ``tx + j * (BN // TN)``, so neighbouring threads read neighbouring
shared-memory words and write neighbouring output columns). The loads read ``a``/``b`` with their own
strides and the trans flags, so transposed views are never copied; each load is ordered so that
consecutive threads read consecutive elements of a C-ordered operand. Bias and activation are applied to
the register tile before the single store.

Two tile shapes: large tiles (more work per shared-memory load) when the output has enough of them to
give every SM a block, else small tiles, so that a dense layer's smaller products still fill the GPU.
"""

import functools

import numba
import numpy as np
from numba import cuda

from ._launch import SIMULATOR, kernel, sm_count
from .activations import leaky_relu_scalar, relu_scalar, sigmoid_scalar, tanh_scalar

# (BM, BN, BK, TM, TN). On a GPU, 256 threads a block: 128x128 tiles of 8x8 per thread, or 64x64 of 4x4.
# In the simulator (where a block's threads and each syncthreads are slow) 16 threads: 32x32 tiles of 8x8
# per thread, or 16x16 of 4x4.
LARGE_TILES = (32, 32, 16, 8, 8) if SIMULATOR else (128, 128, 8, 8, 8)
SMALL_TILES = (16, 16, 16, 4, 4) if SIMULATOR else (64, 64, 16, 4, 4)
ACTIVATION_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4}


@cuda.jit(device=True)
def activate(v, code, alpha):
    if code == 1:
        return relu_scalar(v, alpha)
    if code == 2:
        return leaky_relu_scalar(v, alpha)
    if code == 3:
        return sigmoid_scalar(v, alpha)
    if code == 4:
        return tanh_scalar(v, alpha)
    return v


@functools.cache
def _gemm_kernel(dtype, tiles):
    BM, BN, BK, TM, TN = tiles
    NTY, NTX = BM // TM, BN // TN  # threads per block along rows and columns
    PADDED_BM = BM + 4  # the (M, K) operand's stores into shared memory then hit distinct banks
    nb_dtype, zero = numba.from_dtype(dtype), dtype.type(0)

    @kernel
    def gemm(a, b, trans_a, trans_b, bias, has_bias, code, alpha, out):
        sa = cuda.shared.array((BK, PADDED_BM), nb_dtype)
        sb = cuda.shared.array((BK, BN), nb_dtype)
        acc = cuda.local.array((TM, TN), nb_dtype)
        ra = cuda.local.array(TM, nb_dtype)
        rb = cuda.local.array(TN, nb_dtype)
        m, n = out.shape
        k_total = a.shape[0] if trans_a else a.shape[1]
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        tid = ty * NTX + tx
        row0, col0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = zero
        for k0 in range(0, k_total, BK):
            for e in range(tid, BM * BK, NTX * NTY):
                if trans_a:  # a is (K, M): consecutive threads take consecutive rows of op(a)
                    kk, ii = e // BM, e % BM
                else:  # a is (M, K): consecutive threads take consecutive k
                    ii, kk = e // BK, e % BK
                gi, gk = row0 + ii, k0 + kk
                v = zero
                if gi < m and gk < k_total:
                    v = a[gk, gi] if trans_a else a[gi, gk]
                sa[kk, ii] = v
            for e in range(tid, BK * BN, NTX * NTY):
                if trans_b:  # b is (N, K)
                    jj, kk = e // BK, e % BK
                else:  # b is (K, N)
                    kk, jj = e // BN, e % BN
                gj, gk = col0 + jj, k0 + kk
                v = zero
                if gj < n and gk < k_total:
                    v = b[gj, gk] if trans_b else b[gk, gj]
                sb[kk, jj] = v
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
                    out[gi, gj] = activate(v, code, alpha)

    return gemm


def _tile_count(m, n, tiles):
    return -(-m // tiles[0]) * -(-n // tiles[1])


def matmul(a, b, trans_a, trans_b, bias, activation, alpha, out):
    m, n = out.shape
    if m == 0 or n == 0:
        return
    tiles = LARGE_TILES if _tile_count(m, n, LARGE_TILES) >= sm_count() else SMALL_TILES
    BM, BN, _, TM, TN = tiles
    dtype = np.dtype(out.dtype)
    has_bias = bias is not None
    _gemm_kernel(dtype, tiles)[(-(-n // BN), -(-m // BM)), (BN // TN, BM // TM)](
        a, b, trans_a, trans_b, bias if has_bias else out[0], has_bias, ACTIVATION_CODES[activation],
        dtype.type(alpha), out)
