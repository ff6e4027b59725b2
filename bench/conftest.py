"""Benchmark harness shared by every suite in bench/.

Each benchmark group is one kernel or model at one shape; its members are implementations (the NumPy
reference, the numba backend, PyTorch CPU, JAX, ...). :func:`measure` warms the callable up first (JIT
compile and page faults stay out of the timings), then times it for several rounds, and stores in
``extra_info`` what the report needs: the implementation, one call's bytes or flops, the dtype and, for a
memory-bound group, the roof measured now for its working set (:func:`kernels.profile.memory_roof`: a
copy with the same threads and working set, or an in-place read-modify-write for in-place kernels), before
the settle pause that precedes each implementation. The kernels backend (numpy, numba) is selected around
the timed rounds, not inside the timed call. The GEMM roof is the best peer in the run's square-GEMM
groups (``gemm_peak=True``), found by the report. The summary at the end prints the report's table.

Thread counts are set alike for every library: ``THREADS`` (the CPUs this process may use) for Numba,
PyTorch and NumPy's OpenBLAS (threadpoolctl); XLA's CPU pool uses every core by default, the same number.

Plain ``pytest`` runs each benchmark once as a smoke test (``--benchmark-disable`` in setup.cfg);
``pytest bench --benchmark-enable`` times them; ``python -m bench`` runs them and prints the report.
``BENCH_QUICK=1`` takes 3 rounds (at least ROUNDS_S) per benchmark (``python -m bench --quick``).
"""

import contextlib
import math
import os
import statistics
import time

import numba
import numpy as np
import pytest

import kernels
from kernels.profile import memory_roof

from . import _report
from ._report import OURS

THREADS = len(os.sched_getaffinity(0))
QUICK = os.environ.get("BENCH_QUICK") == "1"
# Idle time before each implementation runs: OpenBLAS's threads busy-wait for a long while after a call (and
# torch's OpenMP threads briefly); on two cores the next implementation's threads then wait whole scheduler
# slices (~8 ms medians seen for sub-millisecond products; batch-1 training epochs timed 1.5x slower right
# after the NumPy reference's). Not in smoke runs, which time nothing.
SETTLE_S = 0.3
# Each implementation is timed for at least this long: a call shorter than ROUNDS_S / rounds gets more rounds
# (up to MAX_ROUNDS), so a median spans more than one of the shared host's slow or fast moments (a batch-1
# epoch of ~15 ms times 5 rounds was 75 ms: quick runs read b1 SGD at 0.6x and 1.5x of JAX an hour apart).
ROUNDS_S = 0.25 if QUICK else 0.6
MAX_ROUNDS = 1000
# ``alternate``'s blocks: each implementation's calls back to back for at least this long
BLOCK_S = 0.1
numba.set_num_threads(THREADS)
try:
    import torch
except ImportError:
    torch = None
else:
    torch.set_num_threads(THREADS)
try:
    from threadpoolctl import threadpool_limits
except ImportError:
    _blas_limit = None
else:
    _blas_limit = threadpool_limits(THREADS)  # held for the whole session

_records = []  # what the summary prints


def smoke(config):
    """True in a smoke run (``--benchmark-disable``): each benchmark is called once, nothing is timed."""
    return config.getoption("benchmark_disable") and not config.getoption("benchmark_enable")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["kernels"] = _report.machine()


def _backend(backend):
    """The kernels backend selected (None: left as it is)."""
    return kernels.use_backend(backend) if backend else contextlib.nullcontext()


def _calls(fn, count):
    """The seconds of each of ``count`` back-to-back calls of ``fn``."""
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def _describe(benchmark, *, group, impl, bytes=None, flops=None, dtype="float32", gemm_peak=False, samples=None,
              steps=None, working_set=None, in_place=False, unlike=None, min_side=None, timed=True):
    """Sets the benchmark's group and ``extra_info`` (measuring the memory roof when timed); returns the
    ``(samples, steps)`` the summary derives rates from."""
    benchmark.group = group
    extra = benchmark.extra_info
    extra.update(impl=impl, dtype=np.dtype(dtype).name, threads=THREADS)
    for key, value in (("bytes", bytes), ("flops", flops), ("min_side", min_side)):
        if value:
            extra[key] = int(value)
    if gemm_peak:
        extra["gemm_peak"] = True
    if unlike:
        extra["unlike"] = unlike
    if bytes and not flops and timed:  # before the pause, not right before the timed rounds
        roof = memory_roof(int(working_set or bytes), in_place=in_place)
        extra.update(memory_roof=roof.value, memory_roof_what=roof.what)
    return samples, steps


def _rates(median, samples, steps):
    """samples/s and us/step of a call taking ``median`` seconds."""
    extra = {}
    if samples:
        extra["samples/s"] = samples / median
    if steps:
        extra["us/step"] = median / steps * 1e6
    return extra


@pytest.fixture
def measure(benchmark, request):
    """``measure(fn, group=..., impl=..., bytes=..., flops=..., dtype=..., rounds=..., gemm_peak=...)`` times
    ``fn`` in ``group``. ``bytes`` is one call's memory traffic (reads + writes), ``flops`` its arithmetic
    (only the products computed); the one given decides the roof. ``working_set``: the bytes of the distinct
    arrays touched (the memory roof's size; default ``bytes``); ``in_place``: the kernel updates its
    buffers in place, so its roof is an in-place read-modify-write, not a copy. ``backend``: the kernels
    backend selected around the warm-up and the timed rounds, outside ``fn`` (so its selection is not
    timed). ``gemm_peak``: this group's peers set the GEMM roof of ``dtype``; ``samples`` / ``steps`` per
    call (training): samples/s and us/step; ``min_side``: the smallest side of the products (a matmul's
    min(M, K, N), a training step's batch), below which the report gives no GEMM roof; ``unlike``: why the
    implementations do different work (the report then gives no speed ratio for the group)."""

    def run(fn, *, rounds=10, backend=None, **describe):
        timed = not smoke(request.config)
        samples, steps = _describe(benchmark, timed=timed, **describe)
        if timed:
            time.sleep(SETTLE_S)  # the previous implementation's (and the roof's) thread pools go idle
        with _backend(backend):
            fn()  # warm-up: compile, fault pages in, fill caches the way a training loop would
            rounds = min(rounds, 3) if QUICK else rounds
            if timed:  # a second warm-up call, timed: how many rounds fill ROUNDS_S
                rounds = max(rounds, min(MAX_ROUNDS, math.ceil(ROUNDS_S / max(_calls(fn, 1)[0], 1e-6))))
            result = benchmark.pedantic(fn, rounds=rounds, iterations=1)
        if benchmark.stats is not None:
            median = benchmark.stats.stats.median
            benchmark.extra_info.update(_rates(median, samples, steps))
            _records.extend(_report.records_of(describe["group"], median, benchmark.extra_info))
        return result

    return run


@pytest.fixture
def alternate(benchmark, request):
    """``alternate(impls, *, group=..., rounds=..., **measure's keywords)`` times the implementations of a
    group in turn: ``impls`` maps each to ``(fn, backend)`` (backend as for ``measure``). For groups whose
    calls run long enough that the shared host's slow and fast moments (seconds long) fall on one
    implementation's rounds and not on another's when each is timed back to back: the same training epoch
    read 188 and 227 ms in two neighbouring slots of one run. Each cycle times a block of every
    implementation's calls (back to back, at least BLOCK_S, each block after the SETTLE_S pause), the peers
    in an order rotated per cycle, then ours (``OURS``: the calls pytest-benchmark times, its peers'
    blocks run in its rounds' setup); enough cycles that each is timed for at least ROUNDS_S. Medians of the
    single calls; the peers' go into ``extra_info["peers"]``, which the report reads as records of their
    own. A smoke run calls each once."""

    def run(impls, *, rounds=5, **describe):
        timed = not smoke(request.config)
        samples, steps = _describe(benchmark, impl=OURS, timed=timed, **describe)
        blocks = {}  # implementation -> calls per block, counted from its second call (the first compiles)
        for impl, (fn, backend) in impls.items():
            with _backend(backend):
                fn()
                blocks[impl] = max(1, math.ceil(BLOCK_S / max(_calls(fn, 1)[0], 1e-6))) if timed else 1
        peers = [impl for impl in impls if impl != OURS]
        cycles = max(rounds if not QUICK else min(rounds, 3), math.ceil(ROUNDS_S / BLOCK_S))
        seconds = {impl: [] for impl in peers}
        count = [0]  # rounds of ours so far

        def cycle():  # the setup of each round of ours: at a block's start, the peers' blocks in turn
            index, within = divmod(count[0], blocks[OURS])
            count[0] += 1
            if within:
                return
            turn = index % max(1, len(peers))
            for impl in peers[turn:] + peers[:turn]:
                time.sleep(SETTLE_S)
                fn, backend = impls[impl]
                with _backend(backend):
                    seconds[impl] += _calls(fn, blocks[impl])
            time.sleep(SETTLE_S)

        fn, backend = impls[OURS]
        with _backend(backend):
            result = benchmark.pedantic(fn, setup=cycle if timed else None, rounds=cycles * blocks[OURS],
                                        iterations=1)
        if benchmark.stats is not None:
            median = benchmark.stats.stats.median
            benchmark.extra_info.update(_rates(median, samples, steps), peers={
                impl: dict(median=statistics.median(t), rounds=len(t), min=min(t), max=max(t))
                for impl, t in seconds.items()})
            _records.extend(_report.records_of(describe["group"], median, benchmark.extra_info))
        return result

    return run


def pytest_terminal_summary(terminalreporter):
    if _records:
        terminalreporter.section("kernel benchmarks (medians in ms; the same table as python -m bench)")
        for line in _report.table(_records, _report.machine()).splitlines():
            terminalreporter.write_line(line)


def jax_jit(fn, **jit_options):
    """``jax.jit(fn)`` returning a callable that waits for its results (JAX dispatches asynchronously);
    skips the benchmark when JAX is not installed."""
    jax = pytest.importorskip("jax")
    compiled = jax.jit(fn, **jit_options)

    def call(*args):
        return jax.block_until_ready(compiled(*args))

    return call
