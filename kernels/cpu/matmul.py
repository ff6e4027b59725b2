"""GEMM with a fused epilogue: ``out = act(op(a) @ op(b) + bias)``, register-tiled and blocked (see _gemm)."""

import numba
import numpy as np

from ._gemm import ACTIVATION_CODES, PARALLEL_MIN_FLOPS, TILES, gemm, gemm_parallel

_NO_BIAS = {dtype: np.empty(0, dtype) for dtype in TILES}  # stands in for bias=None


def matmul(a, b, trans_a, trans_b, bias, activation, alpha, out):
    """The transposes are strided views read in place; bias and activation are applied to each output
    tile as it is finished. Kept lean: at 64^3 this wrapper is a fifth of the call."""
    dtype = out.dtype
    if trans_a:
        a = a.T
    if trans_b:
        b = b.T
    if (a.strides[0] | a.strides[1] | b.strides[0] | b.strides[1]) % dtype.itemsize:  # not whole elements
        a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if bias is None:
        bias = _NO_BIAS[dtype]
    elif not bias.flags.c_contiguous:
        bias = np.ascontiguousarray(bias)
    (m, k), n = a.shape, b.shape[1]
    threads = numba.get_num_threads() if 2 * m * k * n >= PARALLEL_MIN_FLOPS else 1
    if threads == 1:
        gemm(a, b, bias, ACTIVATION_CODES[activation], alpha, out)
    else:
        item = dtype.itemsize
        gemm_parallel(a.ctypes.data, a.strides[0] // item, a.strides[1] // item, b.ctypes.data,
                      b.strides[0] // item, b.strides[1] // item, k, bias, ACTIVATION_CODES[activation], alpha,
                      out, threads)
