"""GEMM with a fused epilogue: ``out = act(op(a) @ op(b) + bias)``, register-tiled and blocked (see _gemm)."""

import numba
import numpy as np

from ._gemm import ACTIVATION_CODES, KC, NC_BYTES, PARALLEL_MIN_FLOPS, TILES, gemm

# Per dtype: the register tile (MR, NR), the N block (a multiple of NR whose packed KC x NC block of B
# is NC_BYTES), and an empty array standing in for bias=None.
_PARAMS = {dtype: (mr, nr, max(nr, NC_BYTES // (KC * dtype.itemsize) // nr * nr), np.empty(0, dtype))
           for dtype, (mr, nr, _) in TILES.items()}


def matmul(a, b, trans_a, trans_b, bias, activation, alpha, out):
    """The transposes are strided views read in place; bias and activation are applied to each output
    tile as it is finished."""
    dtype = out.dtype
    mr, nr, nc_max, no_bias = _PARAMS[dtype]
    a, b = (a.T if trans_a else a), (b.T if trans_b else b)
    if (a.strides[0] | a.strides[1] | b.strides[0] | b.strides[1]) % dtype.itemsize:  # not whole elements
        a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    big = 2 * a.shape[0] * a.shape[1] * b.shape[1] >= PARALLEL_MIN_FLOPS
    gemm(a, b, no_bias if bias is None else np.ascontiguousarray(bias), bias is not None,
         ACTIVATION_CODES[activation], dtype.type(alpha), out, mr, nr, nc_max, numba.get_num_threads() if big else 1)
