"""GEMM with a fused epilogue: ``out = act(op(a) @ op(b) + bias)``, register-tiled and blocked (see _gemm),
with routes for a few rows of ``out`` (see _small)."""

import numba
import numpy as np

from . import _cpuinfo
from ._gemm import ACTIVATION_CODES, DTYPES, PARALLEL_MIN_FLOPS, body, gemm, gemm_parallel, narrow
from ._small import DOTS, GEMM, ROWS, TILES, dots, route, rows, tiles

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
    item = dtype.itemsize
    sa_i, sa_k, sb_k, sb_j = a.strides[0] // item, a.strides[1] // item, b.strides[0] // item, b.strides[1] // item
    threads = numba.get_num_threads()
    way, act = route(m, k, n, sa_k, sb_k, sb_j, threads, PARALLEL_MIN_FLOPS), ACTIVATION_CODES[activation]
    if way == ROWS:
        rows(a.ctypes.data, sa_i, sa_k, b.ctypes.data, sb_k, k, bias, act, alpha, out)
    elif way == DOTS:
        dots(a.ctypes.data, sa_i, b.ctypes.data, sb_j, k, bias, act, alpha, out, variant)
    elif way == TILES:
        tiles(a.ctypes.data, sa_i, sa_k, b.ctypes.data, sb_k, k, bias, act, alpha, out, variant, kc, body(dtype))
    elif way == GEMM:
        gemm(a, b, bias, act, alpha, out, variant, kc, nc_bytes, body(dtype, narrow(n, k, sa_k)))
    else:
        dots_ = narrow(n, k, sa_k)
        gemm_parallel(a.ctypes.data, sa_i, sa_k, b.ctypes.data, sb_k, sb_j, k, bias, act, alpha, out, threads, variant,
                      kc, nc_bytes, mc, body(dtype, dots_), dots_)
