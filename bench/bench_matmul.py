"""Matmul: the NumPy reference (OpenBLAS) vs the numba backend's packed GEMM vs PyTorch CPU vs JAX (XLA).

Groups, one shape each (M, K, N: out is M x N, K the reduction):
- square GEMM at 1024^3 and 2048^3 in float32 and float64;
- every product of one training step of bench_training's GEMM-bound configurations (784-256-256-10 at
  batch 128, 784-1024-1024-10 at batch 256, 256-512-256-10 tanh at batch 64): ``x @ W`` with its fused
  bias (+ relu or tanh), and the backward
  forms on transposed views, never copied: ``x^T dy`` (dW: x is (B, in), dy (B, out)) and ``dy W^T`` (dx:
  W is (in, out); not for the first layer, whose input needs no gradient);
- the fused dense forward ``act(x @ W + b)``: numpy is its three steps (matmul into out, add the bias,
  the activation in place: what the reference backend does), torch is ``addmm`` + the in-place
  activation, numba applies bias and activation to each output tile as it is finished;
- small products (every side at most 128), where call overhead and packing dominate.

Every group reports GFLOP/s (2MNK per call). The roof is measured, never a constant: the best peer
(OpenBLAS through NumPy, PyTorch, XLA) in the square groups of the same dtype and run (``gemm_peak``),
found by the report (bench/_report.py, kernels.profile.gemm_roof). JAX runs ``jax.jit(a @ b)`` (float64
under ``jax.enable_x64``); it has no ``out=`` and no transposed-view operands, so its transposed groups
time ``a.T @ b`` inside the jit (XLA folds the transpose into the dot). The numpy row is whatever
OpenBLAS kernel NumPy loaded: :func:`openblas` names it (threadpoolctl) and says when
``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` force an older one; the README shows how to compare against
native OpenBLAS. The machine is shared: read the ratios within one run.

Run: ``python -m pytest bench/bench_matmul.py --benchmark-enable -q`` (plain pytest: one smoke call each).
"""

import contextlib

import numpy as np
import pytest

import kernels

from ._report import openblas
from .bench_training import CONFIGS
from .conftest import QUICK

IMPLS = ["numpy", "numba", "torch", "jax"]


@pytest.fixture(scope="module", autouse=True)
def blas_kernel(record_testsuite_property):
    """Names the OpenBLAS kernel in use, in the run's output and its JUnit properties."""
    print(f"\nnumpy matmul: OpenBLAS {openblas()}")
    record_testsuite_property("openblas", openblas())


def _operands(m, k, n, dtype, trans_a=False, trans_b=False, bias=False):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    return a, b, rng.standard_normal(n).astype(dtype) if bias else None, np.empty((m, n), dtype)


def _call(impl, a, b, trans_a, trans_b, bias, activation, out):
    if impl == "jax":
        return _jax_call(a, b, trans_a, trans_b, bias, activation)
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

    def run():  # measure selects the backend around it (outside the timed call)
        kernels.matmul(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias, activation=activation, out=out)
    return run


def _jax_call(a, b, trans_a, trans_b, bias, activation):
    """The product in one ``jax.jit``, float64 under ``jax.enable_x64``; returns a callable writing nothing."""
    jax = pytest.importorskip("jax")
    x64 = jax.enable_x64(True) if a.dtype == np.float64 else contextlib.nullcontext()
    act = {None: lambda y: y, "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "tanh": jax.numpy.tanh}[activation]

    def product(a, b, *bias):
        y = (a.T if trans_a else a) @ (b.T if trans_b else b)
        return act(y + bias[0]) if bias else act(y)

    with x64:
        mm = jax.jit(product)
        args = [jax.device_put(x) for x in (a, b) + (() if bias is None else (bias,))]

    def run():
        with x64:
            return jax.block_until_ready(mm(*args))
    return run


def _bench(measure, group, impl, m, k, n, dtype, trans_a=False, trans_b=False, activation=None, bias=False,
           rounds=10, gemm_peak=False):
    a, b, bias_, out = _operands(m, k, n, dtype, trans_a, trans_b, bias)
    flops = 2 * m * n * k
    result = measure(_call(impl, a, b, trans_a, trans_b, bias_, activation, out), group=group, impl=impl,
                     flops=flops, dtype=dtype, rounds=rounds, gemm_peak=gemm_peak, min_side=min(m, k, n),
                     backend=impl if impl in ("numpy", "numba") else None)
    if impl == "jax":
        out[...] = np.asarray(result)
    with kernels.use_backend("numpy"):
        expected = kernels.matmul(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias_, activation=activation)
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3 * np.sqrt(k))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [1024, 2048])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_square(measure, dtype, size, impl):
    _bench(measure, f"matmul {size}^3 {np.dtype(dtype).name}", impl, size, size, size, dtype,
           rounds=5 if size == 2048 else 10, gemm_peak=True)


def _steps(widths, activation, batch):
    """The products one training step of an MLP computes (bench_training's flops count the same ones), as
    (label, M, K, N, trans_a, trans_b, activation, bias): per layer ``x @ W + b`` (``activation`` on hidden
    layers, fused), ``dW = x^T dy`` and, for all but the first layer, ``dx = dy W^T``."""
    steps = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        hidden = i < len(widths) - 2
        steps.append(("x@W+b" + (f" {activation}" if hidden else ""), batch, fan_in, fan_out, False, False,
                      activation if hidden else None, True))
        steps.append(("x^T dy", fan_in, batch, fan_out, True, False, None, False))
        if i > 0:
            steps.append(("dy W^T", batch, fan_out, fan_in, False, True, None, False))
    return steps


# every product of a step of bench_training's GEMM-bound configurations (784-256-256-10 relu at batch 128,
# 784-1024-1024-10 relu at batch 256, 256-512-256-10 tanh at batch 64): the forward x @ W with its fused bias
# + activation, dW = x^T dy with x (B, in) and dy (B, out), dx = dy W^T with W (in, out) (none for the first
# layer); quick runs: the first and the last
GEMM_BOUND = [CONFIGS[0], CONFIGS[3]] if QUICK else [CONFIGS[0], CONFIGS[1], CONFIGS[3]]
TRAINING = [(f"{'-'.join(map(str, widths))}{'' if activation == 'relu' else ' ' + activation} b{batch} {label}", *shape)
            for widths, activation, batch, _, _ in GEMM_BOUND
            for label, *shape in _steps(widths, activation, batch)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", TRAINING, ids=[f"{c[0]}-{c[1]}x{c[2]}x{c[3]}".replace(" ", "-") for c in TRAINING])
def test_training_shapes(measure, case, impl):
    label, m, k, n, trans_a, trans_b, activation, bias = case
    _bench(measure, f"{label} ({m},{k},{n}) f32", impl, m, k, n, np.float32, trans_a, trans_b, activation, bias,
           rounds=10 if 2 * m * k * n > 1e8 else 50)


FUSED = [(128, 784, 512), (64, 64, 64), (256, 512, 10)][:1 if QUICK else 3]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["relu", "tanh"] if QUICK else ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("shape", FUSED, ids=[f"{m}x{k}x{n}" for m, k, n in FUSED])
def test_fused_dense(measure, shape, activation, impl):
    m, k, n = shape
    _bench(measure, f"dense+{activation} ({m},{k},{n}) f32", impl, m, k, n, np.float32,
           activation=activation, bias=True, rounds=50)


SMALL = [(64, 64, 64), (100, 128, 10)] if QUICK else [(16, 16, 16), (64, 64, 64), (128, 128, 128), (100, 128, 10)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SMALL, ids=[f"{m}x{k}x{n}" for m, k, n in SMALL])
def test_small(measure, shape, impl):
    m, k, n = shape
    _bench(measure, f"small ({m},{k},{n}) f32", impl, m, k, n, np.float32, rounds=100)
