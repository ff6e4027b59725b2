"""GEMM machinery for kernels.cpu.matmul: a register-tile micro-kernel, BLIS-style blocking and packing.

``out = act(a @ b + bias)`` for 2-D ``a`` (M, K) and ``b`` (K, N) with any strides (a transpose is a
strided view, read in place). GotoBLAS/BLIS, adapted to two cores:

- K is cut into blocks of at most ``KC`` (balanced: 784 -> 2 x 392), N into blocks of at most ``NC``.
  B's (K, N) block is packed into zero-padded micro-panels of ``NR`` columns, streamed from L2 (a small
  row-major B, at most PACK_B_MIN elements, is read in place). A is read in place through its two
  strides (a transposed A at an L1-aliasing stride is packed: PACK_A_STRIDE); the micro-kernel computes
  one MR x NR tile over the K block with every accumulator in a vector register and stores it straight
  into ``out`` (C's lines prefetched for writing first). After the last K block, bias + activation are
  applied to each row of tiles while it is in cache (sigmoid and tanh, most of the compile time, in a C
  function of their own compiled on first use: ``_transcendental``).
- A narrow ``out`` (N <= DOT_MAX_N: a classifier's output layer) with A's rows contiguous is computed as
  dot products along K (DOT_TILES), so no lane is padding.
- Products of at least PARALLEL_MIN_FLOPS are cut into chunks of ``out`` (``split``: column blocks first,
  since a row block packs its B block again); threads take chunks from an atomic counter, so a thread
  whose core is busy elsewhere takes fewer. Each element is computed by one thread over the same K
  blocks in the same order: the result is bitwise the same for any split or thread count.
- The serial loops (``_block``; ``_dots`` for narrow outputs) are compiled once per dtype as C functions
  called through their address (``body``), so the entry points (``gemm``, ``gemm_parallel``, the compiled
  epoch) compile in a fraction of a second instead of re-optimising the whole GEMM each.

Why the micro-kernel is an LLVM intrinsic: Numba leaves the SLP vectoriser off, and its loop vectoriser
either vectorises the K loop (gathers) or keeps the accumulators in memory, so a plain @njit tile loop
never gets register-resident accumulators. The intrinsic emits the loop a BLAS micro-kernel is: MR x
NR/VW vector accumulators as phi nodes, NR/VW vector loads of B and MR broadcasts of A per k. Where the
target has AVX2 and FMA, the ``avx2`` tile's K loop is inline assembly (``ASM_LOOP``: LLVM's addressing
of A's rows chained six dependent adds per k), the same FMAs in the same order as the IR loop.

Register tiles (TILES), one variant chosen per CPU by _cpuinfo, all compiled behind one switch: ``avx2``
6 x 16 float32 (12 ymm accumulators: BLIS's Haswell shape), ``avx512vl`` 6 x 32 in ymm (needs AVX-512VL's
32 registers), ``avx512`` 12 x 32 in zmm (BLIS's Skylake-X shape, transposed). A variant compiled for a
CPU without its registers is correct but spills (tests only).

Each choice here (tiles, blocking per CPU, the split, packing, the assembly loop) was measured against
its alternatives; the figures and what was tried and dropped are in the commit messages
(``git log kernels/cpu/_gemm.py``) and the GEMM benchmarks in bench/bench_matmul.py.
"""

import ctypes
import traceback

import numpy as np
from llvmlite import binding, ir
from numba import carray, cfunc, from_dtype, prange, types
from numba.core import config as numba_config
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, register_jitable

from ._jit import FASTMATH, jit
from ._math import sigmoid, tanh

# Register tiles of the micro-kernel, per variant: (MR, NR, vector lanes) for float32 and float64. A
# variant is chosen per CPU by _cpuinfo and passed to the kernels as its index in VARIANTS.
VARIANTS = ("avx2", "avx512vl", "avx512")
TILES = {
    "avx2": ((6, 16, 8), (6, 8, 4)),  # 16 ymm registers: 12 accumulators + 2 B vectors + a broadcast
    "avx512vl": ((6, 32, 8), (6, 16, 4)),  # 256-bit vectors in AVX-512VL's 32 registers: 24 accumulators
    "avx512": ((12, 32, 16), (12, 16, 8)),  # 32 zmm registers: 24 accumulators + 2 B vectors + broadcasts
}
_MR = tuple(TILES[v][0][0] for v in VARIANTS) + tuple(TILES[v][1][0] for v in VARIANTS)  # by (f64, variant)
_NR = tuple(TILES[v][0][1] for v in VARIANTS) + tuple(TILES[v][1][1] for v in VARIANTS)
LANES = {np.dtype(np.float32): 8, np.dtype(np.float64): 4}  # 256-bit vectors: packing and the dot tiles
DTYPES = tuple(LANES)
PARALLEL_MIN_FLOPS = 1 << 21  # below this (64 x 128 x 128) one thread beats waking the thread pool
CHUNKS_PER_THREAD = 4  # the multithreaded split's target: enough chunks that a late thread takes fewer
CHUNK_MIN_PANELS = 8  # the split's narrowest column block, in tile panels (each A panel used 8 times), unless
# the rows leave a thread without a chunk
PACK_PREFETCH_ROWS = 24  # _copy_panels' prefetch distance, in rows of the source: 8 left B's packing in the
# training step waiting on lines that Adam had just written (lockstep A/B of b256 epochs: 24 faster by ~2% both
# ways, 64 no different from 24)
PACK_ROWS = 64  # rows per block when packing an operand strided both ways (the block stays in L1)
PACK_B_MIN = 128 * 128  # a row-major B up to this many elements is read in place (it stays in L1/L2)
# A transposed A (A^T's rows contiguous) is packed when its K stride is a multiple of PACK_A_STRIDE bytes (a
# panel's lines then fall in at most a quarter of the sets of an L1 whose sets repeat every 4 KiB, as 32 KiB
# 8-way and 48 KiB 12-way ones do) and a row panel serves at least PACK_A_MIN_TILES tiles. 1 thread, the
# 2-thread split's chunks, best of 10, in place -> packed: x^T dy (1024, 256, 1024) 68 -> 77 GFLOP/s,
# (256, 128, 256) 63 -> 71; but at the 3136-byte stride of (784, 128, 256) 81 -> 77, into a 10-column dW 30 -> 23
PACK_A_STRIDE, PACK_A_MIN_TILES = 256, 4
PANELS_A = 8  # A^T's panels packed in one pass (48 rows of the avx2 tile: 3 cache lines per k, float32)
PANEL_SLACK = 8  # elements after each packed A^T panel that _pack_panels may write (256-bit vector lanes)

# The dot-product tile per variant (MR x NR dot products along K in vector accumulators of LANES, plus
# MR vectors of A), used when N <= DOT_MAX_N and A's rows are contiguous: N = 10 is a whole number of
# tiles wide, with no padded lanes. 5 x 5 needs 32 registers; 2 x 5 fits AVX2's 16.
DOT_TILES = {"avx2": (2, 5), "avx512vl": (5, 5), "avx512": (5, 5)}
_DOT_MR = tuple(DOT_TILES[v][0] for v in VARIANTS)
_DOT_NR = tuple(DOT_TILES[v][1] for v in VARIANTS)
DOT_MAX_N = 16

NONE, RELU, LEAKY_RELU, SIGMOID, TANH = range(5)
ACTIVATION_CODES = {None: NONE, "relu": RELU, "leaky_relu": LEAKY_RELU, "sigmoid": SIGMOID, "tanh": TANH}


def _switch(builder, variant, label):
    """Yields each name in VARIANTS with the builder in a block taken when ``variant`` is its index (the
    first one by default), then joins the blocks: the code emitted for each name is one case."""
    end = builder.append_basic_block(f"{label}.end")
    cases = [builder.append_basic_block(f"{label}.{name}") for name in VARIANTS]
    switch = builder.switch(variant, cases[0])
    for index, (name, block) in enumerate(zip(VARIANTS, cases)):
        switch.add_case(ir.Constant(variant.type, index), block)
        builder.position_at_end(block)
        yield name
        builder.branch(end)
    builder.position_at_end(end)


def _close_loop(builder, k, k_next, end, acc, new, entry, loop, done, start=None):
    """Closes a K loop over vector accumulators: ``loop`` repeats while ``k_next < end`` (``k`` starts at
    0 from ``entry``), the phis ``acc[i][j]`` start at ``start[i][j]`` (None: zero) and take ``new[i][j]``.
    Returns the final values as phis at the top of ``done`` (the start when the loop was skipped), the
    builder positioned there."""
    builder.cbranch(builder.icmp_signed("<", k_next, end), loop, done)
    k.add_incoming(ir.Constant(k.type, 0), entry)
    k.add_incoming(k_next, loop)
    builder.position_at_end(done)
    result = []
    for i, (acc_row, new_row) in enumerate(zip(acc, new)):
        result.append([])
        for j, (phi, value) in enumerate(zip(acc_row, new_row)):
            first = ir.Constant(phi.type, None) if start is None else start[i][j]
            phi.add_incoming(first, entry)
            phi.add_incoming(value, loop)
            final = builder.phi(phi.type)
            final.add_incoming(first, entry)
            final.add_incoming(value, loop)
            result[-1].append(final)
    return result


def _vector_at(builder, base, offset, vty):
    """A ``vty`` pointer to element ``offset`` of the scalar pointer ``base``."""
    return builder.bitcast(builder.gep(base, [offset]), vty.as_pointer())


def _splat(builder, value, lanes):
    """A vector of ``lanes`` copies of the scalar ``value`` (insert into lane 0, then shuffle)."""
    undef = ir.Constant(ir.VectorType(value.type, lanes), ir.Undefined)
    return builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0)), undef,
                                  ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def _prefetch(builder, pointer, write):
    """``llvm.prefetch`` of the line at ``pointer`` into every cache level, for writing or reading."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    prefetch = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p] + [i32] * 3),
                                              "llvm.prefetch.p0i8")
    builder.call(prefetch, [builder.bitcast(pointer, i8p), ir.Constant(i32, int(write)), ir.Constant(i32, 3),
                            ir.Constant(i32, 1)])


def _emit_tile(builder, fty, size, mr, nr, lanes, pa_, sa_i_, sa_k_, pb_, sb_k_, kc_, pc_, ldc_, accumulate_,
               resume=False):
    """The IR of one MR x NR register tile over the K block (see ``_micro_kernel``), ending in a block of
    its own (``fty`` the element type, ``size`` its bytes); returns that block. With ``resume`` the FMA
    chains start from the tile's values at ``pc`` instead of zero (then pass ``accumulate_`` 0: the chains
    already hold them)."""
    nv = nr // lanes
    vty = ir.VectorType(fty, lanes)
    i64 = ir.IntType(64)

    def const(v):
        return ir.Constant(i64, v)

    c0 = builder.inttoptr(pc_, fty.as_pointer())
    c_rows = [builder.gep(c0, [builder.mul(ldc_, const(i))]) for i in range(mr)]
    for row in c_rows:  # write intent, keep in all levels: one call per 64-byte line of the row
        for offset in range(0, nr * size, 64):
            _prefetch(builder, builder.gep(row, [const(offset // size)]), write=True)
    start = ([[builder.load(_vector_at(builder, row, const(v * lanes), vty), align=size) for v in range(nv)]
              for row in c_rows] if resume else None)
    entry = builder.block
    loop, done = builder.append_basic_block("tile.loop"), builder.append_basic_block("tile.done")
    builder.cbranch(builder.icmp_signed(">", kc_, const(0)), loop, done)

    k_loop = _asm_loop if ASM_LOOP and (mr, nv, lanes * size) == (6, 2, 32) else _ir_loop  # asm: the avx2 tile
    result = k_loop(builder, fty, size, mr, nv, lanes, pa_, sa_i_, sa_k_, pb_, sb_k_, kc_, entry, loop, done, start)
    with builder.if_else(builder.icmp_signed("!=", accumulate_, const(0))) as (add, store):
        for block, adding in ((add, True), (store, False)):
            with block:
                for i in range(mr):
                    for v in range(nv):
                        at = _vector_at(builder, c_rows[i], const(v * lanes), vty)
                        value = builder.fadd(result[i][v], builder.load(at, align=size)) if adding else result[i][v]
                        builder.store(value, at, align=size)
    return builder.block


def _ir_loop(builder, fty, size, mr, nv, lanes, pa_, sa_i_, sa_k_, pb_, sb_k_, kc_, entry, loop, done, start):
    """The K loop of an MR x NV-vector tile in IR (``_emit_tile``'s arguments): accumulators as phis, NV
    vector loads of B and MR broadcasts of A per k; returns the final accumulators, the builder in ``done``."""
    builder.position_at_end(loop)
    i64 = ir.IntType(64)
    vty = ir.VectorType(fty, lanes)
    k = builder.phi(i64)
    acc = [[builder.phi(vty) for _ in range(nv)] for _ in range(mr)]
    a0, b0 = builder.inttoptr(pa_, fty.as_pointer()), builder.inttoptr(pb_, fty.as_pointer())
    rows = [builder.gep(a0, [builder.mul(sa_i_, ir.Constant(i64, i))]) for i in range(mr)]
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                         f"llvm.fma.v{lanes}f{8 * size}")
    bk, ak = builder.mul(k, sb_k_), builder.mul(k, sa_k_)
    bv = [builder.load(_vector_at(builder, b0, builder.add(bk, ir.Constant(i64, v * lanes)), vty), align=size)
          for v in range(nv)]
    new = []
    for i in range(mr):
        ai = _splat(builder, builder.load(builder.gep(rows[i], [ak]), align=size), lanes)
        new.append([builder.call(fma, [ai, bv[v], acc[i][v]]) for v in range(nv)])
    return _close_loop(builder, k, builder.add(k, ir.Constant(i64, 1)), kc_, acc, new, entry, loop, done, start)


def _target_has_avx2_fma():
    """Whether the code Numba generates may use AVX2 and FMA: the host's features, or those of the target
    that NUMBA_CPU_NAME / NUMBA_CPU_FEATURES name (a cache meant for other machines)."""
    if numba_config.CPU_NAME is not None or numba_config.CPU_FEATURES is not None:
        features = (numba_config.CPU_FEATURES or "").split(",")
        return "+avx2" in features and "+fma" in features
    host = binding.get_host_cpu_features()
    return bool(host.get("avx2")) and bool(host.get("fma"))


# The avx2 tile's K loop as assembly where the target runs it (AVX2 + FMA); elsewhere the IR loop, which
# LLVM lowers for any x86-64 CPU. Chosen when the kernels compile (Numba's cache is keyed on the CPU).
ASM_LOOP = _target_has_avx2_fma()
ASM_UNROLL = 4  # k steps per pass of the assembly loop (a remainder loop first takes kc % ASM_UNROLL)
binding.initialize_native_asmparser()  # inline assembly: Numba's JIT initialises only the target and printer


def _asm_loop(builder, fty, size, mr, nv, lanes, pa_, sa_i_, sa_k_, pb_, sb_k_, kc_, entry, loop, done, start):
    """The avx2 tile's K loop (6 x 2 ymm accumulators) in x86 assembly, with ``_ir_loop``'s arguments and
    result: the IR loop's FMAs in the same order, so the same bits.
    LLVM's loop strength reduction addressed A's six rows by chaining one pointer through them, six
    dependent adds per k as long as the k's twelve FMAs; here one pointer walks A and its rows are
    addressed from it through three stride registers (BLIS's Haswell kernel addresses A so)."""
    builder.position_at_end(loop)
    i64 = ir.IntType(64)
    vty = ir.VectorType(fty, lanes)
    first = start or [[ir.Constant(vty, None)] * nv for _ in range(mr)]
    s = "s" if size == 4 else "d"
    acc = [f"${i}" for i in range(12)]  # operands: 12 accumulators, 3 scratch vectors, A, B, k, 5 strides
    t, b0, b1, a, b, k = "$12", "$13", "$14", "$15", "$16", "$17"
    rs, rs3, rs5, sa, sb = "$33", "$34", "$35", "$36", "$37"
    step = [f"vmovup{s} ({b}), {b0}", f"vmovup{s} 32({b}), {b1}"]
    for i, row in enumerate([f"({a})", f"({a},{rs},1)", f"({a},{rs},2)", f"({a},{rs3},1)", f"({a},{rs},4)",
                             f"({a},{rs5},1)"]):
        step += [f"vbroadcasts{s} {row}, {t}", f"vfmadd231p{s} {b0}, {t}, {acc[2 * i]}",
                 f"vfmadd231p{s} {b1}, {t}, {acc[2 * i + 1]}"]
    step += [f"add {sa}, {a}", f"add {sb}, {b}"]
    mask = f"$${ASM_UNROLL - 1}"
    lines = [f"test {mask}, {k}", "jz 2f",  # the remainder, one k at a time
             "1:", *step, f"dec {k}", f"test {mask}, {k}", "jnz 1b",
             f"test {k}, {k}", "jz 3f",
             "2:", *step * ASM_UNROLL, f"sub $${ASM_UNROLL}, {k}", "jnz 2b",
             "3:"]
    item = ir.Constant(i64, size)
    rs_ = builder.mul(sa_i_, item)
    operands = [*(v for row in first for v in row), pa_, pb_, kc_, rs_, builder.mul(rs_, ir.Constant(i64, 3)),
                builder.mul(rs_, ir.Constant(i64, 5)), builder.mul(sa_k_, item), builder.mul(sb_k_, item)]
    constraints = ["=x"] * 12 + ["=&x"] * 3 + ["=&r"] * 3 + [str(i) for i in [*range(12), 15, 16, 17]] + ["r"] * 5
    ftype = ir.FunctionType(ir.LiteralStructType([vty] * 15 + [i64] * 3), [vty] * 12 + [i64] * 8)
    values = builder.asm(ftype, "\n".join(lines), ",".join(constraints + ["~{memory}", "~{flags}"]), operands,
                         False)
    final = [builder.extract_value(values, i) for i in range(mr * nv)]
    builder.branch(done)
    builder.position_at_end(done)
    result = [[builder.phi(vty) for _ in range(nv)] for _ in range(mr)]
    for i in range(mr):
        for v in range(nv):
            result[i][v].add_incoming(first[i][v], entry)
            result[i][v].add_incoming(final[i * nv + v], loop)
    return result


@intrinsic
def _micro_kernel(typingctx, variant, pa, sa_i, sa_k, pb, sb_k, kc, pc, ldc, accumulate, like):
    """``c[i, j] (+)= sum_k pa[i*sa_i + k*sa_k] * pb[k*sb_k + j]`` for one MR x NR register tile of
    ``variant`` (an index in VARIANTS), stored at ``pc + (i*ldc + j)`` (added to what is there when
    ``accumulate``), in ``like``'s dtype.

    ``pa``, ``pb``, ``pc`` are element addresses (``x.ctypes.data`` plus a byte offset), strides in
    elements; B's rows must be contiguous (packed panels, or a row-major b read in place). The C tile
    is prefetched for writing before the K loop, so its write-back does not wait on memory. One loop
    per variant behind a switch on ``variant``: the kernels compile once whatever the CPU, and a test
    can run every variant on any x86-64 machine (LLVM splits vectors wider than the CPU's)."""
    f64 = like.dtype.bitwidth == 64

    def codegen(context, builder, sig, args):
        fty = context.get_value_type(sig.args[10].dtype)
        for name in _switch(builder, args[0], "tile"):
            _emit_tile(builder, fty, context.get_abi_sizeof(fty), *TILES[name][f64], *args[1:10])
        return context.get_dummy_value()

    return types.void(*[types.intp] * 10, like), codegen


@intrinsic
def _dot_kernel(typingctx, variant, pa, sa_i, rows, pb, sb_j, cols, k, tile, at, st):
    """``tile[at + i*st + j] = sum_{k} a[i, k] * bt[j, k]`` for one MR x NR tile of dot products along K
    (DOT_TILES of ``variant``, an index in VARIANTS):
    rows of A (element stride ``sa_i``) and of B^T (``sb_j``) are contiguous in K, so every vector lane
    does useful work whatever N is; the last ``k % lanes`` terms are one masked vector step (masked-off
    lanes are not read). Rows past ``rows`` and columns past ``cols`` repeat the last one (computed and
    stored again, identical) instead of reading out of bounds."""
    lanes = LANES[np.dtype(tile.dtype.name)]

    def emit(context, builder, sig, args, mr, nr):
        pa_, sa_i_, rows_, pb_, sb_j_, cols_, k_, tile_, at_, st_ = args
        t = context.make_array(sig.args[8])(context, builder, tile_).data
        fty = context.get_value_type(sig.args[8].dtype)
        size = context.get_abi_sizeof(fty)
        vty = ir.VectorType(fty, lanes)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        mask_ty = ir.VectorType(ir.IntType(1), lanes)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                             f"llvm.fma.v{lanes}f{8 * size}")
        masked_load = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty.as_pointer(), i32, mask_ty, vty]),
            f"llvm.masked.load.v{lanes}f{8 * size}.p0")

        def clamped(count, n):
            last = builder.sub(count, ir.Constant(i64, 1))
            return [builder.select(builder.icmp_signed("<", ir.Constant(i64, i), count), ir.Constant(i64, i), last)
                    for i in range(n)]

        def starts(address, stride, count, n):
            base = builder.inttoptr(address, fty.as_pointer())
            return [builder.gep(base, [builder.mul(stride, i)]) for i in clamped(count, n)]

        a_rows, b_rows = starts(pa_, sa_i_, rows_, mr), starts(pb_, sb_j_, cols_, nr)
        out_rows = [builder.gep(t, [builder.add(at_, builder.mul(st_, i))]) for i in clamped(rows_, mr)]
        out_cols = clamped(cols_, nr)
        kv_ = builder.and_(k_, ir.Constant(i64, -lanes))  # the whole vectors: k rounded down to the lanes
        zero = ir.Constant(vty, None)
        entry = builder.block
        loop, done = builder.append_basic_block("dot.loop"), builder.append_basic_block("dot.done")
        builder.cbranch(builder.icmp_signed(">", kv_, ir.Constant(i64, 0)), loop, done)

        builder.position_at_end(loop)
        k = builder.phi(i64)
        acc = [[builder.phi(vty) for _ in range(nr)] for _ in range(mr)]

        def load(row):
            return builder.load(builder.bitcast(builder.gep(row, [k]), vty.as_pointer()), align=size)

        av, bv = [load(r) for r in a_rows], [load(r) for r in b_rows]
        new = [[builder.call(fma, [av[i], bv[j], acc[i][j]]) for j in range(nr)] for i in range(mr)]
        result = _close_loop(builder, k, builder.add(k, ir.Constant(i64, lanes)), kv_, acc, new, entry, loop, done)
        lane = ir.Constant(ir.VectorType(i64, lanes), list(range(lanes)))
        rest = builder.sub(k_, kv_)
        mask = builder.icmp_signed("<", lane, _splat(builder, rest, lanes))

        def tail(row):
            at = builder.bitcast(builder.gep(row, [kv_]), vty.as_pointer())
            return builder.call(masked_load, [at, ir.Constant(i32, size), mask, zero])

        at_, bt_ = [tail(r) for r in a_rows], [tail(r) for r in b_rows]
        for i in range(mr):
            for j in range(nr):
                v = builder.call(fma, [at_[i], bt_[j], result[i][j]])
                half = lanes // 2
                while half:  # horizontal sum: the upper half added onto the lower half
                    def part(start):
                        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, half),
                                                                        list(range(start, start + half))))
                    v, half = builder.fadd(part(0), part(half)), half // 2
                builder.store(builder.extract_element(v, ir.Constant(i64, 0)), builder.gep(out_rows[i], [out_cols[j]]))

    def codegen(context, builder, sig, args):
        for name in _switch(builder, args[0], "dot"):
            emit(context, builder, sig, args[1:], *DOT_TILES[name])
        return context.get_dummy_value()

    return types.void(*[types.intp] * 8, tile, types.intp, types.intp), codegen


@jit(inline="always")
def _cdiv(a, b):
    return (a + b - 1) // b


@intrinsic
def _load(typingctx, address, like):
    """The element of ``like``'s dtype at byte ``address`` (operands are passed as addresses and strides)."""
    def codegen(context, builder, sig, args):
        return builder.load(builder.inttoptr(args[0], context.get_value_type(sig.return_type).as_pointer()))

    return like.dtype(types.intp, like), codegen


@intrinsic
def _copy(typingctx, src, dst, n, like):
    """``n`` elements of ``like``'s dtype from address ``src`` to ``dst`` (not overlapping): whole vectors,
    then the rest one by one. A numba loop over typed views does the same 3x slower here: signed indices
    carry a wraparound select per access, which keeps LLVM from vectorising it."""
    lanes = LANES[np.dtype(like.dtype.name)]

    def codegen(context, builder, sig, args):
        src_, dst_, n_, _ = args
        fty = context.get_value_type(sig.args[3].dtype)
        size = context.get_abi_sizeof(fty)
        vty = ir.VectorType(fty, lanes)
        i64 = ir.IntType(64)
        s0, d0 = builder.inttoptr(src_, fty.as_pointer()), builder.inttoptr(dst_, fty.as_pointer())
        n_v = builder.and_(n_, ir.Constant(i64, -lanes))
        with cgutils.for_range_slice(builder, ir.Constant(i64, 0), n_v, ir.Constant(i64, lanes)) as (i, _):
            value = builder.load(builder.bitcast(builder.gep(s0, [i]), vty.as_pointer()), align=size)
            builder.store(value, builder.bitcast(builder.gep(d0, [i]), vty.as_pointer()), align=size)
        with cgutils.for_range_slice(builder, n_v, n_, ir.Constant(i64, 1)) as (i, _):
            builder.store(builder.load(builder.gep(s0, [i])), builder.gep(d0, [i]))
        return context.get_dummy_value()

    return types.void(types.intp, types.intp, types.intp, like), codegen


@intrinsic
def _copy_panels(typingctx, src, s_r, dst, rows, width, panels, like):
    """``panels`` whole micro-panels of ``width`` columns (a multiple of the vector lanes) of an operand whose
    rows are contiguous: ``dst[(p * rows + r) * width + j] = src[r * s_r + p * width + j]`` (element
    addresses and strides), whole vectors: 2-3x faster than a ``_copy`` per panel row (B 512 x 128 of a
    512 x 256 float32: 22 -> 10 us). Row by row, each panel row's lines prefetched PACK_PREFETCH_ROWS rows ahead:
    the rows of a wide B lie on different pages, where the hardware prefetchers stop (a prefetch past
    the operand's end does not fault)."""
    lanes = LANES[np.dtype(like.dtype.name)]

    def codegen(context, builder, sig, args):
        src_, s_r_, dst_, rows_, width_, panels_, _ = args
        fty = context.get_value_type(sig.args[6].dtype)
        size = context.get_abi_sizeof(fty)
        vty = ir.VectorType(fty, lanes)
        i64 = ir.IntType(64)
        s0, d0 = builder.inttoptr(src_, fty.as_pointer()), builder.inttoptr(dst_, fty.as_pointer())
        with cgutils.for_range(builder, rows_) as row:
            with cgutils.for_range(builder, panels_) as panel:
                r, p = row.index, panel.index
                at = builder.gep(s0, [builder.add(builder.mul(r, s_r_), builder.mul(p, width_))])
                to = builder.gep(d0, [builder.mul(builder.add(builder.mul(p, rows_), r), width_)])
                ahead = builder.gep(at, [builder.mul(s_r_, ir.Constant(i64, PACK_PREFETCH_ROWS))])
                for line in range(2):  # a panel row: 128 bytes at most (the widest tiles' 32 float32 or 16 float64)
                    _prefetch(builder, builder.gep(ahead, [ir.Constant(i64, line * 64 // size)]), write=False)
                with cgutils.for_range(builder, builder.sdiv(width_, ir.Constant(i64, lanes))) as vector:
                    offset = builder.mul(vector.index, ir.Constant(i64, lanes))
                    value = builder.load(builder.bitcast(builder.gep(at, [offset]), vty.as_pointer()), align=size)
                    builder.store(value, builder.bitcast(builder.gep(to, [offset]), vty.as_pointer()), align=size)
        return context.get_dummy_value()

    return types.void(*[types.intp] * 6, like), codegen


@intrinsic
def _pack_panels(typingctx, src, s_k, rows, readable, dst, width, count, like):
    """Up to PANELS_A panels of ``width`` rows of an operand whose rows are contiguous for each k (A^T's of
    a transposed A): ``dst[p * panel + k * width + i] = src[p * width + i + k * s_k]`` for ``p * width + i <
    rows``, ``k < count``, ``panel = width * count + PANEL_SLACK`` (element addresses and strides); the rest
    of a partial panel is zero, or the next rows of the operand where it has ``readable`` (>= ``rows``) of
    them (the tile rows they feed are discarded). One pass over k reads each line of A^T once for all the
    panels: whole vector loads, or masked ones (zero-filled) where one would reach past ``readable`` (setting
    up a mask every k cost 8% of x^T dy at 256 x 128 x 256), and whole vector stores, each overwriting the
    spill of the store before it, the last one's into the PANEL_SLACK gap after its panel (a masked store is
    microcoded on AMD: slower than the product).

    Read in place, a panel's lines are ``s_k`` apart: at a power-of-two stride (x^T dy at batch 256: 4 KiB
    at M = 1024) they fall in a few cache sets, and every panel and every tile fetches them again."""
    lanes = LANES[np.dtype(like.dtype.name)]

    def codegen(context, builder, sig, args):
        src_, s_k_, rows_, readable_, dst_, width_, count_, _ = args
        fty = context.get_value_type(sig.args[7].dtype)
        size = context.get_abi_sizeof(fty)
        vty = ir.VectorType(fty, lanes)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        load = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty.as_pointer(), i32, ir.VectorType(ir.IntType(1), lanes), vty]),
            f"llvm.masked.load.v{lanes}f{8 * size}.p0")
        lane = ir.Constant(ir.VectorType(i64, lanes), list(range(lanes)))
        s0, d0 = builder.inttoptr(src_, fty.as_pointer()), builder.inttoptr(dst_, fty.as_pointer())
        panel = builder.add(builder.mul(width_, count_), ir.Constant(i64, PANEL_SLACK))
        widest = max(tile[f64][0] for tile in TILES.values() for f64 in (0, 1))  # vectors for any variant's MR
        steps = []  # (offset in A^T's row, offset in dst, lanes to read, whether this vector is in the panel)
        whole = ir.Constant(ir.IntType(1), 1)  # whether every vector of every panel can be read whole
        for p in range(PANELS_A):
            for v in range(_cdiv(widest, lanes)):
                first = builder.add(builder.mul(width_, ir.Constant(i64, p)), ir.Constant(i64, v * lanes))
                left = builder.sub(rows_, first)
                splat = _splat(builder, left, lanes)
                inside = builder.and_(builder.icmp_signed("<", ir.Constant(i64, v * lanes), width_),
                                      builder.icmp_signed("<", builder.mul(width_, ir.Constant(i64, p)), rows_))
                steps.append((first, builder.add(builder.mul(panel, ir.Constant(i64, p)), ir.Constant(i64, v * lanes)),
                              builder.icmp_signed("<", lane, splat), inside))
                fits = builder.icmp_signed("<=", builder.add(first, ir.Constant(i64, lanes)), readable_)
                whole = builder.and_(whole, builder.or_(builder.not_(inside), fits))

        def copy(masked):
            with cgutils.for_range(builder, count_) as loop:
                k = loop.index
                row, out = builder.gep(s0, [builder.mul(k, s_k_)]), builder.gep(d0, [builder.mul(k, width_)])
                for first, at, mask, inside in steps:
                    with builder.if_then(inside, likely=True):
                        at_row = builder.bitcast(builder.gep(row, [first]), vty.as_pointer())
                        value = (builder.call(load, [at_row, ir.Constant(i32, size), mask, ir.Constant(vty, None)])
                                 if masked else builder.load(at_row, align=size))
                        builder.store(value, builder.bitcast(builder.gep(out, [at]), vty.as_pointer()), align=size)

        with builder.if_else(whole, likely=True) as (plain, masked):
            with plain:
                copy(False)
            with masked:
                copy(True)
        return context.get_dummy_value()

    return types.void(*[types.intp] * 7, like), codegen


def _shuffle_transpose(builder, rows):
    """The columns of the square matrix whose rows are the vectors ``rows`` (4 or 8 lanes), by the unpack,
    in-lane shuffle and 128-bit permute steps of an AVX transpose, each a two-vector shufflevector (element by
    element inserts and extracts became broadcasts and blends: 12% of a dy W^T product's time)."""
    def shuffle(a, b, mask):
        return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), len(mask)), mask))

    if len(rows) == 8:  # unpack pairs of rows, shuffle pairs of those, join 128-bit halves
        t = [shuffle(rows[i & ~1], rows[i | 1], [2, 10, 3, 11, 6, 14, 7, 15] if i & 1 else [0, 8, 1, 9, 4, 12, 5, 13])
             for i in range(8)]
        s = [shuffle(t[i // 4 * 4 + i // 2 % 2], t[i // 4 * 4 + i // 2 % 2 + 2],
                     [2, 3, 10, 11, 6, 7, 14, 15] if i & 1 else [0, 1, 8, 9, 4, 5, 12, 13]) for i in range(8)]
        return [shuffle(s[i % 4], s[i % 4 + 4], [4, 5, 6, 7, 12, 13, 14, 15] if i & 4 else [0, 1, 2, 3, 8, 9, 10, 11])
                for i in range(8)]
    t = [shuffle(rows[i & ~1], rows[i | 1], [1, 5, 3, 7] if i & 1 else [0, 4, 2, 6]) for i in range(4)]
    return [shuffle(t[i % 2], t[i % 2 + 2], [2, 3, 6, 7] if i & 2 else [0, 1, 4, 5]) for i in range(4)]


@intrinsic
def _transpose(typingctx, src, src_stride, dst, dst_stride, like):
    """One lanes x lanes block (8 x 8 float32, 4 x 4 float64) transposed through vector registers:
    ``dst[r * dst_stride + j] = src[j * src_stride + r]`` (element addresses and strides). Packing a
    B^T whose columns are contiguous this way beats element-by-element stores 2-4x."""
    lanes = LANES[np.dtype(like.dtype.name)]

    def codegen(context, builder, sig, args):
        src_, src_stride_, dst_, dst_stride_, _ = args
        fty = context.get_value_type(sig.args[4].dtype)
        size = context.get_abi_sizeof(fty)
        vty = ir.VectorType(fty, lanes)
        s0, d0 = builder.inttoptr(src_, fty.as_pointer()), builder.inttoptr(dst_, fty.as_pointer())
        cols = [builder.load(builder.bitcast(builder.gep(s0, [builder.mul(src_stride_, ir.Constant(src_stride_.type, j))]),
                                             vty.as_pointer()), align=size) for j in range(lanes)]
        for r, row in enumerate(_shuffle_transpose(builder, cols)):
            at = builder.gep(d0, [builder.mul(dst_stride_, ir.Constant(dst_stride_.type, r))])
            builder.store(row, builder.bitcast(at, vty.as_pointer()), align=size)
        return context.get_dummy_value()

    return types.void(types.intp, types.intp, types.intp, types.intp, like), codegen


@jit
def _pack(x_at, s_r, s_c, xp, r0, c0, rows, cols, width):
    """Rows ``r0:r0+rows`` and columns ``c0:c0+cols`` of the operand at ``x_at`` (element strides s_r, s_c)
    as micro-panels of ``width`` columns, zero-padded: ``xp[panel, r, j]`` (B's K x NC block, or one edge
    panel of A^T or B). The operand is read along its contiguous direction: panel by panel, whole panels
    as vectors (``_copy_panels``), a last partial one row by row; when its columns are contiguous, as
    register-transposed square blocks; otherwise in blocks of PACK_ROWS rows whose panel rows stay in L1
    while the columns are read."""
    item = xp.itemsize
    panels = _cdiv(cols, width)
    last = (panels - 1) * rows * width
    for r in range(rows):  # zero padding of the last panel
        for j in range(cols - (panels - 1) * width, width):
            xp[last + r * width + j] = 0
    xp_at = np.intp(xp.ctypes.data)
    lanes = 32 // item  # 256-bit vectors, as in LANES
    if abs(s_c) <= abs(s_r):
        whole = cols // width if s_c == 1 and width % lanes == 0 else 0  # panels copied as whole vectors
        if whole > 0:
            _copy_panels(x_at + (r0 * s_r + c0) * item, s_r, xp_at, rows, width, whole, xp)
        for r in range(rows):
            at = x_at + ((r0 + r) * s_r + c0 * s_c) * item
            for p in range(whole, panels):
                n = min(width, cols - p * width)
                dst = p * rows * width + r * width
                if s_c == 1:
                    _copy(at + p * width * item, xp_at + dst * item, n, xp)
                else:
                    for j in range(n):
                        xp[dst + j] = _load(at + (p * width + j) * s_c * item, xp)
    elif s_r == 1:  # columns contiguous (B^T): lanes x lanes blocks through registers, edges one by one
        rows_v = rows // lanes * lanes
        for p in range(panels):
            n = min(width, cols - p * width)
            n_v = n // lanes * lanes
            base, at = p * rows * width, x_at + (r0 + (c0 + p * width) * s_c) * item
            for jb in range(0, n_v, lanes):  # lanes source rows at a time, along K: a few streams to prefetch
                for rb in range(0, rows_v, lanes):
                    _transpose(at + (rb + jb * s_c) * item, s_c, xp_at + (base + rb * width + jb) * item, width, xp)
            for j in range(n):
                for r in range(rows_v if j < n_v else 0, rows):
                    xp[base + r * width + j] = _load(at + (r + j * s_c) * item, xp)
    else:
        for p in range(panels):
            n = min(width, cols - p * width)
            for rb in range(0, rows, PACK_ROWS):
                rn = min(PACK_ROWS, rows - rb)
                dst = p * rows * width + rb * width
                for j in range(n):
                    at = x_at + ((r0 + rb) * s_r + (c0 + p * width + j) * s_c) * item
                    for r in range(rn):
                        xp[dst + r * width + j] = _load(at + r * s_r * item, xp)


@intrinsic
def _relu(typingctx, at, n, like):
    """``x = 0 if x < 0 else x`` on ``n`` elements of ``like``'s dtype at address ``at``: whole vectors, loaded,
    selected and stored back every one. Written as a numba loop, LLVM drops the stores of the elements left as
    they are and vectorises the rest as masked stores (vmaskmovps, microcoded on AMD: relu on 128 x 256 float32
    took 31 us that way, bias + relu in one loop 4.7)."""
    lanes = LANES[np.dtype(like.dtype.name)]

    def codegen(context, builder, sig, args):
        at_, n_, _ = args
        fty = context.get_value_type(sig.args[2].dtype)
        size = context.get_abi_sizeof(fty)
        i64 = ir.IntType(64)
        x0 = builder.inttoptr(at_, fty.as_pointer())
        n_v = builder.and_(n_, ir.Constant(i64, -lanes))
        for step, width, stop in ((lanes, lanes, n_v), (1, 1, n_)):
            ty = ir.VectorType(fty, width) if width > 1 else fty
            with cgutils.for_range_slice(builder, n_v if width == 1 else ir.Constant(i64, 0), stop,
                                         ir.Constant(i64, step)) as (j, _):
                p = builder.bitcast(builder.gep(x0, [j]), ty.as_pointer())
                v = builder.load(p, align=size)
                zero = ir.Constant(ty, None)
                builder.store(builder.select(builder.fcmp_ordered("<", v, zero), zero, v), p, align=size)
        return context.get_dummy_value()

    return types.void(types.intp, types.intp, like), codegen


@jit(inline="always")
def _epilogue(out, row, rows, col, cols, bias, has_bias, act, alpha):
    """Bias and activation, in place on ``out[row:row+rows, col:col+cols]`` (a row of tiles just written,
    still in L1/L2): one branch per call, then one vectorised loop per row and kind (bias and relu in one
    pass); sigmoid and tanh by one call of ``_transcendental`` (compiled on first use, see ``_LAZY``)."""
    zero = out.dtype.type(0)
    b = bias[col:col + cols] if has_bias else bias
    item = out.itemsize
    for i in range(row, row + rows):
        x = out[i, col:col + cols]
        if has_bias and act == RELU:  # the add, then the comparison, in one pass
            for j in range(cols):
                v = x[j] + b[j]
                x[j] = zero if v < zero else v
        elif has_bias and act == LEAKY_RELU:
            for j in range(cols):
                v = x[j] + b[j]
                x[j] = v if v > zero else alpha * v
        elif has_bias:
            for j in range(cols):
                x[j] += b[j]
        elif act == RELU:
            _relu(np.intp(out.ctypes.data) + i * out.strides[0] + col * item, cols, out)
        elif act == LEAKY_RELU:
            for j in range(cols):
                x[j] = x[j] if x[j] > zero else alpha * x[j]
    if act == SIGMOID or act == TANH:
        _call_transcendental(out, row, rows, col, cols, act)


def _transcendental(out_p, m, n, row, rows, col, cols, act):
    """Sigmoid (``act`` SIGMOID) or tanh in place on ``out[row:row+rows, col:col+cols]``, ``out`` the
    ``m x n`` array at ``out_p``: the epilogue's part that costs most to compile, in a C function of its own."""
    out = carray(out_p, (m, n))
    for i in range(row, row + rows):
        x = out[i, col:col + cols]
        if act == SIGMOID:
            for j in range(cols):
                x[j] = sigmoid(x[j])
        else:
            for j in range(cols):
                x[j] = tanh(x[j])


def _transcendental_signature(dtype):
    """The C signature of ``_transcendental`` for a numba float type."""
    return types.void(types.CPointer(dtype), *[types.intp] * 7)


# ``_transcendental`` is compiled per dtype on its first call, so that a process whose products use no
# sigmoid or tanh never compiles them (most of the GEMM bodies' compile time). The epilogue calls it through
# a table of addresses, one slot per dtype, that the compiled code finds by a symbol name (resolved when
# the code is loaded: a per-process address, so the callers stay cacheable). Each slot starts as a Python
# callback that compiles (or loads from Numba's cache) the function, puts its address in the slot, then
# runs it; later calls go straight to the compiled function.
_LAZY_SYMBOL = "kernels_cpu_gemm_transcendental"
_LAZY = (ctypes.c_void_p * len(DTYPES))()
_C_TYPES = {dtype: ctypes.CFUNCTYPE(None, ctypes.c_void_p, *[ctypes.c_ssize_t] * 7) for dtype in DTYPES}
_TRANSCENDENTAL = {}  # dtype -> the compiled function


def _transcendental_address(dtype):
    """The address of ``_transcendental`` compiled for ``dtype``, compiled (or loaded from Numba's cache) and
    put in its slot of the table on the first call."""
    if dtype not in _TRANSCENDENTAL:
        compiled = cfunc(_transcendental_signature(from_dtype(dtype)), cache=True,
                         fastmath=set(FASTMATH))(_transcendental)
        _TRANSCENDENTAL[dtype] = compiled
        _LAZY[DTYPES.index(dtype)] = compiled.address
    return _TRANSCENDENTAL[dtype].address


def _first_call(dtype):
    """What a slot starts with: a C callback that compiles ``_transcendental`` for ``dtype``, then runs it.
    The Python callers compile it first (:func:`transcendental`), where a failure raises; a C callback cannot
    raise, so should its compile fail here, it fills the block with NaN rather than leave it unactivated."""
    def call(out_p, m, n, row, rows, col, cols, act):
        try:
            address = _transcendental_address(dtype)
        except BaseException:
            traceback.print_exc()
            out = np.ctypeslib.as_array(ctypes.cast(out_p, ctypes.POINTER(np.ctypeslib.as_ctypes_type(dtype))), (m, n))
            out[row:row + rows, col:col + cols] = np.nan
            return
        _C_TYPES[dtype](address)(out_p, m, n, row, rows, col, cols, act)

    return _C_TYPES[dtype](call)


def transcendental(dtype, activation):
    """Compile (or load) the epilogue's sigmoid/tanh for ``dtype`` now if ``activation`` needs it: from Python,
    before the compiled code that calls it, so that a failure raises here."""
    if activation in ("sigmoid", "tanh"):
        _transcendental_address(np.dtype(dtype))


_FIRST_CALLS = [_first_call(dtype) for dtype in DTYPES]  # kept alive: the slots point into them
for _slot, _callback in enumerate(_FIRST_CALLS):
    _LAZY[_slot] = ctypes.cast(_callback, ctypes.c_void_p).value
binding.add_symbol(_LAZY_SYMBOL, ctypes.addressof(_LAZY))


@intrinsic
def _call_transcendental(typingctx, out, row, rows, col, cols, act):
    """``_transcendental`` for ``out``'s dtype on ``out[row:row+rows, col:col+cols]`` (``act`` SIGMOID or
    TANH), called through its slot in the table at ``_LAZY_SYMBOL``."""
    slot = DTYPES.index(np.dtype(out.dtype.name))
    signature = types.void(out, row, rows, col, cols, act)
    target = _transcendental_signature(out.dtype).args

    def codegen(context, builder, sig, args):
        array = context.make_array(sig.args[0])(context, builder, args[0])
        values = [array.data, *cgutils.unpack_tuple(builder, array.shape, 2)]
        values += [context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], sig.args[1:])]
        fnty = ir.FunctionType(ir.VoidType(), [context.get_argument_type(t) for t in target])
        i8p = ir.IntType(8).as_pointer()
        table = builder.module.globals.get(_LAZY_SYMBOL)
        if table is None:  # declared, defined outside the module (binding.add_symbol)
            table = ir.GlobalVariable(builder.module, ir.ArrayType(i8p, len(DTYPES)), _LAZY_SYMBOL)
        entry = builder.gep(table, [ir.Constant(ir.IntType(32), 0), ir.Constant(ir.IntType(32), slot)])
        builder.call(builder.bitcast(builder.load(entry), fnty.as_pointer()), values)
        return context.get_dummy_value()

    return signature, codegen


@jit
def _tiles(a_at, sa_i, sa_k, b_at, sb_k, sb_j, bp, edge, tile, out, bias, has_bias, act, alpha, r0, m, c0, nc,
           pc, kc, first, last, variant, mr, nr):
    """Every tile of the ``m x nc`` block of ``out`` at (r0, c0) for the K block ``pc:pc+kc``, row of tiles
    by row of tiles (the A rows stay in L1 while B's panels stream from L2): the micro-kernel writes a
    whole tile straight into ``out`` (added to it unless ``first``); an edge tile goes through ``tile``.
    After the last K block, bias and activation are applied in place to each row of tiles as it is done.

    A is read in place through its strides, but for a last partial row panel, copied (zero-padded) into
    ``edge``, and a transposed A at a K stride whose lines alias (``pack_a``), packed there PANELS_A panels
    at a time. B's panels come from ``bp`` when it is packed (size > 0), else from B in place (C-order
    rows), except a last partial column panel, packed at the head of ``edge``."""
    item = out.itemsize
    ldo = out.shape[1]
    bp_at, edge_at, tile_at = np.intp(bp.ctypes.data), np.intp(edge.ctypes.data), np.intp(tile.ctypes.data)
    out_at = np.intp(out.ctypes.data)
    packed = bp.size > 0
    n_full = nc // nr if not packed else _cdiv(nc, nr)
    panel = mr * kc + PANEL_SLACK
    a_edge = nr * kc  # the B edge panel first, then the A panels
    # A^T's rows (a transposed A) packed, PANELS_A panels at a time (see _pack_panels), where its K stride
    # puts a panel's lines in a few cache sets and each panel serves at least PACK_A_MIN_TILES tiles
    pack_a = sa_i == 1 and sa_k != 1 and (sa_k * item) % PACK_A_STRIDE == 0 and nc >= PACK_A_MIN_TILES * nr
    epilogue = last and (has_bias or act != NONE)
    if n_full * nr < nc:
        _pack(b_at, sb_k, sb_j, edge, pc, c0 + n_full * nr, kc, nc - n_full * nr, nr)
    for ir_ in range(_cdiv(m, mr)):
        row = r0 + ir_ * mr
        rows = min(mr, r0 + m - row)
        if pack_a:
            if ir_ % PANELS_A == 0:
                _pack_panels(a_at + (row + pc * sa_k) * item, sa_k, min(PANELS_A * mr, r0 + m - row),
                             out.shape[0] - row, edge_at + a_edge * item, mr, kc, edge)
            pa, si, sk = edge_at + (a_edge + ir_ % PANELS_A * panel) * item, 1, mr
        elif rows == mr:
            pa, si, sk = a_at + (row * sa_i + pc * sa_k) * item, sa_i, sa_k
        else:
            _pack(a_at, sa_k, sa_i, edge[a_edge:], pc, row, kc, rows, mr)
            pa, si, sk = edge_at + a_edge * item, 1, mr
        for jr in range(_cdiv(nc, nr)):
            col = c0 + jr * nr
            cols = min(nr, c0 + nc - col)
            if packed:
                pb, sb = bp_at + jr * kc * nr * item, nr
            elif jr < n_full:
                pb, sb = b_at + (pc * sb_k + col) * item, sb_k
            else:
                pb, sb = edge_at, nr
            if rows == mr and cols == nr:
                _micro_kernel(variant, pa, si, sk, pb, sb, kc, out_at + (row * ldo + col) * item, ldo, not first, tile)
            else:
                _micro_kernel(variant, pa, si, sk, pb, sb, kc, tile_at, nr, False, tile)
                for i in range(rows):  # no slice assignment: it drags in its error message
                    if first:  # a row copied as vectors (element by element, x^T dy into 10 columns spent 17% here)
                        _copy(tile_at + i * nr * item, out_at + ((row + i) * ldo + col) * item, cols, out)
                    else:
                        for j in range(cols):
                            out[row + i, col + j] += tile[i * nr + j]
        if epilogue:
            _epilogue(out, row, rows, c0, nc, bias, has_bias, act, alpha)


def _dots(a_at, sa_i, sa_k, b_at, sb_k, sb_j, k, bias_p, n_bias, act, alpha, out_p, m, n, r0, r1, c0, c1, variant,
          kc_max, nc_max, pack_b, bp_p, edge_p, tile_p, b_size, edge_size, tile_size):
    """``out[r0:r1]`` for a narrow N (at most DOT_MAX_N) and A's rows contiguous (``sa_k`` 1): B^T packed
    once (N x K), then MR x NR tiles of dot products along K (no K blocks: B^T stays in L1, A's rows
    stream once) into an MR x N block, stored and given its epilogue as a whole (per-tile write-backs of
    5 x 5 cost more than the tile). The arguments are ``_block``'s (c0:c1 is 0:N, no buffers used), so
    the entry points call either the same way; a C function of its own, so that it compiles apart."""
    bias, out = carray(bias_p, n_bias), carray(out_p, (m, n))
    has_bias = n_bias > 0
    item = out.itemsize
    mr, nr = _DOT_MR[variant], _DOT_NR[variant]
    bt = np.empty(n * k, out.dtype)
    origin = np.intp(0)  # not the literal 0: one compiled _pack serves every caller
    _pack(b_at, sb_j, sb_k, bt, origin, origin, n, k, k)
    block = np.empty(mr * n, out.dtype)
    block_at, out_at = np.intp(block.ctypes.data), np.intp(out.ctypes.data)
    for row in range(r0, r1, mr):
        rows = min(mr, r1 - row)
        pa = a_at + row * sa_i * item
        bt_at = np.intp(bt.ctypes.data)  # taken here, it keeps bt alive over the loop (Numba frees an array
        # after its last use, and the epilogue's first sigmoid or tanh runs Python, which reuses freed memory)
        for col in range(0, n, nr):
            _dot_kernel(variant, pa, sa_i, rows, bt_at + col * k * item, k, min(nr, n - col), k, block, col, n)
        for i in range(rows):
            _copy(block_at + i * n * item, out_at + (row + i) * n * item, n, out)
        _epilogue(out, row, rows, 0, n, bias, has_bias, act, alpha)


def _block(a_at, sa_i, sa_k, b_at, sb_k, sb_j, k, bias_p, n_bias, act, alpha, out_p, m, n, r0, r1, c0, c1, variant,
           kc_max, nc_max, pack_b, bp_p, edge_p, tile_p, b_size, edge_size, tile_size):
    """The serial BLIS loops for ``out[r0:r1, c0:c1]`` (``out`` is ``m x n`` at ``out_p``): K blocks, N
    blocks, then tiles; B is packed per (K, N) block into the buffer at ``bp_p`` when ``pack_b``. Every
    element gets the same K blocks in the same order whatever the block, so a result does not depend on
    how ``out`` was split.

    Compiled once per dtype as a C function (``body``), arrays passed as pointers and sizes: the entry
    points call it through its address instead of each linking (and optimising again) its code."""
    bias, out = carray(bias_p, n_bias), carray(out_p, (m, n))
    bp, edge, tile = carray(bp_p, b_size), carray(edge_p, edge_size), carray(tile_p, tile_size)
    has_bias = n_bias > 0
    mr, nr = _tile(variant, out)
    n_pc = max(1, _cdiv(k, kc_max))
    kc_step = _cdiv(k, n_pc)  # balanced K blocks: 784 -> 2 x 392
    nc_step = min(_cdiv(c1 - c0, nr) * nr, nc_max)
    for p in range(n_pc):
        pc = p * kc_step
        kc = min(kc_step, k - pc)
        for jc in range(c0, c1, nc_step):
            nc = min(nc_step, c1 - jc)
            if pack_b:
                _pack(b_at, sb_k, sb_j, bp, pc, jc, kc, nc, nr)
            _tiles(a_at, sa_i, sa_k, b_at, sb_k, sb_j, bp, edge, tile, out, bias, has_bias, act, alpha, r0, r1 - r0,
                   jc, nc, pc, kc, p == 0, p == n_pc - 1, variant, mr, nr)


def _signature(dtype):
    """The C signature of ``_block`` and ``_dots`` for a numba float type."""
    i, p = types.intp, types.CPointer(dtype)
    return types.void(*[i] * 7, p, i, i, dtype, p, *[i] * 10, p, p, p, i, i, i)


_BODIES, _COMPILED = {}, []  # (dtype, dots) -> address; the compiled functions


@register_jitable  # plain Python from matmul.py (no dispatch cost), inlined in kernels.cpu.step's driver
def narrow(n, k, sa_k):
    """Whether a product with ``n`` output columns, reduction ``k`` and A's K stride ``sa_k`` (elements)
    takes the dot-product route (``_dots``) rather than the register tiles (``_block``)."""
    return n <= DOT_MAX_N and k > 0 and sa_k == 1


def body(dtype, dots=False):
    """The address of ``_dots`` (``dots``, see ``narrow``) or ``_block`` compiled for ``dtype`` (compiled, or
    loaded from Numba's cache, on its first use): the entry points take it as their ``body`` argument."""
    try:
        return _BODIES[dtype, dots]
    except KeyError:
        compiled = cfunc(_signature(from_dtype(dtype)), cache=True, fastmath=set(FASTMATH))(_dots if dots else _block)
        _COMPILED.append(compiled)  # keeps the code alive
        _BODIES[dtype, dots] = compiled.address
        return compiled.address


@intrinsic
def _pointer(typingctx, array):
    """The data pointer of ``array``, typed: what ``_block`` takes for an array."""
    def codegen(context, builder, sig, args):
        return context.make_array(sig.args[0])(context, builder, args[0]).data

    return types.CPointer(array.dtype)(array), codegen


@intrinsic
def _call_block(typingctx, address, args, like):
    """Calls the compiled ``_block`` for ``like``'s dtype at ``address`` with the tuple ``args``, each cast
    to the type the C signature has there."""
    target = _signature(like.dtype).args
    if len(args) != len(target) or not all(typingctx.can_convert(a, t) for a, t in zip(args, target)):
        raise TypingError(f"_call_block: arguments {args} do not fit {target}")

    def codegen(context, builder, sig, llargs):
        values = [context.cast(builder, v, a, t) for v, a, t in zip(cgutils.unpack_tuple(builder, llargs[1]), args,
                                                                    target)]
        fnty = ir.FunctionType(ir.VoidType(), [context.get_argument_type(t) for t in target])
        builder.call(builder.inttoptr(llargs[0], fnty.as_pointer()), values)
        return context.get_dummy_value()

    return types.void(address, args, like), codegen


@jit(inline="always")
def _tile(variant, out):
    """(MR, NR) of ``variant``'s register tile for ``out``'s dtype."""
    at = variant + (len(VARIANTS) if out.itemsize == 8 else 0)
    return _MR[at], _NR[at]


@jit(inline="always")
def _setup(k, sb_k, sb_j, alpha, out, variant, kc_max, nc_bytes):
    """What both entry points derive: the N block for the variant's tile and ``out``'s dtype (``nc_bytes``
    of packed B at K block ``kc_max``), whether B gets packed (unless it is small and row-major), alpha in
    ``out``'s dtype, and the sizes of one thread's buffers (packed B, A/B edge
    panels, an edge tile) for blocks of at most ``nc_max`` columns."""
    item = out.itemsize
    mr, nr = _tile(variant, out)
    nc_max = max(nr, nc_bytes // (kc_max * item) // nr * nr)
    pack_b = sb_j != 1 or k * out.shape[1] > PACK_B_MIN
    kc_step = _cdiv(k, max(1, _cdiv(k, kc_max)))
    nc_step = min(_cdiv(out.shape[1], nr) * nr, nc_max)
    b_size = nc_step * kc_step if pack_b else 0
    return mr, nr, nc_max, pack_b, out.dtype.type(alpha), b_size, edge_size(mr, nr, kc_step), mr * nr


@register_jitable
def edge_size(mr, nr, kc):
    """Elements of ``_tiles``' ``edge`` buffer at K block ``kc``: a B panel, then PANELS_A packed A panels
    (each followed by PANEL_SLACK)."""
    return nr * kc + PANELS_A * (mr * kc + PANEL_SLACK)


@jit
def gemm(a, b, bias, act, alpha, out, variant, kc_max, nc_bytes, body):
    """``out = act(a @ b + bias)`` on the calling thread; a (M, K), b (K, N) with any strides that are whole
    elements; ``bias`` is (N,), or empty for none; ``act`` an ACTIVATION_CODES value; ``alpha`` the leaky
    slope; ``variant`` the register tile (index in VARIANTS), ``kc_max`` and ``nc_bytes`` the blocking;
    ``body`` the address of the compiled ``_block`` or ``_dots`` for ``out``'s dtype (``body``). Only this thin
    wrapper is specialised per layout. Plain arguments: at 64^3 the dispatch is a tenth of the call."""
    m, n = out.shape
    if m == 0 or n == 0:
        return
    item = out.itemsize
    k, sb_k, sb_j = a.shape[1], b.strides[0] // item, b.strides[1] // item
    _, _, nc_max, pack_b, alpha_, b_size, edge_size, tile_size = _setup(k, sb_k, sb_j, alpha, out, variant, kc_max,
                                                                          nc_bytes)
    _run_block(body, np.intp(a.ctypes.data), a.strides[0] // item, a.strides[1] // item, np.intp(b.ctypes.data),
               sb_k, sb_j, k, bias, act, alpha_, out, 0, m, 0, n, variant, kc_max, nc_max, pack_b,
               np.empty(b_size, out.dtype), np.empty(edge_size, out.dtype), np.empty(tile_size, out.dtype))


@jit(inline="always")
def _run_block(body, a_at, sa_i, sa_k, b_at, sb_k, sb_j, k, bias, act, alpha, out, r0, r1, c0, c1, variant, kc_max,
               nc_max, pack_b, bp, edge, tile):
    """``_block`` (or ``_dots``) at ``body`` for ``out[r0:r1, c0:c1]``, arrays passed as pointers and sizes."""
    m, n = out.shape
    _call_block(body, (a_at, sa_i, sa_k, b_at, sb_k, sb_j, k, _pointer(bias), bias.size, act, alpha, _pointer(out), m,
                       n, r0, r1, c0, c1, variant, kc_max, nc_max, pack_b, _pointer(bp), _pointer(edge),
                       _pointer(tile), bp.size, edge.size, tile.size), out)


@register_jitable
def split(m, n, threads, row_tile, nr, nc_max, mc, dots):
    """``(rows, cols)``: the chunk of an ``m x n`` ``out`` that ``gemm_parallel`` hands a thread (the last
    ones cut short), for about CHUNKS_PER_THREAD chunks per thread. Columns first: a column block's B is
    packed once whoever computes it, whereas every row block packs its B block again. So N is cut into
    balanced, tile-aligned blocks of at most ``nc_max`` and at least CHUNK_MIN_PANELS panels (narrower where
    blocks of ``mc`` rows would leave a thread without a chunk: 64 x 512 x 256 was one chunk, one core idle),
    then M into as few blocks of at least ``mc`` rows as make up the count (x @ W at 128 x 784 x 256, avx2
    tile: 2 chunks of 128 x 128, where 2 x 2 chunks packed W twice), fewer where that gives every thread as
    many chunks (x^T dz at 256 x 128 x 256: 2 row blocks, where 3 took two threads as long as 4 would).
    ``dots`` (``_dots``, which packs B^T whole): rows only."""
    want = CHUNKS_PER_THREAD * threads
    panels, tiles = _cdiv(n, nr), _cdiv(m, row_tile)
    row_max = _cdiv(m, max(mc, row_tile))
    col_blocks = 1 if dots else max(_cdiv(n, nc_max), min(want, panels // CHUNK_MIN_PANELS),
                                    min(panels, _cdiv(threads, row_max)))
    cols = _cdiv(panels, col_blocks) * nr
    col_blocks = _cdiv(n, cols)
    row_blocks = max(1, min(row_max, _cdiv(want, col_blocks)))
    for r in range(row_blocks, 0, -1):  # the most row blocks that leave every thread as many chunks
        if _cdiv(tiles, _cdiv(tiles, r)) * col_blocks % threads == 0:
            row_blocks = r
            break
    return _cdiv(tiles, row_blocks) * row_tile, cols


@intrinsic
def _take(typingctx, counter):
    """Atomically ``counter[0] += 1`` (an intp array), returning the old value: the next chunk. The array, not
    its address: used in the parallel loop, it stays alive until the loop ends (Numba frees an array after its
    last use)."""
    def codegen(context, builder, sig, args):
        at = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", at, ir.Constant(ir.IntType(64), 1), "monotonic")

    return types.intp(counter), codegen


@jit(parallel=True)
def gemm_parallel(a_at, sa_i, sa_k, b_at, sb_k, sb_j, k, bias, act, alpha, out, threads, variant, kc_max, nc_bytes,
                  mc, body, dots):
    """``gemm`` on ``threads`` threads, the operands given as addresses and element strides. ``out`` is cut
    into chunks (``split``), about CHUNKS_PER_THREAD per thread; each thread takes the next
    chunk from a shared counter as it frees up, so a thread whose core is busy elsewhere takes fewer
    chunks instead of holding the others back. Each chunk is computed whole by one thread in the same
    K order, so the result is bitwise the same whatever the split and the thread count.

    Call it from Python only: a cached jitted function that calls a parallel one is loaded from Numba's
    cache broken once it has been compiled in a process that loaded the callee from the cache (a segfault
    on the next run; numba issue 8578)."""
    m, n = out.shape
    if m == 0 or n == 0:
        return
    rows, cols = chunk_shape(m, n, k, sb_k, sb_j, out, threads, variant, kc_max, nc_bytes, mc, dots)
    chunks = _cdiv(m, rows) * _cdiv(n, cols)
    if act == SIGMOID or act == TANH:  # compiled, on its first use, by this thread rather than a worker
        _call_transcendental(out, 0, 0, 0, 0, act)
    counter = np.zeros(1, np.intp)
    for _ in prange(min(threads, chunks)):
        take_chunks(counter, body, a_at, sa_i, sa_k, b_at, sb_k, sb_j, k, bias, act, alpha, out, variant, kc_max,
                    nc_bytes, rows, cols)


@jit(inline="always")
def chunk_shape(m, n, k, sb_k, sb_j, out, threads, variant, kc_max, nc_bytes, mc, dots):
    """``split``'s chunk for ``gemm_parallel``'s arguments."""
    mr, nr, nc_max, _, _, _, _, _ = _setup(k, sb_k, sb_j, 0.0, out, variant, kc_max, nc_bytes)
    return split(m, n, threads, _DOT_MR[variant] if dots else mr, nr, nc_max, mc, dots)


@jit(inline="always")
def take_chunks(counter, body, a_at, sa_i, sa_k, b_at, sb_k, sb_j, k, bias, act, alpha, out, variant, kc_max,
                nc_bytes, rows, cols):
    """One thread's part of a multithreaded ``gemm``: the chunks of ``rows x cols`` (``split``) it takes from
    ``counter`` (an intp array, its first element the next chunk) until there are none left. Inlined into
    ``kernels.cpu.step``'s cached driver and worker too, whose cache does not see edits here: clear
    ``kernels/cpu/__pycache__`` after changing this, ``chunk_shape``, ``split`` or ``_setup``."""
    m, n = out.shape
    _, _, nc_max, pack_b, alpha_, b_size, edge_size, tile_size = _setup(k, sb_k, sb_j, alpha, out, variant, kc_max,
                                                                        nc_bytes)
    col_blocks = _cdiv(n, cols)
    chunks = _cdiv(m, rows) * col_blocks
    bp = np.empty(b_size, out.dtype)
    edge = np.empty(edge_size, out.dtype)
    tile = np.empty(tile_size, out.dtype)
    c = _take(counter)
    while c < chunks:
        r0, c0 = c // col_blocks * rows, c % col_blocks * cols
        _run_block(body, a_at, sa_i, sa_k, b_at, sb_k, sb_j, k, bias, act, alpha_, out, r0, min(m, r0 + rows), c0,
                   min(n, c0 + cols), variant, kc_max, nc_max, pack_b, bp, edge, tile)
        c = _take(counter)
