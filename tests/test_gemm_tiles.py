"""The CPU GEMM's register-tile variants, each forced in turn, against the NumPy reference (so the 512-bit
one stays correct on an AVX2 machine, where LLVM splits its vectors, and the 256-bit fallback on an
AVX-512 one); the blocking, with tiny blocks to reach every block edge at small sizes; the multithreaded
split's determinism; the per-CPU choice and its override."""

import importlib
import os
import subprocess
import sys
import types

import numba
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from llvmlite import binding as llvm_binding

import kernels
from kernels.cpu import _cpuinfo, _gemm

matmul_module = importlib.import_module("kernels.cpu.matmul")
ACTIVATIONS = [None, "relu", "leaky_relu", "sigmoid", "tanh"]
DTYPES = [np.float32, np.float64]
TINY = (16, 2048, 8)  # kc, nc_bytes, mc: several K blocks, N blocks and chunks at small sizes


@pytest.fixture(params=_gemm.VARIANTS)
def variant(request, monkeypatch):
    """Run the CPU backend with this register tile and its default blocking; yields its name."""
    name = request.param
    monkeypatch.setattr(matmul_module, "TILING", (_gemm.VARIANTS.index(name), *_cpuinfo.DEFAULT_BLOCKING[name]))
    with kernels.use_backend("numba"):
        yield name


def tile(variant, dtype):
    return _gemm.TILES[variant][np.dtype(dtype) == np.float64][:2]


def expected_and_bound(a, b, bias, activation, alpha):
    """The reference result in float64 and the rounding error a K-term dot product may have (both sides
    can be off by ``K eps (|a| |b|)``; the activations are 1-Lipschitz)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    with kernels.use_backend("numpy"):
        expected = kernels.matmul(a64, b64, bias=None if bias is None else bias.astype(np.float64),
                                  activation=activation, alpha=alpha)
    magnitude = np.abs(a64) @ np.abs(b64) + (0 if bias is None else np.abs(bias))
    eps = np.finfo(a.dtype).eps
    return expected, 2 * (a.shape[1] + 2) * eps * magnitude + 8 * eps * np.abs(expected) + 10 * np.finfo(a.dtype).tiny


def check(a, b, bias=None, activation=None, alpha=0.1, trans_a=False, trans_b=False):
    """kernels.matmul on the (possibly transposed) operands, within rounding of the reference."""
    y = kernels.matmul(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias, activation=activation, alpha=alpha)
    expected, bound = expected_and_bound(a.T if trans_a else a, b.T if trans_b else b, bias, activation, alpha)
    assert y.dtype == a.dtype and y.shape == expected.shape
    error = np.abs(y - expected)
    assert (error <= bound).all(), f"max error {error.max()} where bound {bound.flat[error.argmax()]}"
    return y


def operands(rng, m, k, n, dtype):
    return rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_sizes_around_the_tile(variant, dtype):
    """0, 1, MR +- 1, NR +- 1 along M and N, with K empty, one, odd and past a K block."""
    mr, nr = tile(variant, dtype)
    rng = np.random.default_rng(mr * nr)
    kc = _cpuinfo.DEFAULT_BLOCKING[variant][0]
    for m in sorted({0, 1, mr - 1, mr, mr + 1, 2 * mr + 1}):
        for n in sorted({0, 1, nr - 1, nr + 1, 2 * nr + 3}):
            for k in (0, 1, 7, kc + 3):
                check(*operands(rng, m, k, n, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", ["m", "k", "n"])
def test_1023_and_1025_along_each_dimension(variant, dtype, dim):
    rng = np.random.default_rng(7)
    for size in (1023, 1025):
        shape = {"m": 37, "k": 45, "n": 70, dim: size}
        check(*operands(rng, shape["m"], shape["k"], shape["n"], dtype), activation="tanh")


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_blocks_reach_every_block_edge(variant, dtype, monkeypatch):
    """K, N and the thread chunks cut into many small pieces (a K block of 16, N blocks of one or two
    panels, one tile row per chunk), on the serial and the parallel path, with the epilogue."""
    index = _gemm.VARIANTS.index(variant)
    monkeypatch.setattr(matmul_module, "TILING", (index, *TINY))
    rng = np.random.default_rng(1)
    for m, k, n in [(13, 50, 45), (130, 70, 140), (61, 33, 9)]:
        a, b = operands(rng, m, k, n, dtype)
        check(a, b, rng.standard_normal(n).astype(dtype), activation="relu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_transposed_and_strided_operands(variant, dtype, trans_a, trans_b):
    """Transposes as flags, and views: every other row or column, reversed (negative strides), Fortran
    order; on the serial path (small) and the parallel one."""
    rng = np.random.default_rng(2)
    for m, k, n in [(9, 20, 35), (150, 90, 110)]:
        a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
        b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
        views = [lambda x: x, lambda x: x[::-1], lambda x: x[:, ::-1], lambda x: np.asfortranarray(x),
                 lambda x: np.repeat(x, 2, axis=1)[:, ::2], lambda x: np.repeat(x, 3, axis=0)[::-3][::-1]]
        for view in views:
            check(view(a), view(b), trans_a=trans_a, trans_b=trans_b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocking", ["default", "tiny"])
def test_transposed_a_packed_or_read_in_place_gives_the_same_bits(variant, dtype, blocking, monkeypatch):
    """x^T dy with x's rows a multiple of PACK_A_STRIDE bytes apart (A^T's panels packed, PANELS_A at a
    time, see _gemm.pack_a) against the same values one element further apart (read in place): identical
    bits, and within rounding of the reference. M past one and several groups of panels and not a whole
    number of tiles, N from under PACK_A_MIN_TILES tiles (not packed) to several N blocks, K past K blocks."""
    if blocking == "tiny":
        monkeypatch.setattr(matmul_module, "TILING", (_gemm.VARIANTS.index(variant), *TINY))
    mr, nr = tile(variant, dtype)
    step = _gemm.PACK_A_STRIDE // np.dtype(dtype).itemsize
    rng = np.random.default_rng(mr)
    for m, k, n in [(step, 30, _gemm.PACK_A_MIN_TILES * nr), (4 * step, 70, 3 * nr + 5), (2 * step, 200, 2 * nr),
                    (step, 9, 300)]:
        rows = _gemm.PANELS_A * mr + mr + 1  # a second group of panels, cut in its second panel
        for used in (m, min(m, rows)):
            x = rng.standard_normal((k, m)).astype(dtype)[:, :used]  # rows m elements apart
            apart = np.empty((k, m + 1), dtype)[:, :used]  # the same values, rows m + 1 apart
            apart[...] = x
            dy = rng.standard_normal((k, n)).astype(dtype)
            packed = check(x, dy, trans_a=True)
            np.testing.assert_array_equal(packed, kernels.matmul(apart, dy, trans_a=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bias_and_activation(variant, dtype, activation):
    """The fused epilogue on register tiles, edge tiles and narrow outputs (N <= 16: the dot tiles)."""
    rng = np.random.default_rng(3)
    for m, k, n in [(25, 40, 50), (200, 100, 70), (300, 64, 10)]:
        a, b = operands(rng, m, k, n, dtype)
        check(a, b, rng.standard_normal(n).astype(dtype), activation=activation, alpha=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_relu_and_leaky_relu_are_their_formulas_on_the_product_bit_for_bit(variant, dtype, bias):
    """The epilogue's relu (bias added in the same pass, or ``_gemm._relu`` alone) and leaky relu give
    exactly ``0 if z < 0 else z`` and ``z if z > 0 else alpha * z`` of the same kernel's ``z = a @ b + bias``,
    NaN and infinities included, over whole vectors, vector tails and edge tiles, serial and multithreaded."""
    rng = np.random.default_rng(11)
    alpha = 0.3
    for m, k, n in [(7, 5, 3), (13, 40, 37), (64, 200, 129), (150, 300, 70)]:
        a, b = operands(rng, m, k, n, dtype)
        a[0, 0], a[1, :], a[2, 0] = np.nan, 0, np.inf  # a NaN row, a zero row, an infinite row
        c = rng.standard_normal(n).astype(dtype) if bias else None
        z = kernels.matmul(a, b, bias=c)
        relu = np.where(z < 0, dtype(0), z)
        leaky = np.where(z > 0, z, dtype(alpha) * z)
        for threads in (1, 2):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            try:
                np.testing.assert_array_equal(kernels.matmul(a, b, bias=c, activation="relu").view(np.uint8),
                                              relu.view(np.uint8))
                np.testing.assert_array_equal(kernels.matmul(a, b, bias=c, activation="leaky_relu", alpha=alpha)
                                              .view(np.uint8), leaky.view(np.uint8))
            finally:
                numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@given(m=st.integers(0, 40), k=st.integers(0, 40), n=st.integers(0, 70), trans_a=st.booleans(),
       trans_b=st.booleans(), f64=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_random_small_shapes(variant, m, k, n, trans_a, trans_b, f64, seed):
    rng = np.random.default_rng(seed)
    dtype = np.float64 if f64 else np.float32
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    check(a, b, rng.standard_normal(n).astype(dtype), activation="sigmoid", trans_a=trans_a, trans_b=trans_b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_result_is_bitwise_the_same_whatever_the_split(variant, dtype, monkeypatch):
    """One thread, two threads, and chunks of every size give identical bits: each element of ``out`` is
    computed by one thread, over the same K blocks in the same order, whatever the split."""
    rng = np.random.default_rng(4)
    index, (kc, nc_bytes, _) = _gemm.VARIANTS.index(variant), _cpuinfo.DEFAULT_BLOCKING[variant]
    for m, k, n in [(301, 530, 277), (500, 200, 12)]:
        a, b = operands(rng, m, k, n, dtype)
        bias = rng.standard_normal(n).astype(dtype)
        results = []
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            for mc in (1, 50, 96, 1000):
                monkeypatch.setattr(matmul_module, "TILING", (index, kc, nc_bytes, mc))
                numba.set_num_threads(threads)
                try:
                    results.append(kernels.matmul(a, b, bias=bias, activation="tanh"))
                finally:
                    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        out = np.empty((m, n), dtype)  # and more threads than cores, chunks taken from the shared counter
        dots = _gemm.narrow(n, k, 1)
        _gemm.gemm_parallel(a.ctypes.data, k, 1, b.ctypes.data, n, 1, k, bias, _gemm.TANH, 0.0, out, 5, index, kc,
                            nc_bytes, 7, _gemm.body(np.dtype(dtype), dots), dots)
        results.append(out)
        for y in results[1:]:
            np.testing.assert_array_equal(y, results[0])


def test_assembly_k_loop_only_for_a_target_with_avx2_and_fma(monkeypatch):
    """The assembly goes into the code only where the target runs it: the host's features, or a portable
    target's (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES), whose cache other CPUs load."""
    config = _gemm.numba_config
    monkeypatch.setattr(config, "CPU_NAME", "generic")
    monkeypatch.setattr(config, "CPU_FEATURES", None)
    assert not _gemm._target_has_avx2_fma()
    monkeypatch.setattr(config, "CPU_FEATURES", "+sse4.2,+avx,+avx2,+fma")
    assert _gemm._target_has_avx2_fma()
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx,+avx2,-fma")
    assert not _gemm._target_has_avx2_fma()
    monkeypatch.setattr(config, "CPU_NAME", None)
    monkeypatch.setattr(config, "CPU_FEATURES", None)
    host = llvm_binding.get_host_cpu_features()
    assert _gemm._target_has_avx2_fma() == (bool(host.get("avx2")) and bool(host.get("fma")))


@pytest.mark.skipif(not _gemm.ASM_LOOP, reason="the assembly K loop needs AVX2 and FMA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_assembly_and_ir_k_loops_give_the_same_bits(dtype, monkeypatch):
    """The avx2 tile's K loop in assembly (``_gemm.ASM_LOOP``, this CPU) and the IR loop that other CPUs
    run: the same FMAs in the same order, so identical bits. ``_block`` compiled again with the IR loop,
    both run through ``gemm`` on K of every remainder of ASM_UNROLL and past K blocks (accumulated into
    ``out``), row-major and transposed A, packed and in-place B, edge tiles, and the reference's bound."""
    index = _gemm.VARIANTS.index("avx2")
    asm_body = _gemm.body(np.dtype(dtype))  # before the switch below: compiled (or loaded) with the assembly
    monkeypatch.setattr(_gemm, "ASM_LOOP", False)
    options = {k: v for k, v in _gemm._tiles.targetoptions.items() if k not in ("nopython", "cache")}
    scope = {**_gemm._block.__globals__, "_tiles": numba.njit(**options)(_gemm._tiles.py_func)}
    ir_block = numba.cfunc(_gemm._signature(numba.from_dtype(np.dtype(dtype))), fastmath=set(_gemm.FASTMATH))(
        types.FunctionType(_gemm._block.__code__, scope, "_block_ir"))
    rng = np.random.default_rng(11)
    nob = np.empty(0, dtype)
    for kc, nc_bytes in [_cpuinfo.DEFAULT_BLOCKING["avx2"][:2], TINY[:2]]:
        for m, k, n, trans_a in [(6, 1, 16, False), (13, 2, 40, False), (25, 3, 17, True), (37, 4, 300, False),
                                 (64, 5, 64, True), (61, 129, 45, False), (50, 131, 200, True), (12, 16, 33, False)]:
            a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
            a = a.T if trans_a else a
            b = rng.standard_normal((k, n)).astype(dtype)
            out_asm, out_ir = np.full((m, n), np.nan, dtype), np.full((m, n), np.nan, dtype)
            _gemm.gemm(a, b, nob, 0, 0.0, out_asm, index, kc, nc_bytes, asm_body)
            _gemm.gemm(a, b, nob, 0, 0.0, out_ir, index, kc, nc_bytes, ir_block.address)
            np.testing.assert_array_equal(out_asm, out_ir)
            expected, bound = expected_and_bound(a, b, None, None, 0.1)
            assert (np.abs(out_asm - expected) <= bound).all()


@given(m=st.integers(1, 3000), n=st.integers(1, 3000), threads=st.integers(1, 8), variant=st.sampled_from(_gemm.VARIANTS),
       f64=st.booleans(), nc_panels=st.integers(1, 64), mc=st.integers(1, 400), dots=st.booleans())
@example(m=100, n=144, threads=1, variant="avx2", f64=False, nc_panels=8, mc=64, dots=False)  # 2 blocks of 5 panels
def test_split_covers_out_in_whole_tiles_and_cuts_columns_first(m, n, threads, variant, f64, nc_panels, mc, dots):
    """The multithreaded split: whole tiles, N blocks within ``nc_max`` and no narrower than CHUNK_MIN_PANELS
    panels unless rows of ``mc`` leave a thread without a chunk, rows cut only where the columns do not give
    CHUNKS_PER_THREAD chunks per thread (each row block packs B again), into no more blocks than of ``mc``
    rows each, and no more than give every thread as many chunks where fewer would; ``dots`` cuts rows only."""
    (mr, nr, _), dot_mr = _gemm.TILES[variant][f64], _gemm.DOT_TILES[variant][0]
    row_tile = dot_mr if dots else mr
    nc_max = nc_panels * nr
    rows, cols = _gemm.split(m, n, threads, row_tile, nr, nc_max, mc, dots)
    assert rows % row_tile == 0 and cols % nr == 0 and rows > 0 and cols > 0
    row_blocks, col_blocks = -(-m // rows), -(-n // cols)
    tiles, panels, row_max = -(-m // row_tile), -(-n // nr), -(-m // max(mc, row_tile))
    want = _gemm.CHUNKS_PER_THREAD * threads
    if dots:
        assert col_blocks == 1
    else:
        assert cols <= nc_max
        if cols < min(panels, _gemm.CHUNK_MIN_PANELS, nc_panels // 2) * nr:  # narrowed: a chunk for each thread
            assert row_max < threads and cols >= -(-panels // threads) * nr
        assert 2 * row_blocks * col_blocks >= min(threads, panels * row_max)  # (up to whole panels)
    assert row_blocks <= row_max  # blocks of mc rows or more (balanced, then whole tiles)
    if row_blocks > 1:  # rows cut only for want of column blocks, and no more than make up the count
        assert col_blocks < want and col_blocks * (row_blocks - 1) < want
    if row_blocks * col_blocks % threads:  # no fewer row blocks would share the chunks out evenly
        assert all(-(-tiles // -(-tiles // r)) * col_blocks % threads for r in range(1, row_blocks))


def test_split_of_the_training_shapes():
    """The 784-256-256-10 layers at batch 128 on 2 threads, avx2 float32 tile: W is packed once (no row
    blocks) for x @ W; at 256 x 784 x 1024 its 8 column blocks; dW of the first layer 4 x 2 chunks. With the
    avx512vl tile and Zen 4's blocking: dW of the second layer in 2 chunks, not 3; 64 x 512 x 256 in 2."""
    mr, nr, _ = _gemm.TILES["avx2"][0]
    assert _gemm.split(128, 256, 2, mr, nr, 128, 192, False) == (132, 128)
    assert _gemm.split(256, 1024, 2, mr, nr, 128, 192, False) == (258, 128)
    assert _gemm.split(784, 256, 2, mr, nr, 128, 192, False) == (198, 128)  # dW = x^T dz: 4 x 2 chunks, B 128 x 256
    mr, nr, _ = _gemm.TILES["avx512vl"][0]
    assert _gemm.split(256, 256, 2, mr, nr, 256, 96, False) == (132, 256)  # x^T dz at 256 x 128 x 256
    assert _gemm.split(64, 256, 2, mr, nr, 256, 96, False) == (66, 128)  # x @ W at 64 x 512 x 256
    assert _gemm.split(256, 1024, 2, mr, nr, 256, 96, False) == (132, 256)  # b256's products: 2 x 4 chunks


BLOCKINGS = sorted({config for config in _cpuinfo.CPUS.values()}
                   | {(name, blocking) for name, blocking in _cpuinfo.DEFAULT_BLOCKING.items()})


@pytest.mark.parametrize("config", BLOCKINGS, ids=[f"{v}-{kc}-{nc // 1024}K-{mc}" for v, (kc, nc, mc) in BLOCKINGS])
def test_every_cpu_blocking(config, monkeypatch):
    """Each (variant, blocking) that some CPU gets, forced on this one: K just under, at and past one and
    two K blocks, N past one N block, transposed operands, both dtypes, on the serial and the parallel path."""
    name, (kc, nc_bytes, mc) = config
    monkeypatch.setattr(matmul_module, "TILING", (_gemm.VARIANTS.index(name), kc, nc_bytes, mc))
    rng = np.random.default_rng(kc)
    with kernels.use_backend("numba"):
        for dtype in DTYPES:
            nr = tile(name, dtype)[1]
            n_block = max(nr, nc_bytes // (kc * np.dtype(dtype).itemsize) // nr * nr)
            for m, k, n in [(13, kc - 1, 20), (31, kc, n_block + 1), (70, kc + 1, 33), (100, 2 * kc + 5, n_block + nr + 3)]:
                for trans_a, trans_b in [(False, False), (True, False), (False, True)]:
                    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
                    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
                    check(a, b, rng.standard_normal(n).astype(dtype), activation="relu", trans_a=trans_a,
                          trans_b=trans_b)


def test_cpu_choice():
    """The table and the feature fallbacks; an override wins; a bad override names the variable."""
    assert _cpuinfo.choose("znver5", set())[0] == "avx512"
    assert _cpuinfo.choose("znver4", {"avx512f", "avx512vl"})[0] == "avx512vl"
    assert _cpuinfo.choose("znver3", {"avx2", "fma"})[0] == "avx2"
    assert _cpuinfo.choose("sapphirerapids", {"avx512f", "avx512vl"})[0] == "avx512"
    assert _cpuinfo.choose("some-future-cpu", {"avx2", "avx512f", "avx512vl"})[0] == "avx512vl"
    assert _cpuinfo.choose("some-future-cpu", {"avx2"})[0] == "avx2"
    assert _cpuinfo.choose("generic", set())[0] == "avx2"
    assert _cpuinfo.choose("znver5", set(), "avx2") == ("avx2", _cpuinfo.DEFAULT_BLOCKING["avx2"])
    assert _cpuinfo.choose("znver3", set(), "avx2") == _cpuinfo.CPUS["znver3"]
    # Zen 1-3's own blocks (KC 384, 192 KiB of packed B: a 512 KiB L2); another AVX2 CPU keeps the smaller default
    for zen in ("znver1", "znver2", "znver3"):
        assert _cpuinfo.choose(zen, {"avx2", "fma"}) == ("avx2", (384, 192 * 1024, 192))
    assert _cpuinfo.choose("haswell", {"avx2", "fma"}) == ("avx2", _cpuinfo.DEFAULT_BLOCKING["avx2"])
    with pytest.raises(ValueError, match="KERNELS_GEMM_VARIANT.*avx512.*'zmm'"):
        _cpuinfo.choose("znver3", set(), "zmm")


def test_cpu_info_shows_the_choice_and_the_override():
    info = kernels.cpu_info()
    assert info["cpu"] == _cpuinfo.CPU and info["gemm_variant"] in _gemm.VARIANTS
    assert info["tile_float32"] == tile(info["gemm_variant"], np.float32)
    assert {"vector_bits", "gemm_vector_bits", "kc", "nc_bytes", "mc", "gemm_variant_forced"} <= set(info)
    env = {**os.environ, "KERNELS_GEMM_VARIANT": "avx512"}
    run = subprocess.run([sys.executable, "-c", "import kernels; i = kernels.cpu_info(); "
                          "print(i['gemm_variant'], i['gemm_variant_forced'], i['tile_float32'])"],
                         env=env, capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["avx512", "True", "(12,", "32)"]


# (m, k, n, trans_b) reaching each route of kernels.cpu.matmul: rows, dots, tiles, the register-tile GEMM, the
# dot-product GEMM (narrow), the multithreaded GEMM
ROUTE_SHAPES = [(1, 40, 30, False), (4, 96, 24, True), (20, 300, 70, False), (13, 37, 29, False), (100, 50, 10, False),
                (128, 128, 128, False)]
FIRST_USES = (("sigmoid", np.float32), ("tanh", np.float32))


def _route_operands(m, k, n, trans_b, dtype):
    rng = np.random.default_rng(m * k * n)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    return rng.standard_normal((m, k)).astype(dtype), b, rng.standard_normal(n).astype(dtype)


def _fresh_process(script, tmp_path, *args):
    """``python -c script *args`` in a new process importing this checkout, with its own Numba cache."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": root}
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)


def test_sigmoid_and_tanh_compile_only_when_a_product_asks_for_them(tmp_path):
    """The epilogue's sigmoid and tanh (``_gemm._transcendental``) are not compiled by products without them;
    the first product with one compiles it from any route (the multithreaded one included, 2 threads), and its
    result is bitwise the one a process that already had it computes."""
    script = (
        "import sys, numpy as np, numba, kernels\n"
        "from kernels.cpu import _gemm\n"
        "from tests.test_gemm_tiles import FIRST_USES, ROUTE_SHAPES, _route_operands\n"
        "numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))\n"
        "m, k, n, trans_b = ROUTE_SHAPES[int(sys.argv[1])]\n"
        "for act in (None, 'relu', 'leaky_relu'):\n"
        "    a, b, bias = _route_operands(m, k, n, trans_b, np.float32)\n"
        "    kernels.matmul(a, b, trans_b=trans_b, bias=bias, activation=act)\n"
        "assert not _gemm._TRANSCENDENTAL, 'compiled without a sigmoid or tanh product'\n"
        "results = {}\n"
        "for act, dtype in FIRST_USES:\n"
        "    a, b, bias = _route_operands(m, k, n, trans_b, dtype)\n"
        "    results[act + np.dtype(dtype).name] = kernels.matmul(a, b, trans_b=trans_b, bias=bias, activation=act)\n"
        "np.savez(sys.argv[2], **results)\n")
    for route, (m, k, n, trans_b) in enumerate(ROUTE_SHAPES):
        saved = tmp_path / f"{route}.npz"
        run = _fresh_process(script, tmp_path, route, saved)
        assert run.returncode == 0, run.stderr
        results = np.load(saved)
        for act, dtype in FIRST_USES:
            a, b, bias = _route_operands(m, k, n, trans_b, dtype)
            here = kernels.matmul(a, b, trans_b=trans_b, bias=bias, activation=act)
            assert results[act + np.dtype(dtype).name].tobytes() == here.tobytes(), (route, act, dtype)
            check(a, b, bias, act, trans_b=trans_b)


def test_a_failed_first_compile_of_sigmoid_raises_or_leaves_nan_never_a_silent_result(tmp_path):
    """kernels.matmul compiles the epilogue's sigmoid/tanh before its compiled code runs, so a failure raises
    there; compiled code reaching the table's first-call callback directly (which cannot raise) gets NaN in the
    block instead of an unactivated one; once the compile works, the callback compiles it and the product is
    right."""
    script = (
        "import numpy as np, importlib, kernels\n"
        "from kernels.cpu import _gemm\n"
        "mm = importlib.import_module('kernels.cpu.matmul')\n"
        "a, b, bias = np.ones((20, 300), np.float32), np.full((300, 70), 0.01, np.float32), np.zeros(70, np.float32)\n"
        "compile_ = _gemm._transcendental_address\n"
        "def broken(dtype):\n"
        "    raise RuntimeError('compile failed')\n"
        "_gemm._transcendental_address = broken\n"
        "try:\n"
        "    kernels.matmul(a, b, bias=bias, activation='sigmoid')\n"
        "    raise SystemExit('kernels.matmul did not raise')\n"
        "except RuntimeError as e:\n"
        "    assert 'compile failed' in str(e)\n"
        "out = np.zeros((20, 70), np.float32)\n"
        "routed = lambda: mm._routed(None, mm.TILING, 1, mm.PARALLEL_MIN_FLOPS, a, b, bias, _gemm.SIGMOID, 0.0, out)\n"
        "routed()\n"
        "assert np.isnan(out).all(), out\n"
        "_gemm._transcendental_address = compile_\n"
        "routed()\n"
        "assert np.allclose(out, 1 / (1 + np.exp(-3.0)), rtol=1e-6), out\n"
        "print('ok')\n")
    run = _fresh_process(script, tmp_path)
    assert run.returncode == 0 and run.stdout.split() == ["ok"], run.stdout + run.stderr
    assert "compile failed" in run.stderr  # the callback's failure is printed, not swallowed
