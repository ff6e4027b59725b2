"""Profile every kernel: ``python -m kernels.profile [--backend numba|cuda] [--quick] [--smoke]``.

For each kernel at a representative shape it prints the first-call time (compilation, reported apart),
the median of the steady-state calls, the achieved GB/s (memory traffic: bytes read + written once) and
GFLOP/s for matmul, and the percentage of a roof measured in the same run: on a GPU the device-to-device
copy bandwidth and cuBLAS (through CuPy, when installed) for matmul; on the CPU a copy with the kernel's
thread count and working set (:func:`memory_roof`: cache-resident kernels against a cache-resident copy,
large ones against DRAM) and the best GEMM among NumPy's BLAS, PyTorch and XLA (:func:`gemm_roof`). The
bench suites and ``python -m bench`` read their results against the same roofs (and an in-place one for
in-place kernels). GPU times come from CUDA events.

For Nsight: every kernel call sits in an NVTX range named after the kernel (when the ``nvtx`` package is
installed), and the steady state is bracketed by ``cudaProfilerStart/Stop``, so
``nsys profile --capture-range=cudaProfilerApi python -m kernels.profile --backend cuda`` (or ``ncu
--profile-from-start off``) skips compilation. Under the Numba CUDA simulator the run uses tiny shapes and
its timings mean nothing; it only shows that every kernel runs.
"""

import argparse
import contextlib
import functools
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

import kernels

# Shapes: elementwise and loss sizes, softmax / cross-entropy rows x classes, square GEMM side, a dense
# layer's (batch, in, out) for the fused epilogue, bias_grad rows x columns, optimizer parameter count.
SIZES = {
    "full": dict(n=16 * 2**20, rows=(4096, 1000), gemm=4096, layer=(4096, 1024, 1024), cols=(8192, 1024),
                 params=10 * 2**20, repeat=20),
    "quick": dict(n=2**20, rows=(512, 1000), gemm=1024, layer=(512, 784, 256), cols=(1024, 1024), params=2**20,
                  repeat=10),
    "smoke": dict(n=1000, rows=(9, 33), gemm=40, layer=(9, 17, 21), cols=(9, 17), params=1000, repeat=2),
}


@dataclass
class Case:
    """One kernel call to time: ``call()`` runs it; ``bytes``/``flops`` are one call's traffic and work;
    ``working_set`` the bytes of the distinct arrays it touches (its roof's size; default ``bytes``);
    ``in_place``: it updates its arrays in place (its roof an in-place update, no copy's write-allocate read)."""

    kernel: str
    shape: str
    call: object
    bytes: int
    flops: int = 0
    working_set: int = 0
    in_place: bool = False


def _nvtx_range(name):
    try:
        import nvtx
    except ImportError:
        return contextlib.nullcontext()
    return nvtx.annotate(name)


@dataclass(frozen=True)
class Roof:
    """A measured upper bound: ``value`` (GB/s or GFLOP/s) and what was measured (printed with results)."""

    value: float
    what: str


def l3_bytes():
    """The last-level cache size this CPU reports (32 MiB when it reports none)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]]
    except (OSError, ValueError, KeyError):
        return 32 * 2**20


@functools.lru_cache(maxsize=None)
def _roof_kernels():
    """``(copy, update)``: ``copy(src, dst)`` (dst = src) and ``update(x)`` (x = -x, in place), run the way
    the elementwise kernels run (``cpu._parallel.run``: one serial call below the parallel threshold, else
    CHUNK-sized tasks handed out dynamically over Numba's threads, loops on unsigned bounds)."""
    from .cpu._jit import jit
    from .cpu._parallel import chunked, run

    @jit
    def roof_copy(lo, hi, src, dst):
        for i in range(lo, hi):
            dst[i] = src[i]

    @jit
    def roof_update(lo, hi, x):
        for i in range(lo, hi):
            x[i] = -x[i]

    copy_chunks, update_chunks = chunked(roof_copy), chunked(roof_update)
    return (lambda src, dst: run(roof_copy, copy_chunks, src.size, src, dst),
            lambda x: run(roof_update, update_chunks, x.size, x))


@functools.lru_cache(maxsize=None)
def memory_roof(nbytes, threads=None, in_place=False):
    """The bandwidth of a float32 pass over a working set of ``nbytes`` on ``threads`` threads, the way a
    kernel with that working set would: by default Numba's thread count, or one thread below the kernels'
    parallel threshold (where they stay on the calling thread). A copy (half the bytes read, half written)
    by default; with ``in_place``, a read-modify-write of one ``nbytes`` array (an in-place kernel: its
    writes need no write-allocate read, which a copy's destination costs uncounted), counted as ``nbytes``
    read and written. A working set that fits the L3 is timed warm (the roof of a cache-resident kernel), a
    larger one comes from DRAM. The fastest of enough calls to last ~0.2 s (at least 5): a roof is the best
    the machine does, not its median under load."""
    import numba

    from .cpu._parallel import PARALLEL_MIN

    if in_place:
        x = np.ones(max(nbytes // 4, 2048), np.float32)
        size, moved, kind = x.size, 2 * x.nbytes, "in-place update"
        kernel, args = _roof_kernels()[1], (x,)
    else:
        src = np.ones(max(nbytes // 8, 1024), np.float32)
        size, moved, kind = src.size, 2 * src.nbytes, "copy"
        kernel, args = _roof_kernels()[0], (src, np.empty_like(src))
    working_set = moved if not in_place else moved // 2
    threads = threads or (numba.get_num_threads() if size >= PARALLEL_MIN else 1)
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        kernel(*args)
        once = _time(lambda: kernel(*args))
        times = [_time(lambda: kernel(*args)) for _ in range(max(5, min(200, int(0.2 / once))))]
    finally:
        numba.set_num_threads(previous)
    where = "cache-resident" if working_set <= l3_bytes() else "DRAM"
    return Roof(moved / min(times) / 1e9, f"{threads}-thread {kind} of {_size(working_set)} ({where})")


def gemm_roof(rates):
    """The GEMM roof from the GFLOP/s that peers reached in the same run (``{name: GFLOP/s}``): the best."""
    rates = {name: rate for name, rate in rates.items() if rate}
    if not rates:
        return None
    best = max(rates, key=rates.get)
    return Roof(rates[best], f"best GEMM peer {best} (" + ", ".join(f"{n} {r:.0f}" for n, r in rates.items())
                + " GFLOP/s)")


def gemm_peers(dtype):
    """``{name: (a, b) -> a @ b}`` for the GEMMs installed here: NumPy's BLAS, PyTorch, XLA (JAX)."""
    peers = {"NumPy BLAS": np.matmul}
    try:
        import torch
    except ImportError:
        pass
    else:
        peers["torch"] = lambda a, b: torch.from_numpy(a) @ torch.from_numpy(b)
    try:
        import jax

        if np.dtype(dtype) == np.float64 and not jax.config.jax_enable_x64:
            raise ImportError("float64 needs jax_enable_x64")
    except ImportError:
        pass
    else:
        mm = jax.jit(lambda a, b: a @ b)
        peers["XLA"] = lambda a, b: mm(a, b).block_until_ready()
    return peers


def measured_gemm_roof(n, dtype, repeat=5):
    """:func:`gemm_roof` over :func:`gemm_peers` timed now on an ``n``-cubed product of ``dtype``."""
    a, b = _rand((n, n), dtype, 20), _rand((n, n), dtype, 21)
    rates = {}
    for name, mm in gemm_peers(dtype).items():
        args = (a, b)
        if name == "XLA":
            import jax

            args = tuple(jax.device_put(x) for x in args)
        mm(*args)
        rates[name] = 2 * n**3 / _median([_time(lambda: mm(*args)) for _ in range(repeat)]) / 1e9
    return gemm_roof(rates)


def _size(nbytes):
    return f"{nbytes / 2**20:.0f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.0f} KiB"


class _Host:
    """The numba backend: host arrays, wall-clock timing, roofs from :func:`memory_roof`, :func:`gemm_roof`."""

    simulator = False

    def to(self, x):
        return x

    def time(self, fn):
        return _time(fn)

    def copy_roof(self, nbytes, in_place=False):
        return memory_roof(nbytes, in_place=in_place)

    def gemm_roof(self, n, dtype):
        return measured_gemm_roof(n, dtype)

    def capture(self):
        return contextlib.nullcontext()


class _Device:
    """The cuda backend: Numba device arrays, CUDA event timing, device copy bandwidth and cuBLAS."""

    def __init__(self):
        from numba import cuda

        from .cuda._launch import SIMULATOR

        self.cuda = cuda
        self.simulator = SIMULATOR
        self.busy_out = None

    def to(self, x):
        return self.cuda.to_device(x)

    def time(self, fn):
        if self.simulator:  # the simulator's events record no time
            return _time(fn)
        self.queue_ahead()
        start, end = self.cuda.event(), self.cuda.event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def queue_ahead(self, steps=1 << 19):
        """Queue ~1 ms of one-thread device work before the start event, so that the host's launch cost
        (~80-130 us per call on an H200 machine) overlaps it and the events time the kernel, not the launch."""
        if self.busy_out is None:
            self.busy_out = self.cuda.to_device(np.zeros(1, np.float32))
        _busy_kernel()[1, 1](steps, self.busy_out)

    def copy_roof(self, nbytes, in_place=False):
        """A device-to-device copy of ``nbytes`` (an in-place kernel is held to it too: a device has no
        write-allocate read to spare)."""
        src = self.cuda.to_device(np.ones(max(nbytes // 8, 1024), np.float32))
        dst = self.cuda.device_array_like(src)
        return Roof(2 * src.nbytes / _median([self.time(lambda: dst.copy_to_device(src)) for _ in range(5)]) / 1e9,
                    f"device copy of {_size(2 * src.nbytes)}")

    def gemm_roof(self, n, dtype):
        try:
            import cupy
        except ImportError:
            return None
        a, b = cupy.asarray(_rand((n, n), dtype, 20)), cupy.asarray(_rand((n, n), dtype, 21))
        a @ b
        return gemm_roof({"cuBLAS (CuPy)": 2 * n**3 / _median([self.time(lambda: a @ b) for _ in range(5)]) / 1e9})

    def capture(self):
        """cudaProfilerStart/Stop around the steady state (not in the simulator, which has neither)."""
        start, stop = getattr(self.cuda, "profile_start", None), getattr(self.cuda, "profile_stop", None)
        if self.simulator or start is None:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def bracket():
            start()
            try:
                yield
            finally:
                stop()

        return bracket()


@functools.cache
def _busy_kernel():
    """A one-thread CUDA kernel of ``steps`` dependent multiply-adds: device work that holds the stream."""
    from numba import cuda

    @cuda.jit
    def busy(steps, out):
        x = out[0]
        for _ in range(steps):
            x = x * np.float32(0.5) + np.float32(1.0)
        out[0] = x

    return busy


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median(times):
    return statistics.median(times)


def _rand(shape, dtype, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def cases(dev, size, dtype):
    """Every kernel of the contract at the shapes of ``size`` (a key of SIZES), on ``dev``'s arrays."""
    s = SIZES[size]
    item = np.dtype(dtype).itemsize
    n, (rows, classes), g, (batch, fan_in, fan_out), (bg_rows, bg_cols), p = (
        s["n"], s["rows"], s["gemm"], s["layer"], s["cols"], s["params"])
    x, dy = dev.to(_rand(n, dtype, 0)), dev.to(_rand(n, dtype, 1))
    target = dev.to(np.where(_rand(n, dtype, 2) >= 0, 1, -1).astype(dtype))
    logits, dlogits = dev.to(_rand((rows, classes), dtype, 3)), dev.to(_rand((rows, classes), dtype, 4))
    labels = dev.to(np.arange(rows, dtype=np.int64) % classes)
    a, b = dev.to(_rand((g, g), dtype, 5)), dev.to(_rand((g, g), dtype, 6))
    xin, w, bias = (dev.to(_rand(shape, dtype, 7 + i)) for i, shape in
                    enumerate([(batch, fan_in), (fan_in, fan_out), (fan_out,)]))
    dy_layer = dev.to(_rand((batch, fan_out), dtype, 10))
    cols = dev.to(_rand((bg_rows, bg_cols), dtype, 11))
    out = dev.to(np.empty(n, dtype))
    params = [dev.to(np.abs(_rand(p, dtype, 12 + i))) for i in range(5)]
    param, grad, s1, s2 = params[0], params[1], params[2], params[3]
    ew, rw = f"{n}", f"{rows}x{classes}"
    gemm_flops = 2 * g**3
    layer_flops = 2 * batch * fan_in * fan_out
    result = [Case("matmul", f"{g}x{g}x{g}", lambda: kernels.matmul(a, b), 3 * g * g * item, gemm_flops),
              Case("matmul+bias+relu", f"{batch}x{fan_in}x{fan_out}",
                   lambda: kernels.matmul(xin, w, bias=bias, activation="relu"),
                   (batch * fan_in + fan_in * fan_out + fan_out + batch * fan_out) * item, layer_flops),
              Case("matmul trans_a (dW)", f"{fan_in}x{batch}x{fan_out}",
                   lambda: kernels.matmul(xin, dy_layer, trans_a=True),
                   (batch * fan_in + batch * fan_out + fan_in * fan_out) * item, layer_flops),
              Case("matmul trans_b (dx)", f"{batch}x{fan_out}x{fan_in}",
                   lambda: kernels.matmul(dy_layer, w, trans_b=True),
                   (batch * fan_out + fan_in * fan_out + batch * fan_in) * item, layer_flops)]
    for name in ("relu", "leaky_relu", "sigmoid", "tanh"):
        fwd, bwd = getattr(kernels, name), getattr(kernels, name + "_backward")
        result.append(Case(name, ew, lambda fwd=fwd: fwd(x, out=out), 2 * n * item))
        result.append(Case(name + "_backward", ew, lambda bwd=bwd: bwd(x, dy, out=out), 3 * n * item))
    probs = kernels.softmax(logits)
    result += [
        Case("softmax", rw, lambda: kernels.softmax(logits, out=dlogits), 2 * rows * classes * item),
        Case("softmax_backward", rw, lambda: kernels.softmax_backward(probs, logits, out=dlogits),
             3 * rows * classes * item),
        Case("softmax_cross_entropy", rw, lambda: kernels.softmax_cross_entropy(logits, labels, out=dlogits),
             2 * rows * classes * item + rows * 8),
        Case("mse", ew, lambda: kernels.mse(x, dy, out=out), 3 * n * item),
        Case("binary_cross_entropy", ew, lambda: kernels.binary_cross_entropy(x, dy, out=out), 3 * n * item),
        Case("hinge", ew, lambda: kernels.hinge(x, target, out=out), 3 * n * item),
        Case("bias_grad", f"{bg_rows}x{bg_cols}", lambda: kernels.bias_grad(cols), (bg_rows + 1) * bg_cols * item),
        Case("dropout", ew, lambda: kernels.dropout(x, 0.5, 1, out=out), 2 * n * item),
        # the optimizers: working set param, grad and state, updated in place (against an in-place roof: a
        # copy's uncounted write-allocate read would let them pass 100%)
        Case("sgd_step (momentum)", f"{p}",
             lambda: kernels.sgd_step(param, grad, lr=1e-3, momentum=0.9, velocity=s1), 5 * p * item,
             working_set=3 * p * item, in_place=True),
        Case("adam_step", f"{p}", lambda: kernels.adam_step(param, grad, s1, s2, step=10), 7 * p * item,
             working_set=4 * p * item, in_place=True),
        Case("rmsprop_step", f"{p}", lambda: kernels.rmsprop_step(param, grad, s1), 5 * p * item,
             working_set=3 * p * item, in_place=True),
        Case("adagrad_step", f"{p}", lambda: kernels.adagrad_step(param, grad, s1), 5 * p * item,
             working_set=3 * p * item, in_place=True),
        Case("adadelta_step", f"{p}", lambda: kernels.adadelta_step(param, grad, s1, s2), 7 * p * item,
             working_set=4 * p * item, in_place=True),
    ]
    # the training step's fused kernels: bias + activation backward, per-layer norms, batch normalisation
    cols_dy = dev.to(_rand((bg_rows, bg_cols), dtype, 17))
    dz, db = dev.to(np.empty((bg_rows, bg_cols), dtype)), dev.to(np.empty(bg_cols, dtype))
    offsets = dev.to(np.linspace(0, p, 5).astype(np.int64))
    metrics, scale = dev.to(np.zeros(kernels.metrics_size(4))), dev.to(np.ones(1, dtype))
    norms = kernels.segment_norms(param, offsets)
    loss = kernels.softmax_cross_entropy(logits, labels, out=dlogits)[0]
    gamma, beta, mean, var = (dev.to(np.full(bg_cols, v, dtype)) for v in (1, 0, 0, 1))
    _, xhat, inv_std = kernels.batchnorm_forward(cols, gamma, beta, mean, var)
    table = f"{bg_rows}x{bg_cols}"
    result += [
        Case("bias_act_backward", table, lambda: kernels.bias_act_backward(cols, cols_dy, "relu", out=dz, bias_out=db),
             (3 * bg_rows + 1) * bg_cols * item),
        Case("segment_norms", f"{p} in 4", lambda: kernels.segment_norms(param, offsets), p * item),
        # a batch of one's Dense gradient norm from its factors: reads x, dy and the bias gradient once
        Case("dense_grad_norm", f"1x{bg_cols} rows", lambda: kernels.dense_grad_norm(cols[:1], cols_dy[:1], db),
             3 * bg_cols * item),
        Case("count_correct", rw, lambda: kernels.count_correct(logits, labels, metrics),
             rows * classes * item + rows * 8),
        Case("check_step", "4 norms", lambda: kernels.check_step(loss, norms, metrics, scale, rows=rows, max_norm=1.0),
             (4 + metrics.size) * 8),
        Case("batchnorm_stats", table, lambda: kernels.batchnorm_stats(cols), 2 * bg_rows * bg_cols * item),
        # the statistics (two passes), then normalise: read x, write xhat and y
        Case("batchnorm_forward", table, lambda: kernels.batchnorm_forward(cols, gamma, beta, mean, var),
             5 * bg_rows * bg_cols * item, working_set=3 * bg_rows * bg_cols * item),
        Case("batchnorm_eval", table, lambda: kernels.batchnorm_eval(cols, gamma, beta, mean, var),
             2 * bg_rows * bg_cols * item),
        Case("batchnorm_backward_sums", table, lambda: kernels.batchnorm_backward_sums(cols_dy, xhat),
             2 * bg_rows * bg_cols * item),
        # the sums, then dx: read dy and xhat twice, write dx
        Case("batchnorm_backward", table, lambda: kernels.batchnorm_backward(cols_dy, xhat, gamma, inv_std),
             5 * bg_rows * bg_cols * item, working_set=3 * bg_rows * bg_cols * item),
    ]
    return result


def profile(backend="numba", size="quick", dtype="float32", only=None, file=sys.stdout):
    """Profile the kernels (names containing one of ``only`` when given); prints a table, returns its rows."""
    dev = _Device() if backend == "cuda" else _Host()
    if dev.simulator:
        size = "smoke"
        print("NOTE: Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1): every GPU thread is a Python thread, so "
              "these timings are meaningless; this run only shows that every kernel profiles.", file=file)
    dtype = np.dtype(dtype).type
    with kernels.use_backend(backend):
        todo = [c for c in cases(dev, size, dtype) if not only or any(o in c.kernel for o in only)]
        s = SIZES[size]
        g = s["gemm"]
        gemm = dev.gemm_roof(g, dtype)
        gemm_what = (f"; GEMM {gemm.value:.1f} GFLOP/s at {g}^3, {gemm.what}" if gemm else
                     "; no GEMM roof (CuPy not installed)")
        print(f"backend {backend}, {np.dtype(dtype)}, shapes '{size}'; roofs: a copy with each kernel's threads "
              f"and working set (an in-place update for the optimizers){gemm_what}", file=file)
        memory = {case.kernel: dev.copy_roof(case.working_set or case.bytes, case.in_place) for case in todo
                  if not case.flops}
        first = {}
        for case in todo:  # first calls: compilation (or loading the cache), kept out of the capture range
            with _nvtx_range(case.kernel + " (first call)"):
                first[case.kernel] = dev.time(case.call)
        rows = []
        with dev.capture():
            for case in todo:
                with _nvtx_range(case.kernel):
                    case.call()
                    times = [dev.time(case.call) for _ in range(s["repeat"])]
                median = _median(times)
                gbs = case.bytes / median / 1e9
                gflops = case.flops / median / 1e9 if case.flops else None
                if gflops:
                    roof, roof_what = (gflops / gemm.value, "GEMM") if gemm else (None, "")
                else:
                    copy = memory[case.kernel]
                    roof, roof_what = gbs / copy.value, f"{copy.value:.0f} GB/s {copy.what}"
                rows.append(dict(kernel=case.kernel, shape=case.shape, first_ms=first[case.kernel] * 1e3,
                                 median_ms=median * 1e3, gbs=gbs, gflops=gflops, roof=roof, roof_what=roof_what))
    _print_table(rows, file)
    return rows


def _print_table(rows, file):
    print(f"{'kernel':24} {'shape':>18} {'first call ms':>14} {'median ms':>10} {'GB/s':>8} {'GFLOP/s':>9} "
          f"{'% roof':>7}  roof", file=file)
    for r in rows:
        gflops = f"{r['gflops']:9.1f}" if r["gflops"] else " " * 9
        roof = f"{r['roof']:7.0%}" if r["roof"] is not None else " " * 7
        print(f"{r['kernel']:24} {r['shape']:>18} {r['first_ms']:14.1f} {r['median_ms']:10.3f} {r['gbs']:8.1f} "
              f"{gflops} {roof}  {r['roof_what']}", file=file)


def launch_overhead(calls=200, file=sys.stdout):
    """The cuda backend's host-side work per call, with the kernels themselves not run.

    Each case calls the public API on device arrays (CuPy's when installed, else Numba's) with the launch
    point's last step (``kernels.cuda._launch._run``) replaced by one that configures the kernel and does
    not launch it, so what is timed is the Python work of one call: argument checks, output allocation,
    launch configuration and argument conversion.
    Also counts kernel launches and CuPy-to-Numba argument conversions per call (``_launch.STATS``). Under
    the simulator the device arrays are simulated ones, so only the counts and the relative times mean
    something; ``bench/gpu_check.py`` times real launches on a GPU. Returns the rows it prints.
    """
    from numba import cuda

    from .cuda import _launch

    try:
        import cupy

        to = cupy.asarray
    except ImportError:
        to = cuda.to_device
    rng = np.random.default_rng(0)

    def dev(*shape):
        return to(rng.standard_normal(shape).astype(np.float32))

    x, out, m, v, a, b, logits = dev(1000), dev(1000), dev(1000), dev(1000), dev(64, 64), dev(64, 64), dev(64, 10)
    labels = to(np.arange(64) % 10)
    todo = {"relu 1000": lambda: kernels.relu(x, out=out), "matmul 64x64x64": lambda: kernels.matmul(a, b),
            "softmax_cross_entropy 64x10": lambda: kernels.softmax_cross_entropy(logits, labels),
            "mse 1000": lambda: kernels.mse(x, out), "adam_step 1000": lambda: kernels.adam_step(x, out, m, v, step=1)}
    rows = []
    run, _launch._run = _launch._run, lambda compiled, config, args: _launch._configured(compiled, *config)
    try:
        for name, call in todo.items():
            call()  # compile / first configuration
            before = dict(_launch.STATS)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(calls):
                    call()
                times.append((time.perf_counter() - t0) / calls)
            per_call = {k: (_launch.STATS[k] - before.get(k, 0)) / (5 * calls) for k in ("launches", "conversions")}
            rows.append(dict(kernel=name, us=_median(times) * 1e6, **per_call))
    finally:
        _launch._run = run
    print(f"cuda host-side work per call ({'CuPy' if to is not cuda.to_device else 'Numba'} arrays, kernels not "
          f"run{', simulator' if _launch.SIMULATOR else ''}):", file=file)
    print(f"{'call':30} {'us/call':>8} {'launches':>9} {'conversions':>12}", file=file)
    for r in rows:
        print(f"{r['kernel']:30} {r['us']:8.1f} {r['launches']:9.1f} {r['conversions']:12.2f}", file=file)
    return rows


PERF_MAP_MAX = 1 << 20  # the most bytes one map entry covers (the last one, or one before a gap)


def perf_map(path=None):
    """Write ``perf``'s map of this process's JIT code (``/tmp/perf-<pid>.map``, or ``path``) and return its
    path: every Numba-compiled function alive in the process, named ``module.function(argument types)``, so
    that ``perf report`` on a ``perf record`` of this process names the kernels (and the compiled training
    step) instead of printing addresses. LLVM's own perf listener (``NUMBA_ENABLE_PROFILING``) writes nothing
    with llvmlite's wheels. Numba keeps entry points, not sizes, so an entry runs to the next one (at most
    PERF_MAP_MAX bytes); inlined callees count in their caller. ``KERNELS_PERF_MAP=1`` writes it at exit."""
    from numba.core.ccallback import CFunc
    from numba.core.compiler import CompileResult

    names = {}
    for found in gc.get_objects():  # every compiled overload and cfunc, cached or not: Numba keeps no registry
        kind = type(found)  # not isinstance: a dead weakref proxy raises, some modules warn on __class__
        if issubclass(kind, CompileResult) and found.library is not None:
            args = ", ".join(map(str, found.fndesc.argtypes))
            named = {found.fndesc.llvm_func_name: f"{found.fndesc.modname}.{found.fndesc.qualname}({args[:100]})"}
        elif issubclass(kind, CFunc) and found._wrapper_name is not None:  # keeps its library, not its result
            name = f"{found._pyfunc.__module__}.{found.__qualname__}{found._sig}"
            named = {found._wrapper_name: f"{name} (C wrapper)", found._wrapper_name.removeprefix("cfunc."): name}
        else:
            continue
        library = found.library if issubclass(kind, CompileResult) else found._library
        for symbol, name in named.items():
            address = library.get_pointer_to_function(symbol)
            if address:
                names.setdefault(address, name)
    path = path or f"/tmp/perf-{os.getpid()}.map"
    starts = sorted(names)
    with open(path, "w") as file:
        for start, end in zip(starts, starts[1:] + [None]):
            size = PERF_MAP_MAX if end is None else min(end - start, PERF_MAP_MAX)
            file.write(f"{start:x} {size:x} {names[start]}\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kernels.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("numba", "cuda"), default="numba")
    parser.add_argument("--quick", action="store_const", const="quick", dest="size", default="full",
                        help="smaller shapes (seconds instead of minutes)")
    parser.add_argument("--smoke", action="store_const", const="smoke", dest="size",
                        help="tiny shapes: only checks that every kernel runs")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="profile only kernels whose name contains NAME")
    parser.add_argument("--launch-overhead", action="store_true",
                        help="cuda only: the host-side microseconds, launches and conversions per call")
    parser.add_argument("--perf-map", action="store_true",
                        help="then write perf's map of the JIT code, naming the kernels in `perf record`'s samples")
    args = parser.parse_args(argv)
    if args.launch_overhead:
        launch_overhead()
    else:
        profile(args.backend, args.size, args.dtype, args.only)
    if args.perf_map:
        print(f"perf map: {perf_map()}")


if __name__ == "__main__":
    main()
