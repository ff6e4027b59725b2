"""Matmul: the NumPy reference (OpenBLAS) vs the numba backend's packed GEMM vs PyTorch CPU.

Groups, one shape each (M, K, N: out is M x N, K the reduction):
- square GEMM at 1024^3 and 2048^3 in float32 and float64;
- the backward forms on transposed views, never copied: ``x^T dy`` (dW: x is (B, in), dy (B, out)) and
  ``dy W^T`` (dx: W is (in, out)) for a 784-512 layer at batch 256, and a 512-512 layer at batch 128;
- the fused dense forward ``act(x @ W + b)``: numpy is its three steps (matmul into out, add the bias,
  the activation in place: what the reference backend does), torch is ``addmm`` + the in-place
  activation, numba applies bias and activation to each output tile as it is finished;
- small products (every side at most 128), where call overhead and packing dominate.

Every group reports GFLOP/s (2MNK per call) and, as its roof, the OpenBLAS sgemm rate at 1024^3 measured
in the same run (at the start, or in the 1024^3 group if that reads higher), so "roof" reads as the
fraction of BLAS; ``extra_info`` also holds the
fraction of the 2-core peak: 236 GFLOP/s float32, 118 float64, i.e. 32 (16) flops per cycle per core
at about 3.7 GHz, which is what the micro-kernel alone measured on an L1/L2-resident tile (115-118
float32 per core, see kernels/cpu/_gemm.py); this AMD Zen 4 runs AVX-512 on 256-bit FMA units, so the
issue's ~270 (two 512-bit FMA units at base clock) does not apply. The machine is shared: read the
ratios within one run.

512-bit vectors: the micro-kernel's vector width is fixed in its code (256-bit ymm, 32 registers with
AVX-512VL), so NUMBA_CPU_FEATURES with -prefer-256-bit does not change it; on Zen 4 a 512-bit zmm FMA
costs two 256-bit ones anyway (a 6 x 64 zmm tile measured no faster than 6 x 32 ymm, see _gemm.py).

Run: ``python -m pytest bench/bench_matmul.py --benchmark-enable -q`` (plain pytest: one smoke call each).
"""

import time

import numpy as np
import pytest

import kernels

IMPLS = ["numpy", "numba", "torch"]
PEAK = {np.float32: 236.0, np.float64: 118.0}  # measured 2-core GFLOP/s (see the module docstring)
# Idle time before each implementation is timed: OpenBLAS's threads busy-wait for a long while after a
# call (and torch's OpenMP threads briefly), and on two cores the next implementation's threads then
# wait a whole scheduler slice (~8 ms medians seen for sub-millisecond products without this pause).
SETTLE_S = 0.3
ROOF_GROUP = "matmul 1024^3 float32"  # its numpy member is OpenBLAS at the roof's shape: it can raise the roof


@pytest.fixture(scope="module", autouse=True)
def blas_roof(request, roofs):
    """OpenBLAS sgemm GFLOP/s at 1024^3, measured now: the roof every group is read against. The best of
    three medians of 7, after a settle and two warm-up calls: one slow moment of a shared machine must not
    lower the roof (it read 102-105 instead of ~190 in runs where the same product read 188 a minute
    later; the 1024^3 group, timed first, raises it when it reads higher)."""
    config = request.config
    if config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"):
        return  # smoke run: nothing is timed
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((1024, 1024), dtype=np.float32) for _ in range(2))
    out = np.empty_like(a)
    time.sleep(SETTLE_S)
    medians = []
    for _ in range(3):
        np.matmul(a, b, out=out)
        np.matmul(a, b, out=out)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            np.matmul(a, b, out=out)
            times.append(time.perf_counter() - t0)
        medians.append(float(np.median(times)))
    roofs["GFLOP/s"] = 2 * 1024**3 / min(medians) / 1e9


def _operands(m, k, n, dtype, trans_a=False, trans_b=False, bias=False):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    return a, b, rng.standard_normal(n).astype(dtype) if bias else None, np.empty((m, n), dtype)


def _call(impl, a, b, trans_a, trans_b, bias, activation, out):
    if impl == "torch":
        torch = pytest.importorskip("torch")
        ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
        ta, tb = ta.T if trans_a else ta, tb.T if trans_b else tb
        tbias = None if bias is None else torch.from_numpy(bias)
        act = None if activation is None else getattr(torch, f"{activation}_")

        def run():
            if tbias is None:
                torch.matmul(ta, tb, out=tout)
            else:
                torch.addmm(tbias, ta, tb, out=tout)
            if act is not None:
                act(tout)
        return run

    def run():
        with kernels.use_backend(impl):
            kernels.matmul(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias, activation=activation, out=out)
    return run


def _bench(measure, benchmark, roofs, group, impl, m, k, n, dtype, trans_a=False, trans_b=False, activation=None,
           bias=False, rounds=10):
    a, b, bias_, out = _operands(m, k, n, dtype, trans_a, trans_b, bias)
    flops = 2 * m * n * k
    time.sleep(SETTLE_S)
    measure(_call(impl, a, b, trans_a, trans_b, bias_, activation, out), group=group, impl=impl, flops=flops,
            rounds=rounds)
    if group == ROOF_GROUP and impl == "numpy" and "GFLOP/s" in benchmark.extra_info:
        # the same product timed properly: the roof is the better of the two readings
        roofs["GFLOP/s"] = max(roofs["GFLOP/s"], benchmark.extra_info["GFLOP/s"])
    if "GFLOP/s" in benchmark.extra_info:
        benchmark.extra_info["peak"] = benchmark.extra_info["GFLOP/s"] / PEAK[dtype]
        benchmark.extra_info["peak GFLOP/s"] = PEAK[dtype]
    with kernels.use_backend("numpy"):
        expected = kernels.matmul(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias_, activation=activation)
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3 * np.sqrt(k))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [1024, 2048])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_square(measure, benchmark, roofs, dtype, size, impl):
    _bench(measure, benchmark, roofs, f"matmul {size}^3 {np.dtype(dtype).name}", impl, size, size, size, dtype,
           rounds=5 if size == 2048 else 10)


# (label, M, K, N, trans_a, trans_b): dW = x^T dy with x (B, in), dy (B, out); dx = dy W^T with W (in, out)
BACKWARD = [("x^T dy", 784, 256, 512, True, False), ("dy W^T", 256, 512, 784, False, True),
            ("x^T dy", 512, 128, 512, True, False), ("dy W^T", 128, 512, 512, False, True)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", BACKWARD, ids=[f"{c[0]}-{c[1]}x{c[2]}x{c[3]}" for c in BACKWARD])
def test_backward(measure, benchmark, roofs, case, impl):
    label, m, k, n, trans_a, trans_b = case
    _bench(measure, benchmark, roofs, f"{label} ({m},{k},{n}) f32", impl, m, k, n, np.float32, trans_a, trans_b)


FUSED = [(128, 784, 512), (64, 64, 64), (256, 512, 10)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("shape", FUSED, ids=[f"{m}x{k}x{n}" for m, k, n in FUSED])
def test_fused_dense(measure, benchmark, roofs, shape, activation, impl):
    m, k, n = shape
    _bench(measure, benchmark, roofs, f"dense+{activation} ({m},{k},{n}) f32", impl, m, k, n, np.float32,
           activation=activation, bias=True, rounds=50)


SMALL = [(16, 16, 16), (64, 64, 64), (128, 128, 128), (100, 128, 10)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SMALL, ids=[f"{m}x{k}x{n}" for m, k, n in SMALL])
def test_small(measure, benchmark, roofs, shape, impl):
    m, k, n = shape
    _bench(measure, benchmark, roofs, f"small ({m},{k},{n}) f32", impl, m, k, n, np.float32, rounds=100)
