"""Benchmark harness shared by every suite in bench/.

Each benchmark group is one kernel at one shape; its members are implementations (the NumPy reference,
the numba backend, PyTorch CPU, ...). :func:`measure` warms the callable up first (JIT compile and page
faults stay out of the timings), then times it for several rounds. The summary at the end of the run
prints, per group, the median, the achieved GB/s or GFLOP/s, the fraction of the measured roof, and the
ratio of each implementation's speed to NumPy's and to PyTorch's.

Plain ``pytest`` runs each benchmark once as a smoke test (``--benchmark-disable`` in setup.cfg);
``pytest bench --benchmark-enable`` times them.
"""

import time

import numpy as np
import pytest

_results = {}  # group -> {implementation: (median seconds, bytes, flops, fraction of roof)}
_roofs_seen = {}  # unit -> roof measured in this run, for the summary


def _median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@pytest.fixture(scope="session")
def copy_bandwidth(request):
    """Memory bandwidth roof in GB/s: a 256 MiB float32 copy (bytes read + written), median of 7."""
    config = request.config
    if config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"):
        return float("nan")  # smoke run: nothing is timed, so no roof is needed
    src = np.ones(64 * 2**20, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    return 2 * src.nbytes / _median_time(lambda: np.copyto(dst, src), 7) / 1e9


@pytest.fixture(scope="session")
def roofs(copy_bandwidth):
    """Roofs by unit; a suite that knows a compute roof (matmul: BLAS GFLOP/s) adds it here."""
    _roofs_seen["GB/s"] = copy_bandwidth
    return _roofs_seen


@pytest.fixture
def measure(benchmark, roofs):
    """``measure(fn, group=..., impl=..., bytes=..., flops=..., rounds=...)`` times ``fn`` in ``group``.

    ``bytes`` is the memory traffic of one call (reads + writes), ``flops`` its floating-point work;
    the one given decides which roof the result is compared with.
    """

    def run(fn, *, group, impl, bytes=None, flops=None, rounds=10):
        fn()  # warm-up: compile, fault pages in, fill caches the way a training loop would
        benchmark.group = group
        benchmark.extra_info["impl"] = impl
        result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        if benchmark.stats is not None:
            median = benchmark.stats.stats.median
            if bytes:
                benchmark.extra_info["GB/s"] = bytes / median / 1e9
                benchmark.extra_info["roof"] = benchmark.extra_info["GB/s"] / roofs["GB/s"]
            if flops:
                benchmark.extra_info["GFLOP/s"] = flops / median / 1e9
                if "GFLOP/s" in roofs:
                    benchmark.extra_info["roof"] = benchmark.extra_info["GFLOP/s"] / roofs["GFLOP/s"]
            _results.setdefault(group, {})[impl] = (median, bytes, flops, benchmark.extra_info.get("roof"))
        return result

    return run


def pytest_terminal_summary(terminalreporter):
    if not _results:
        return
    tr = terminalreporter
    tr.section("kernel benchmarks: medians, throughput, roof, speed ratios")
    tr.write_line(f"{'group':44} {'impl':10} {'median ms':>10} {'GB/s':>7} {'GFLOP/s':>8} {'roof':>6} "
                  f"{'x numpy':>8} {'x torch':>8}")
    for group, impls in _results.items():
        base = impls.get("numpy", (None,))[0]
        torch_t = impls.get("torch", (None,))[0]
        for impl, (median, nbytes, flops, roof) in impls.items():
            gbs = f"{nbytes / median / 1e9:7.1f}" if nbytes else " " * 7
            gfl = f"{flops / median / 1e9:8.1f}" if flops else " " * 8
            roof_s = f"{roof:6.0%}" if roof is not None else " " * 6
            vs_np = f"{base / median:8.2f}" if base else " " * 8
            vs_t = f"{torch_t / median:8.2f}" if torch_t else " " * 8
            tr.write_line(f"{group:44} {impl:10} {median * 1e3:10.3f} {gbs} {gfl} {roof_s} {vs_np} {vs_t}")
    for unit, value in _roofs_seen.items():
        tr.write_line(f"roof {unit}: {value:.1f} (measured in this run)")
