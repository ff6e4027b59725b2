"""Fused kernels of the training step (Numba CPU); the reference's ``fused`` says what they compute.

``bias_act_backward`` adds each row's ``dz`` to the column sums in the same order as ``bias_grad``
(serially, or per block of rows into partial sums that are then summed), so it gives bit for bit what
the separate ``*_backward`` and ``bias_grad`` calls give, in one pass over ``dy``.
"""

import math

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, register_jitable

from . import activations as act
from ._jit import jit, serial
from ._math import _fma
from ..reference.fused import FACTOR_MAX, FACTOR_MIN, factor_limit
from ._parallel import CHUNK, n_chunks, scheduled


def _bias_act_backward_kernel(op, name):
    """``(y, dy, alpha, dz, db)`` for the derivative ``op(y, dy, alpha)``."""

    @act.scalar
    def rows(y, dy, alpha, dz, db):
        db[:] = 0
        for r in range(y.shape[0]):
            for j in range(db.size):
                d = op(y[r, j], dy[r, j], alpha)
                dz[r, j] = d
                db[j] += d

    def kernel(y, dy, alpha, dz, db):
        n = y.shape[0]
        if y.size < act.PARALLEL_MIN:
            rows(y, dy, alpha, dz, db)
            return
        block = max(1, CHUNK // y.shape[1])  # the row blocks of bias_grad
        partial = np.empty(((n + block - 1) // block, y.shape[1]), y.dtype)
        for b in prange(partial.shape[0]):
            lo, hi = b * block, min(n, (b + 1) * block)
            rows(y[lo:hi], dy[lo:hi], alpha, dz[lo:hi], partial[b])
        db[:] = 0
        for b in range(partial.shape[0]):
            for j in range(db.size):
                db[j] += partial[b, j]

    kernel.__name__ = kernel.__qualname__ = name
    return jit(kernel, parallel=True)


_BIAS_ACT_BACKWARD = {
    "relu": _bias_act_backward_kernel(act._relu_backward, "bias_relu_backward"),
    "leaky_relu": _bias_act_backward_kernel(act._leaky_relu_backward, "bias_leaky_relu_backward"),
    "sigmoid": _bias_act_backward_kernel(act._sigmoid_backward, "bias_sigmoid_backward"),
    "tanh": _bias_act_backward_kernel(act._tanh_backward, "bias_tanh_backward"),
}


_BIAS_ACT_BACKWARD_SERIAL = {name: serial(kernel) for name, kernel in _BIAS_ACT_BACKWARD.items()}
_BIAS_ACT_BACKWARD_SCHEDULED = {name: scheduled(kernel, _BIAS_ACT_BACKWARD_SERIAL[name], act.PARALLEL_MIN)
                                for name, kernel in _BIAS_ACT_BACKWARD.items()}


def bias_act_backward(y, dy, activation, alpha, dz, db):
    _BIAS_ACT_BACKWARD_SCHEDULED[activation](y, dy, y.dtype.type(alpha), dz, db)


NORMS_PARALLEL_MIN = 1 << 19  # one read-only pass: threads paid off only from about this size
# Squares are summed per piece of this many elements (at multiples of it in the buffer, cut by the segments'
# bounds), the pieces' sums in order: the same sums on any number of threads.
PIECE = 1 << 11


SQUARE_LANES, SQUARE_SUMS = 4, 8  # float64 lanes of a vector, vector partial sums (an FMA's latency x 2 per cycle)
SQUARE_BLOCK = SQUARE_LANES * SQUARE_SUMS


def _sum_lanes(builder, sums):
    """The float64 vector ``sums`` added pairwise, then their lanes pairwise (``_square_blocks``' order)."""
    while len(sums) > 1:
        sums = [builder.fadd(sums[j], sums[j + 1]) for j in range(0, len(sums), 2)]
    total = [builder.extract_element(sums[0], ir.Constant(ir.IntType(32), j)) for j in range(SQUARE_LANES)]
    while len(total) > 1:
        total = [builder.fadd(total[j], total[j + 1]) for j in range(0, len(total), 2)]
    return total[0]


def _block_loop(builder, blocks, body):
    """A loop over ``blocks`` (> 0 or not) blocks of SQUARE_BLOCK elements: ``body(i, sums)`` emits block
    ``i``'s IR in one basic block and returns the SQUARE_SUMS float64 vector sums after it (from zero);
    returns the final sums' total (:func:`_sum_lanes`)."""
    i64 = ir.IntType(64)
    vd = ir.VectorType(ir.DoubleType(), SQUARE_LANES)
    zero = ir.Constant(vd, [0.0] * SQUARE_LANES)
    entry = builder.block
    loop, done = builder.append_basic_block("squares.loop"), builder.append_basic_block("squares.done")
    builder.cbranch(builder.icmp_signed(">", blocks, ir.Constant(i64, 0)), loop, done)
    builder.position_at_end(loop)
    i, acc = builder.phi(i64), [builder.phi(vd) for _ in range(SQUARE_SUMS)]
    new = body(i, acc)
    following = builder.add(i, ir.Constant(i64, 1))
    i.add_incoming(ir.Constant(i64, 0), entry)
    i.add_incoming(following, loop)
    for phi, value in zip(acc, new):
        phi.add_incoming(zero, entry)
        phi.add_incoming(value, loop)
    builder.cbranch(builder.icmp_signed("<", following, blocks), loop, done)
    builder.position_at_end(done)
    total = []
    for value in new:
        phi = builder.phi(vd)
        phi.add_incoming(zero, entry)
        phi.add_incoming(value, loop)
        total.append(phi)
    return _sum_lanes(builder, total)


def _squares_into(builder, fty, values, acc):
    """``acc[k] += values' elements 4k..4k+3 squared`` in float64 (one FMA each), ``values`` the block as
    vectors of ``fty``: the sums ``_square_blocks`` keeps."""
    dty = ir.DoubleType()
    vd = ir.VectorType(dty, SQUARE_LANES)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vd, [vd] * 3), f"llvm.fma.v{SQUARE_LANES}f64")
    lanes = values[0].type.count
    new = []
    for k in range(SQUARE_SUMS):
        v, at = values[k * SQUARE_LANES // lanes], k * SQUARE_LANES % lanes
        if lanes != SQUARE_LANES:
            v = builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined),
                                       ir.Constant(ir.VectorType(ir.IntType(32), SQUARE_LANES),
                                                   list(range(at, at + SQUARE_LANES))))
        v = v if fty == dty else builder.fpext(v, vd)
        new.append(builder.call(fma, [v, v, acc[k]]))
    return new


@intrinsic
def _square_blocks(typingctx, address, blocks, like):
    """The sum of squares in float64 of ``blocks`` * SQUARE_BLOCK elements of ``like``'s dtype from byte
    ``address`` on: element i into lane i % SQUARE_LANES of vector sum (i // SQUARE_LANES) % SQUARE_SUMS,
    then the sums and the lanes added pairwise. IR without fast-math flags, which no optimiser may reorder:
    call it only from a function compiled without them (Numba adds them to every float operation of a
    fast-math function, this IR included)."""
    def codegen(context, builder, sig, args):
        fty, i64 = context.get_value_type(sig.args[2].dtype), ir.IntType(64)
        vin = ir.VectorType(fty, SQUARE_LANES)
        x = builder.inttoptr(args[0], fty.as_pointer())

        def body(i, acc):
            start = builder.mul(i, ir.Constant(i64, SQUARE_BLOCK))
            at = [builder.gep(x, [builder.add(start, ir.Constant(i64, k * SQUARE_LANES))]) for k in range(SQUARE_SUMS)]
            values = [builder.load(builder.bitcast(p, vin.as_pointer()), align=context.get_abi_sizeof(fty)) for p in at]
            return _squares_into(builder, fty, values, acc)

        return _block_loop(builder, args[1], body)

    return types.float64(types.intp, types.intp, like), codegen


@jit(fastmath=False)
def _sum_squares(x, lo, hi):
    """Sum of x[lo:hi]**2 in float64 in a fixed order: :func:`_square_blocks`, then the rest one by one. No
    fast-math flags here either: every copy of this code (the kernels' own, the compiled step's, whatever
    LLVM inlines where) sums alike, so the norms of the compiled step and of segment_norms agree bit for bit."""
    blocks = (hi - lo) // SQUARE_BLOCK
    total = _square_blocks(np.intp(x.ctypes.data) + lo * x.itemsize, blocks, x)
    for j in range(lo + blocks * SQUARE_BLOCK, hi):
        v = np.float64(x[j])
        total = _fma(v, v, total)
    return total


@jit(inline="always")
def _piece_sum(x, p, lo, hi):
    """The sum of squares of piece ``p`` of the buffer within ``[lo, hi)`` (0 where they do not meet)."""
    a, b = max(lo, p * PIECE), min(hi, (p + 1) * PIECE)
    return _sum_squares(x, a, b) if a < b else 0.0


@jit(parallel=True, fastmath=False)
def segment_norms(x, offsets, out):
    """One pass over the flat buffer, no BLAS. Each segment's sum of squares is summed from its PIECE-sized
    pieces in order, serially or (large buffers) from per-piece sums computed in parallel chunks, so the
    result depends neither on the thread count nor on the branch, and a caller that has the pieces' sums
    (the compiled step's product-and-update pass) gets the same norm. No fast-math flags: they would let
    LLVM reorder the sum over pieces."""
    segments = out.size
    if x.size < NORMS_PARALLEL_MIN:
        for s in range(segments):
            lo, hi = offsets[s], offsets[s + 1]
            total = 0.0
            for p in range(lo // PIECE, (hi + PIECE - 1) // PIECE):
                total += _piece_sum(x, p, lo, hi)
            out[s] = np.sqrt(total)
        return
    pieces, per_chunk = (x.size + PIECE - 1) // PIECE, CHUNK // PIECE
    partial = np.zeros((pieces, segments))
    for c in prange(n_chunks(x.size)):
        first = min(pieces, c * per_chunk)
        s = max(0, np.searchsorted(offsets, first * PIECE, side="right") - 1)  # the segments from the chunk's on
        for p in range(first, min(pieces, (c + 1) * per_chunk)):
            while s < segments and offsets[s + 1] <= p * PIECE:  # ended before this piece
                s += 1
            t = s
            while t < segments and offsets[t] < (p + 1) * PIECE:  # the segments this piece meets
                partial[p, t] = _piece_sum(x, p, offsets[t], offsets[t + 1])
                t += 1
    for s in range(segments):
        total = 0.0
        for p in range(offsets[s] // PIECE, (offsets[s + 1] + PIECE - 1) // PIECE):
            total += partial[p, s]
        out[s] = np.sqrt(total)


segment_norms_serial = serial(segment_norms)
segment_norms_scheduled = scheduled(segment_norms, segment_norms_serial, NORMS_PARALLEL_MIN)


@jit(inline="always", fastmath=False)
def _dot(a, b):
    """``sum_p a[p] b[p]`` in float64, the elements of each whole block of eight into eight partial sums, the
    rest into the first, the sums then added in order: independent chains, which vectorise without fast-math
    flags."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    n = a.size
    for p in range(0, n - n % 8, 8):
        s0 = _fma(np.float64(a[p]), np.float64(b[p]), s0)
        s1 = _fma(np.float64(a[p + 1]), np.float64(b[p + 1]), s1)
        s2 = _fma(np.float64(a[p + 2]), np.float64(b[p + 2]), s2)
        s3 = _fma(np.float64(a[p + 3]), np.float64(b[p + 3]), s3)
        s4 = _fma(np.float64(a[p + 4]), np.float64(b[p + 4]), s4)
        s5 = _fma(np.float64(a[p + 5]), np.float64(b[p + 5]), s5)
        s6 = _fma(np.float64(a[p + 6]), np.float64(b[p + 6]), s6)
        s7 = _fma(np.float64(a[p + 7]), np.float64(b[p + 7]), s7)
    for p in range(n - n % 8, n):
        s0 = _fma(np.float64(a[p]), np.float64(b[p]), s0)
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


_factor_limit = register_jitable(factor_limit)


@jit(inline="always", fastmath=False)
def _trusted(squares, row):
    """Whether a row's sum of ``squares`` lies where the factors are exact in float64 (NaN: no), or the row
    is zeros (not merely squares rounded to 0)."""
    if FACTOR_MIN <= squares <= FACTOR_MAX:
        return True
    if squares != 0:
        return False
    for v in row:
        if v != 0:
            return False
    return True


@jit(fastmath=False)
def dense_grad_norm(x, dy, db, out):
    """The reference's, its dot products in a fixed order (:func:`_dot`; no fast-math flags: the compiled
    training step calls this very code, so its norms are the per-kernel step's bit for bit)."""
    rows, k, n = x.shape[0], x.shape[1], dy.shape[1]
    trusted, bound, total = True, 0.0, 0.0
    for r in range(rows):  # the diagonal pairs (r, r)
        sx, sd = _dot(x[r], x[r]), _dot(dy[r], dy[r])
        trusted &= _trusted(sx, x[r]) and _trusted(sd, dy[r])
        bound += math.sqrt(sx) * math.sqrt(sd)
        total += sx * sd
    if trusted and bound < _factor_limit(x.dtype, rows):
        for r in range(rows):  # the pairs r < s, each twice
            for s in range(r + 1, rows):
                total += 2 * (_dot(x[r], x[s]) * _dot(dy[r], dy[s]))
        w = math.sqrt(max(total, 0.0))  # >= 0 but for rounding
    else:  # the product as the dtype computes it (a chain of FMAs from zero over the rows), squared
        total = 0.0
        zero = x.dtype.type(0)
        for p in range(k):
            for j in range(n):
                g = zero
                for r in range(rows):
                    g = _fma(x[r, p], dy[r, j], g)
                total += np.float64(g) * np.float64(g)
        w = math.sqrt(total)
    out[0] = math.hypot(w, math.sqrt(_dot(db, db)))
