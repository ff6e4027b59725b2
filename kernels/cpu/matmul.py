"""GEMM with a fused epilogue: ``out = act(op(a) @ op(b) + bias)``, register-tiled and blocked (see _gemm)."""

import numba
import numpy as np

from . import _cpuinfo
from ._gemm import ACTIVATION_CODES, DTYPES, PARALLEL_MIN_FLOPS, body, gemm, gemm_parallel, narrow

_NO_BIAS = {dtype: np.empty(0, dtype) for dtype in DTYPES}  # stands in for bias=None
# (variant index, kc, nc_bytes, mc): the register tile and blocking chosen for this CPU (_cpuinfo);
# tests replace it to run every variant
TILING = (_cpuinfo.VARIANT_INDEX, _cpuinfo.KC, _cpuinfo.NC_BYTES, _cpuinfo.MC)


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
    variant, kc, nc_bytes, mc = TILING
    threads = numba.get_num_threads() if 2 * m * k * n >= PARALLEL_MIN_FLOPS else 1
    item = dtype.itemsize
    dots = narrow(n, k, a.strides[1] // item)
    if threads == 1:
        gemm(a, b, bias, ACTIVATION_CODES[activation], alpha, out, variant, kc, nc_bytes, body(dtype, dots))
    else:
        gemm_parallel(a.ctypes.data, a.strides[0] // item, a.strides[1] // item, b.ctypes.data,
                      b.strides[0] // item, b.strides[1] // item, k, bias, ACTIVATION_CODES[activation], alpha,
                      out, threads, variant, kc, nc_bytes, mc, body(dtype, dots), dots)
