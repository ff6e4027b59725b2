"""GEMM with a fused epilogue: ``out = act(op(a) @ op(b) + bias)``, register-tiled and blocked (see _gemm),
with routes for a few rows of ``out`` (see _small)."""

import numpy as np

from . import _cpuinfo
from ._gemm import ACTIVATION_CODES, DTYPES, PARALLEL_MIN_FLOPS, body, gemm, gemm_parallel, transcendental
from ._parallel import num_threads
from ._small import dispatcher, dots, rows, tiles

_NO_BIAS = {dtype: np.empty(0, dtype) for dtype in DTYPES}  # stands in for bias=None
# (variant index, kc, nc_bytes, mc): the register tile and blocking chosen for this CPU (_cpuinfo);
# tests replace it to run every variant
TILING = (_cpuinfo.VARIANT_INDEX, _cpuinfo.KC, _cpuinfo.NC_BYTES, _cpuinfo.MC)
_KERNELS = (gemm, gemm_parallel, rows, dots, tiles)  # by _small's route code


def _call(target, way, args):
    _KERNELS[way](*args)


def _address(target, settings, dtype, dots):
    return body(dtype, dots)


_routed = dispatcher(_call, _address)


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
    transcendental(dtype, activation)
    _routed(None, TILING, num_threads(), PARALLEL_MIN_FLOPS, a, b, bias, ACTIVATION_CODES[activation], alpha,
            out)
