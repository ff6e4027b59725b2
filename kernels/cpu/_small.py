"""Small-M routes of kernels.cpu.matmul: products with few rows of ``out`` (a batch of 1 to ~64 samples),
where the blocked GEMM (``_gemm``) spends more on packing B and on its fixed costs than on the arithmetic.

- ``rows`` (one output row at a time as a sum of B's rows scaled by A's elements, B read in place): for
  M = 1, a GEMV streaming each of W's rows once (the blocked GEMM packs the whole of B on every call,
  400 KB for a 784 x 128 layer at batch 1); for K <= ROWS_MAX_K, the outer product ``x^T dy`` of a batch
  of one; for M <= 2 with B's columns strided (``dy @ W^T``, W narrow), four columns at a time on W in place.
  Memory-bound either way; each element is summed over K in order.
- ``dots`` (A's rows and B^T's rows contiguous along K, as in ``dy @ W^T``): ``_gemm``'s dot-product tiles
  on B^T in place, instead of packing it first.
- ``tiles`` (B's rows contiguous): ``_gemm``'s register-tile body on B in place, one N block, instead of
  packing B per (K, N) block; B's panels are reused by only M / MR rows of tiles, too few to pay for it.
  The rows below the last full row of tiles (M = 32: 2 of 32 for a 6-row tile) go to ``rows``.

:func:`route` is the one choice between these and the GEMM (serial or multithreaded), and
:func:`dispatcher` the one mapping from that choice to a kernel call, shared by ``kernels.cpu.matmul`` and
the compiled epoch (``kernels.cpu.step``), so both run the same code on the same product. Every route
computes each element of ``out`` on one thread, so its result does not depend on the thread count.
"""

import numpy as np
from llvmlite import ir
from numba import carray, types
from numba.extending import intrinsic, overload, register_jitable

from ._gemm import (LANES, NONE, PACK_B_MIN, _DOT_MR, _DOT_NR, _dot_kernel, _emit_tile, _epilogue, _load, _run_block,
                    _tile, edge_size, narrow)
from ._jit import jit
from ._math import _fma

GEMM, PARALLEL, ROWS, DOTS, TILES = range(5)  # route codes: the blocked GEMM serial / multithreaded, this module's
# columns of a GEMM settings row: matmul.TILING's four (register-tile variant, kc, nc_bytes, mc), then (the compiled
# epoch's row only) the thread count, the multithreading threshold in flops, the addresses of _gemm.body's two bodies
VARIANT, KC, NC_BYTES, MC, THREADS, MIN_FLOPS, BODY, DOTS_BODY = range(8)
# Where each route beat the GEMM (1 thread, float32, Zen 3, thread CPU time; see the commit message):
# rows: B read once per row of out; in a compiled loop 1 x 784 x 128 71 -> 9 us (2 x 784 x 128: 60 -> 16 from
# Python), the outer product 784 x 1 x 128 (x^T dy at batch 1) 25 -> 9, 784 x 2 x 128 23 -> 18, at K = 4 no gain
ROWS_MAX_M, ROWS_MAX_K = 2, 2
DOTS_MAX_M, DOTS_MIN_K = 8, 64  # dots: the horizontal sums per element cost too much below that K
TILES_MAX_M = 32  # tiles: only where the GEMM would pack B (more than PACK_B_MIN elements)


@register_jitable  # plain Python from matmul.py, inlined in kernels.cpu.step's driver
def route(m, k, n, sa_k, sb_k, sb_j, threads, min_flops):
    """Which code computes an ``m x k @ k x n`` product whose operands have element strides ``sa_k`` (A
    along K), ``sb_k``, ``sb_j`` (B along K and N), on ``threads`` threads; ``min_flops`` is the GEMM's
    multithreading threshold (a small-M route is serial: ``tiles`` only below it)."""
    if m == 0 or n == 0:
        return GEMM
    if (m <= ROWS_MAX_M or k <= ROWS_MAX_K) and sb_j == 1 or m <= ROWS_MAX_M and sb_k == 1 and k < DOTS_MIN_K:
        return ROWS
    if m <= DOTS_MAX_M and k >= DOTS_MIN_K and sa_k == 1 and sb_k == 1:
        return DOTS
    parallel = threads > 1 and 2 * m * k * n >= min_flops
    if m <= TILES_MAX_M and not parallel and sb_j == 1 and k * n > PACK_B_MIN and not narrow(n, k, sa_k):
        return TILES
    return PARALLEL if parallel else GEMM


def dispatcher(call, address):
    """``matmul(target, settings, threads, min_flops, a, b, bias, act, alpha, out)``: ``out = act(a @ b + bias)``
    by the kernel :func:`route` chooses, ``settings`` a GEMM settings row (at least its TILING columns). The
    one mapping from a route to its kernel's arguments, for both callers: ``call(target, way, args)`` calls
    route ``way``'s kernel (from Python by its dispatcher, from the compiled epoch by its address) and
    ``address(target, settings, dtype, dots)`` gives the GEMM body's address (``_gemm.body``), asked for only
    on the routes that take one."""
    def matmul(target, settings, threads, min_flops, a, b, bias, act, alpha, out):
        (m, k), n = a.shape, b.shape[1]
        item = out.itemsize
        sa_i, sa_k, sb_k, sb_j = a.strides[0] // item, a.strides[1] // item, b.strides[0] // item, b.strides[1] // item
        way = route(m, k, n, sa_k, sb_k, sb_j, threads, min_flops)
        if way == ROWS:
            call(target, ROWS, (_at(a), sa_i, sa_k, _at(b), sb_k, sb_j, k, bias, act, alpha, out))
        elif way == DOTS:
            call(target, DOTS, (_at(a), sa_i, _at(b), sb_j, k, bias, act, alpha, out, settings[VARIANT]))
        elif way == TILES:
            call(target, TILES, (_at(a), sa_i, sa_k, _at(b), sb_k, k, bias, act, alpha, out, settings[VARIANT],
                                 settings[KC], address(target, settings, out.dtype, False)))
        elif way == GEMM:
            call(target, GEMM, (a, b, bias, act, alpha, out, settings[VARIANT], settings[KC], settings[NC_BYTES],
                                address(target, settings, out.dtype, narrow(n, k, sa_k))))
        else:
            dots_ = narrow(n, k, sa_k)
            call(target, PARALLEL, (_at(a), sa_i, sa_k, _at(b), sb_k, sb_j, k, bias, act, alpha, out, threads,
                                    settings[VARIANT], settings[KC], settings[NC_BYTES], settings[MC],
                                    address(target, settings, out.dtype, dots_), dots_))

    return matmul


def _at(a):
    """The address of ``a``'s first element, as the kernels take it (a Python int; an intp when compiled)."""
    return a.ctypes.data


@overload(_at)
def _at_compiled(a):
    return lambda a: np.intp(a.ctypes.data)


def _row_kernel(vectors, resume=False):
    """An intrinsic ``(pa, sa_k, pb, sb_k, k, pc, like)``: ``pc[j] = sum_p pa[p*sa_k] * pb[p*sb_k + j]`` for
    ``vectors`` vectors of columns, ``_gemm``'s register tile with one row: the accumulators stay in
    registers over the whole K loop, B's row segments are streamed in place. With ``resume`` the FMA chains
    start from the sums at ``pc`` instead of zero: a product computed over K in pieces, bit for bit as in
    one (the compiled epoch's next forward product, folded into the update of W piece by piece)."""
    @intrinsic
    def kernel(typingctx, pa, sa_k, pb, sb_k, k, pc, like):
        def codegen(context, builder, sig, args):
            fty = context.get_value_type(sig.args[6].dtype)
            size = context.get_abi_sizeof(fty)
            lanes = LANES[np.dtype(str(sig.args[6].dtype))]
            pa_, sa_k_, pb_, sb_k_, k_, pc_, _ = args
            zero = ir.Constant(ir.IntType(64), 0)
            _emit_tile(builder, fty, size, 1, vectors * lanes, lanes, pa_, zero, sa_k_, pb_, sb_k_, k_, pc_, zero,
                       zero, resume)
            return context.get_dummy_value()

        return types.void(*[types.intp] * 6, like), codegen

    return kernel


ROW_VECTORS = 8  # vector accumulators of the row kernel (64 float32 or 32 float64 columns)
_row_wide, _row_one = _row_kernel(ROW_VECTORS), _row_kernel(1)
_resume_wide, _resume_one = _row_kernel(ROW_VECTORS, resume=True), _row_kernel(1, resume=True)


@intrinsic
def _voidptr(typingctx, address):
    """The byte ``address`` (an intp) as a pointer, for ``numba.carray``."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(types.intp), codegen


@jit(fastmath=False)
def _outer(a_at, sa_i, sa_k, b_at, sb_k, k, out):
    """``out = a @ b`` for K of 1 or 2 (an outer product: x^T dy at a batch of one or two), one
    vectorised pass over each row per term: each element the chain of FMAs from zero that the register tile
    computes, so bit for bit its sums (signed zeros too: no fast-math flags here), without the tile's
    set-up per call (784 x 1 x 128, float32: 13-19 -> 9-12 us)."""
    m, n = out.shape
    item = out.itemsize
    b0 = carray(_voidptr(b_at), n, out.dtype)
    b1 = carray(_voidptr(b_at + (k - 1) * sb_k * item), n, out.dtype)  # B's last row
    zero = out.dtype.type(0)
    for i in range(m):
        a = _load(a_at + i * sa_i * item, out)
        for j in range(np.uint64(n)):
            out[i, j] = _fma(a, b0[j], zero)
        if k == 2:
            a = _load(a_at + (i * sa_i + sa_k) * item, out)
            for j in range(np.uint64(n)):
                out[i, j] = _fma(a, b1[j], out[i, j])


@jit(inline="always")
def _strided(pa, sa_k, pb, sb_k, sb_j, k, out, i):
    """``out[i] = a @ b`` for B's columns strided (``sb_j`` elements apart: ``dy @ W^T`` for a narrow W, its
    rows contiguous along K), four columns at a time, each element the chain of FMAs from zero over K in
    order that the GEMM's register tile computes (bit for bit its sums, without packing B)."""
    n, item = out.shape[1], out.itemsize
    zero = out.dtype.type(0)
    for j in range(0, n - 3, 4):
        s0, s1, s2, s3 = zero, zero, zero, zero
        at = pb + j * sb_j * item
        for p in range(k):
            a, b = _load(pa + p * sa_k * item, out), at + p * sb_k * item
            s0, s1 = _fma(a, _load(b, out), s0), _fma(a, _load(b + sb_j * item, out), s1)
            s2, s3 = _fma(a, _load(b + 2 * sb_j * item, out), s2), _fma(a, _load(b + 3 * sb_j * item, out), s3)
        out[i, j], out[i, j + 1], out[i, j + 2], out[i, j + 3] = s0, s1, s2, s3
    for j in range(n - n % 4, n):
        s0 = zero
        for p in range(k):
            s0 = _fma(_load(pa + p * sa_k * item, out), _load(pb + (p * sb_k + j * sb_j) * item, out), s0)
        out[i, j] = s0


@jit
def rows(a_at, sa_i, sa_k, b_at, sb_k, sb_j, k, bias, act, alpha, out):
    """``out = act(a @ b + bias)`` row by row: ``out[i] = sum_p a[i, p] * b[p]`` over B's rows in place (B's
    rows contiguous; A at ``a_at`` with element strides ``sa_i``, ``sa_k``), in column blocks of one-row
    register tiles (the last columns one vector, then one by one; an outer product as :func:`_outer`), then
    the epilogue, if any, on the row while it is in L1. Each element is summed over K in order. B's columns
    strided (``sb_j`` != 1): :func:`_strided`."""
    m, n = out.shape
    item = out.itemsize
    lanes = 32 // item  # 256-bit vectors, as in _gemm.LANES
    wide = ROW_VECTORS * lanes
    out_at = np.intp(out.ctypes.data)
    outer, finish = 0 < k <= 2 and sb_j == 1, bias.size > 0 or act != NONE  # _outer takes one or two terms
    if outer:
        _outer(a_at, sa_i, sa_k, b_at, sb_k, k, out)
    for i in range(m):
        if sb_j != 1:
            _strided(a_at + i * sa_i * item, sa_k, b_at, sb_k, sb_j, k, out, i)
        elif not outer:
            pa, pc = a_at + i * sa_i * item, out_at + i * n * item
            j = 0
            while j + wide <= n:
                _row_wide(pa, sa_k, b_at + j * item, sb_k, k, pc + j * item, out)
                j += wide
            while j + lanes <= n:
                _row_one(pa, sa_k, b_at + j * item, sb_k, k, pc + j * item, out)
                j += lanes
            for jj in range(j, n):
                s = out.dtype.type(0)
                for p in range(k):
                    s += _load(pa + p * sa_k * item, out) * _load(b_at + (p * sb_k + jj) * item, out)
                out[i, jj] = s
        if finish:
            _epilogue(out, i, 1, 0, n, bias, bias.size > 0, act, out.dtype.type(alpha))


@jit
def dots(a_at, sa_i, b_at, sb_j, k, bias, act, alpha, out, variant):
    """``out = act(a @ b + bias)`` for A's rows and B^T's rows contiguous along K (element strides ``sa_i``
    and ``sb_j`` between them): ``_gemm``'s dot-product tiles reading B^T in place, the epilogue per row
    block."""
    m, n = out.shape
    item = out.itemsize
    mr, nr = _DOT_MR[variant], _DOT_NR[variant]
    flat = out.reshape(m * n)
    for row in range(0, m, mr):
        count = min(mr, m - row)
        for col in range(0, n, nr):
            _dot_kernel(variant, a_at + row * sa_i * item, sa_i, count, b_at + col * sb_j * item, sb_j,
                        min(nr, n - col), k, flat, row * n + col, n)
        _epilogue(out, row, count, 0, n, bias, bias.size > 0, act, out.dtype.type(alpha))


@jit
def tiles(a_at, sa_i, sa_k, b_at, sb_k, k, bias, act, alpha, out, variant, kc_max, body):
    """``out = act(a @ b + bias)`` by ``_gemm``'s register-tile body (its address ``body``) with B's rows
    read in place (contiguous), one N block, K blocks of at most ``kc_max`` (``k`` > 0)."""
    m, n = out.shape
    if m == 0 or n == 0:
        return
    mr, nr = _tile(variant, out)
    kc = -(-k // -(-k // kc_max))  # balanced K blocks, as the body cuts them
    # rows below the last full row of tiles: one-row tiles (``rows``) instead of a zero-padded MR-row tile,
    # where both sum each element in one pass over K in order with whole vectors (bitwise the same)
    top = m - m % mr if k <= kc_max and n % (32 // out.itemsize) == 0 else m
    if top > 0:
        _run_block(body, a_at, sa_i, sa_k, b_at, sb_k, 1, k, bias, act, out.dtype.type(alpha), out, 0, top, 0, n,
                   variant, kc_max, -(-n // nr) * nr, False, np.empty(0, out.dtype),
                   np.empty(edge_size(mr, nr, kc), out.dtype), np.empty(mr * nr, out.dtype))
    if top < m:
        rows(a_at + top * sa_i * out.itemsize, sa_i, sa_k, b_at, sb_k, 1, k, bias, act, alpha, out[top:])
