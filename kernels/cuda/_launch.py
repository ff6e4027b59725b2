"""Launch geometry, the one launch point, device allocation and the shared device helpers of the cuda backend.

Every kernel launch goes through :func:`launch`: its launch configuration is cached, CuPy arguments are
turned into Numba device views once per buffer (cached by pointer, shape, strides and dtype, without
CuPy's per-argument stream synchronisation), and the kernel runs on one stream: CuPy's current stream when
the arrays are CuPy's, the capture stream while a :class:`~kernels.cuda.graph.CapturedStep` records, else
Numba's default stream. ``STATS`` counts launches and argument conversions (``kernels.profile`` and the
tests read it).

Block sizes depend on where the kernels run (:class:`Geometry`): on a GPU they are sized for occupancy and
bandwidth; under the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, where every GPU thread is a Python
thread) they are small, so the tests stay fast while still covering partial blocks and tiles.
:func:`use_geometry` switches to the GPU's constants under the simulator, so tests run the real indexing.
"""

import collections
import contextlib
import dataclasses
import functools
import math
import operator
import sys
import threading
import warnings

import numba
import numpy as np
from numba import cuda
from numba.cuda.core.config import ENABLE_CUDASIM as SIMULATOR

from .. import _scalar

ZERO, ONE = _scalar.ZERO, _scalar.ONE  # float32 constants: exact, and they never promote a float32 kernel to float64
WARP = 32
FULL_MASK = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Launch constants. ``threads``: per block of 1-D kernels (a power of two, for tree reductions).
    ``row_threads``: per block of the row kernels (softmax, cross-entropy); with ``warp_rows`` each warp of
    the block takes one row and reduces it with warp shuffles (rows up to ``warp_row_cols`` columns), else
    the whole block takes a row and reduces it with a shared-memory tree. ``large_tiles``/``small_tiles``:
    the GEMM's (BM, BN, BK, TM, TN)."""

    threads: int
    row_threads: int
    warp_rows: bool
    warp_row_cols: int
    large_tiles: tuple
    small_tiles: tuple


# On a GPU: 256 threads a block; 128-thread row blocks of four one-row warps; 128x128x8 GEMM tiles of 8x8
# per thread, or 64x64x16 of 4x4 (256 threads either way).
GPU = Geometry(threads=256, row_threads=128, warp_rows=True, warp_row_cols=4096,
               large_tiles=(128, 128, 8, 8, 8), small_tiles=(64, 64, 16, 4, 4))
# In the simulator each syncthreads costs milliseconds: few threads, 16-thread GEMM blocks, 4-thread rows.
SIMULATED = Geometry(threads=32, row_threads=4, warp_rows=False, warp_row_cols=0,
                     large_tiles=(32, 32, 16, 8, 8), small_tiles=(16, 16, 16, 4, 4))
_geometry = [SIMULATED if SIMULATOR else GPU]


def geometry():
    """The launch constants in force."""
    return _geometry[0]


@contextlib.contextmanager
def use_geometry(g):
    """Launch with the constants ``g`` inside the block (tests: the GPU's constants under the simulator)."""
    previous, _geometry[0] = _geometry[0], g
    try:
        yield g
    finally:
        _geometry[0] = previous


def _like_argument(fn):
    """``fn`` returning its argument's NumPy type: the simulator's math functions return Python floats,
    which NumPy 2 would then round to float32 when combined with ONE or ZERO (CUDA keeps float64)."""
    return lambda x: type(x)(fn(x))


# The math functions kernels use: CUDA's libdevice on a GPU; typed like their argument in the simulator.
# exp, sqrt and tanh are kernels._scalar's primitives, whose Python bodies are the simulator's.
log, log1p = (_like_argument(f) if SIMULATOR else f for f in (math.log, math.log1p))
exp, sqrt, tanh = _scalar.exp, _scalar.sqrt, _scalar.tanh


def _register_scalar():
    """The cuda side of kernels/_scalar.py: its formulas compile as device functions, its primitives to
    libdevice's functions and ``/``. (The simulator runs them as Python.)"""
    from numba.cuda.extending import overload, register_jitable

    for formula in (*(f for pair in _scalar.ACTIVATIONS.values() for f in pair), *_scalar.OPTIMIZERS):
        register_jitable(formula)

    _scalar.implement(overload, {_scalar.exp: math.exp, _scalar.tanh: math.tanh, _scalar.sqrt: math.sqrt,
                                 _scalar.div: operator.truediv})


if not SIMULATOR:
    _register_scalar()

# ---- the launch point ------------------------------------------------------------------------------------

STATS = collections.Counter()  # "launches"; "conversions": CuPy arrays wrapped as Numba device views


class Kernel:
    """A compiled kernel; ``kernel[griddim, blockdim](*args)`` launches it through :func:`launch`."""

    def __init__(self, fn):
        self.py_func = fn
        self.compiled = cuda.jit(fn)

    def __getitem__(self, config):
        griddim, blockdim = config
        return functools.partial(launch, self, griddim, blockdim)


def kernel(fn):
    """``cuda.jit`` for a kernel (not a device function), launched through :func:`launch`."""
    return Kernel(fn)


def is_cupy(x):
    return type(x).__module__.startswith("cupy")


_VIEWS = {}  # (pointer, shape, strides, dtype) -> Numba device view; holds no reference to the memory
_MAX_VIEWS = 4096


def device_view(x):
    """A Numba device array over CuPy array ``x`` (other arrays as they are), made once per buffer.

    A view is only a pointer with a shape, so a cached one stays right for any live array with the same
    key, and it keeps no memory alive (``owner=None``). Built with ``sync=False``: the kernels run on the
    array's stream (see :func:`launch`), so numba-cuda's synchronisation of that stream on every argument
    (``CUDA_ARRAY_INTERFACE_SYNC``, still on by default in numba-cuda 0.30) would only stall the host.
    """
    if not is_cupy(x):
        return x
    key = (x.data.ptr, x.shape, x.strides, x.dtype.char)
    view = _VIEWS.get(key)
    if view is None:
        if len(_VIEWS) >= _MAX_VIEWS:
            _VIEWS.clear()
        view = _VIEWS[key] = cuda.from_cuda_array_interface(x.__cuda_array_interface__, owner=None, sync=False)
        STATS["conversions"] += 1
    return view


_capture_stream = [None]  # the Numba stream a CapturedStep records on, while it records
_capture_kept = []  # the arrays allocated or used as scratch while recording: the graph replays their pointers


@functools.lru_cache(maxsize=64)
def _external_stream(ptr):
    return cuda.external_stream(ptr)


def stream_for(x):
    """The stream kernels on ``x`` run on: the capture stream while recording, CuPy's current stream for
    CuPy arrays, else Numba's default stream (0). One stream throughout, so launches need no syncs."""
    if _capture_stream[0] is not None:
        return _capture_stream[0]
    if is_cupy(x):
        import cupy

        ptr = cupy.cuda.get_current_stream().ptr
        return _external_stream(ptr) if ptr else 0
    return 0


def _configure(compiled, griddim, blockdim, stream):
    """``compiled[griddim, blockdim, stream]``. Numba's low-occupancy warning (under 128 blocks) is
    silenced: the grids here are sized on purpose (grid-stride loops, small row and loss grids)."""
    with warnings.catch_warnings():
        # by message (after numba's highlighting codes): numba-cuda 0.30 has its own warning class
        warnings.filterwarnings("ignore", message=r".*Grid size \d+ will likely result in GPU under-utilization")
        return compiled[griddim, blockdim, stream]


# Made once per configuration on a GPU (the simulator configures at every launch: see _run_simulated).
_configured = functools.lru_cache(maxsize=1024)(_configure)


def launch(kernel, griddim, blockdim, *args):
    """Launch ``kernel`` on the stream of its first argument (see :func:`stream_for`)."""
    STATS["launches"] += 1
    _run(kernel.compiled, (griddim, blockdim, stream_for(args[0])), [device_view(a) for a in args])


def _run_on_gpu(compiled, config, args):
    _configured(compiled, *config)(*args)


_simulated_launch = threading.Lock()


def _run_simulated(compiled, config, args):
    """Under the simulator, one launch at a time, configured at each launch, with a short GIL switch
    interval. The simulator's kernel holds one configuration at a time (its [] sets it and returns the
    kernel itself), and swaps the kernel's globals (its ``cuda``) for the launch's length: launches from two
    host threads at once would take each other's grids and break each other (a GPU queues them). The
    interval: the simulator runs a block's threads as Python threads and polls them at every syncthreads;
    with the default 5 ms interval each syncthreads costs milliseconds, with 50 us the tests run ~10x
    faster."""
    with _simulated_launch:
        previous = sys.getswitchinterval()
        sys.setswitchinterval(5e-5)
        try:
            compiled[config](*args)
        finally:
            sys.setswitchinterval(previous)


_run = _run_simulated if SIMULATOR else _run_on_gpu

# ---- the simulator: thread-safe shared arrays, and warp shuffles ---------------------------------------


def _thread_safe_shared_arrays():
    """Make the simulator's ``cuda.shared.array`` safe for the threads of a block.

    The simulator finds a block's shared array by the calling line in a dict, with a check-then-insert
    that is not atomic: when a thread switch falls between the two, threads of one block get different
    arrays and a reduction silently goes wrong (the short switch interval above makes that likely).
    This is the same lookup under a lock (dynamic shared memory, shape 0, is left to the simulator).
    """
    from numba.cuda.simulator.kernelapi import FakeCUDAShared
    from numba.np.numpy_support import as_dtype

    allocate, lock = FakeCUDAShared.array, threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:
            return allocate(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            if key not in self._allocations:
                self._allocations[key] = np.empty(shape, as_dtype(dtype) if isinstance(dtype, numba.types.Type)
                                                  else dtype)
            return self._allocations[key]

    FakeCUDAShared.array = array


def _simulated_shuffles():
    """Give the simulator (which has none) ``cuda.shfl_down_sync`` and ``cuda.shfl_sync`` for full warps, so
    the warp-shuffle reductions run and are tested there too: the 32 lanes of a warp meet at a barrier of
    their own, publish their values, meet again, and each reads its source lane's value."""
    from numba.cuda.simulator.kernelapi import FakeCUDAModule

    lock = threading.Lock()

    def exchange(value, source_lane):
        me = threading.current_thread()
        warp, lane = divmod(me.thread_id, WARP)
        with lock:
            state = me._manager.__dict__.setdefault("_warps", {})
            if warp not in state:
                state[warp] = (threading.Barrier(WARP, timeout=60), [None] * WARP)  # a lane that died: fail
            barrier, slots = state[warp]
        slots[lane] = value
        barrier.wait()
        result = slots[source_lane] if 0 <= source_lane < WARP else value
        barrier.wait()
        return result

    FakeCUDAModule.shfl_down_sync = lambda self, mask, value, delta: exchange(
        value, threading.current_thread().thread_id % WARP + delta)
    FakeCUDAModule.shfl_sync = lambda self, mask, value, lane: exchange(value, lane)


if SIMULATOR:
    _thread_safe_shared_arrays()
    _simulated_shuffles()

# ---- geometry -------------------------------------------------------------------------------------------


@functools.cache
def sm_count():
    """The GPU's number of streaming multiprocessors (4 in the simulator: a few blocks, as on a GPU)."""
    return 4 if SIMULATOR else cuda.get_current_device().MULTIPROCESSOR_COUNT


def _max_blocks():
    """Grid-stride kernels launch at most this many blocks: enough to fill every SM several times (in the
    simulator, where blocks run one after another, one per "SM")."""
    return sm_count() if SIMULATOR else 32 * sm_count()


def grid(n, threads=None):
    """``(blocks, threads)`` for a grid-stride loop over ``n`` elements (n >= 1)."""
    threads = threads or geometry().threads
    return min(math.ceil(n / threads), _max_blocks()), threads


def row_layout(rows, cols):
    """``(warp_rows, blocks, threads)`` for the row kernels: a warp per row (rows up to ``warp_row_cols``
    long) or a block per row; blocks stride over the rows beyond the grid (always in the simulator)."""
    g = geometry()
    warp_rows = g.warp_rows and cols <= g.warp_row_cols
    units = -(-rows // (g.row_threads // WARP)) if warp_rows else rows
    return warp_rows, min(units, _max_blocks() if SIMULATOR else 2**31 - 1), g.row_threads

# ---- allocation -----------------------------------------------------------------------------------------


def empty(shape, dtype, like):
    """An uninitialised array on ``like``'s device, of the same kind: CuPy for CuPy, else Numba."""
    if is_cupy(like):
        import cupy

        return _kept(cupy.empty(shape, dtype))
    return _kept(cuda.device_array(shape, dtype))


def _kept(array):
    if _capture_stream[0] is not None:
        _capture_kept.append(array)
    return array


@functools.lru_cache(maxsize=256)
def _scratch(kind, name, shape, dtype):
    if kind == "cupy":
        import cupy

        return cupy.zeros(shape, dtype)
    return cuda.to_device(np.zeros(shape, dtype))


def scratch(name, shape, dtype, like):
    """A long-lived zeroed device buffer, one per (name, shape, dtype) and array kind, reused by every call
    (never allocated inside a captured step after its first, eager run). Kernels that use one on the same
    stream follow each other, so sharing it is safe; it is not for concurrent streams. One used while a
    step is recorded is kept with its graph, which replays its pointer after the cache may have dropped it."""
    return _kept(_scratch("cupy" if is_cupy(like) else "numba", name, tuple(shape), np.dtype(dtype)))


@functools.cache
def _scalar_class(base):
    def __float__(self):
        """The value, copied to the host: a synchronisation, only when asked for."""
        return float(self.copy_to_host())

    # the base's name: code that recognises device arrays by type name (the simulator's) still does
    return type(base.__name__, (base,), {"__float__": __float__, "__module__": __name__})


def as_scalar(buf):
    """``buf`` (1 element) as a 0-d device array on which ``float()`` works: CuPy's already does; a Numba
    device array becomes a subclass whose ``__float__`` copies the value to the host."""
    scalar = buf.reshape(())
    if not is_cupy(scalar):
        scalar.__class__ = _scalar_class(type(scalar))
    return scalar


def _is_c_contiguous(x):
    flags = getattr(x, "flags", None)
    return flags.c_contiguous if hasattr(flags, "c_contiguous") else x.is_c_contiguous()


@kernel
def _copy1d(src, dst):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, dst.shape[0], stride):
        dst[i] = src[i]


@kernel
def _copy2d(src, dst):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    cols = dst.shape[1]
    for i in range(start, dst.shape[0] * cols, stride):
        dst[i // cols, i % cols] = src[i // cols, i % cols]


def _copy(src, dst):
    if src.size == 0:
        return
    if src.ndim == 1:
        _copy1d[grid(src.size)](src, dst)
    elif src.ndim == 2:
        _copy2d[grid(src.size)](src, dst)
    else:  # rank > 2: one launch per leading index, each a 2-D (or lower) copy
        for i in range(src.shape[0]):
            _copy(src[i], dst[i])


def ascontiguous(x):
    """``x`` itself when C-contiguous, else a C-contiguous copy made on the device (never via the host)."""
    if _is_c_contiguous(x):
        return x
    if is_cupy(x):
        import cupy

        return _kept(cupy.ascontiguousarray(x))
    out = _kept(cuda.device_array(x.shape, x.dtype))
    _copy(x, out)
    return out

# ---- reductions (device functions) ------------------------------------------------------------------------


@cuda.jit(device=True)
def block_reduce(shared, value, take_max):
    """Sum (or max, with ``take_max``) of ``value`` over the threads of a 1-D block, returned to all.

    A tree in shared memory (``shared`` holds blockDim.x elements, a power of two)."""
    t = cuda.threadIdx.x
    shared[t] = value
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if t < step:
            other = shared[t + step]
            shared[t] = max(shared[t], other) if take_max else shared[t] + other
        cuda.syncthreads()
        step //= 2
    result = shared[0]
    cuda.syncthreads()  # shared may be reused by the caller's next reduction
    return result


@cuda.jit(device=True)
def warp_reduce(value, take_max):
    """Sum (or max) of ``value`` over the 32 lanes of a warp, returned to all: five shuffles, no barrier."""
    offset = WARP // 2
    while offset > 0:
        other = cuda.shfl_down_sync(FULL_MASK, value, offset)
        value = max(value, other) if take_max else value + other
        offset //= 2
    return cuda.shfl_sync(FULL_MASK, value, 0)


@cuda.jit(device=True)
def online_add(m, s, x, lowest):
    """Add ``x`` to a running (max m, sum of exp(. - m) s): one pass instead of a max pass and a sum pass.
    exp(x - x) rather than 1 keeps the reference's NaN for +inf; -inf adds nothing (exp(-inf - m) = 0 for
    a finite m; a row of only -inf keeps s = 0, which gives the reference's NaN)."""
    if x > m:
        return x, s * exp(m - x) + exp(x - x)
    if x != lowest:
        return m, s + exp(x - m)
    return m, s


@cuda.jit(device=True)
def online_merge(m, s, m2, s2, lowest):
    """Two running (max, sum) pairs as one (see :func:`online_add`)."""
    top = max(m, m2)
    if top == lowest:
        return top, s + s2
    return top, s * exp(m - top) + s2 * exp(m2 - top)


@cuda.jit(device=True)
def warp_reduce_online(m, s, lowest):
    offset = WARP // 2
    while offset > 0:
        m, s = online_merge(m, s, cuda.shfl_down_sync(FULL_MASK, m, offset),
                            cuda.shfl_down_sync(FULL_MASK, s, offset), lowest)
        offset //= 2
    return cuda.shfl_sync(FULL_MASK, m, 0), cuda.shfl_sync(FULL_MASK, s, 0)


@cuda.jit(device=True)
def block_reduce_online(shared_m, shared_s, m, s, lowest):
    t = cuda.threadIdx.x
    shared_m[t], shared_s[t] = m, s
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if t < step:
            shared_m[t], shared_s[t] = online_merge(shared_m[t], shared_s[t], shared_m[t + step],
                                                    shared_s[t + step], lowest)
        cuda.syncthreads()
        step //= 2
    m, s = shared_m[0], shared_s[0]
    cuda.syncthreads()
    return m, s


@cuda.jit(device=True)
def grid_mean(shared, flag, value, zero, partials, counter, divisor, result):
    """``result[0] = (sum of value over every thread of the grid) / divisor``, in the same launch.

    Each block writes its sum to ``partials[block]``; the last block to finish (an atomic ticket on
    ``counter`` after a memory fence) adds the partials in block order, writes the result and resets the
    counter for the next launch. No follow-up kernel, and deterministic (no atomic adds of floats).
    Every thread of a 1-D block calls it; ``flag`` is a 1-element int32 shared array."""
    t = cuda.threadIdx.x
    total = block_reduce(shared, value, False)
    if t == 0:
        partials[cuda.blockIdx.x] = total
        cuda.threadfence()
        flag[0] = 1 if cuda.atomic.add(counter, 0, 1) == cuda.gridDim.x - 1 else 0
    cuda.syncthreads()
    if flag[0] == 1:
        acc = zero
        for i in range(t, cuda.gridDim.x, cuda.blockDim.x):
            acc += partials[i]
        total = block_reduce(shared, acc, False)
        if t == 0:
            result[0] = total / divisor
            counter[0] = 0

# ---- CUDA graphs ----------------------------------------------------------------------------------------


class CapturedStep:
    """``step = CapturedStep(fn)``: each ``step()`` runs the kernel launches of ``fn()`` (say, a training
    step), replayed as one CUDA graph from the third call on: one graph launch instead of one per kernel.

    Call 1 runs ``fn`` as usual (kernels compile, scratch buffers are allocated). Call 2 records its
    launches on a private CuPy stream into a CUDA graph (CuPy's stream capture, relaxed mode) and launches
    the graph on CuPy's current stream; later calls only launch the graph. A graph replays fixed pointers,
    so ``fn`` must work on long-lived buffers: copy each step's inputs into the same arrays, and read the
    outputs from the arrays it returns: the value the recorded call returned is returned by every replay,
    refreshed. Arrays the kernels allocate or take from the scratch cache while recording are kept with the
    graph; arrays ``fn`` itself allocates must be returned or otherwise kept alive. ``fn`` must not read
    device data on the host.

    Where capture is unavailable (no CuPy, the Numba CUDA simulator, ``capture=False``) or fails, every
    call runs ``fn()`` with plain launches; ``fallback`` says why (``None`` when capturing).
    """

    def __init__(self, fn, capture=True):
        self._fn = fn
        self._graph = None
        self._result = None
        self._kept = []
        self.calls = 0
        self.fallback = _capture_unavailable() if capture else "capture=False"

    @property
    def captured(self):
        return self._graph is not None

    def __call__(self):
        self.calls += 1
        if self._graph is None and (self.fallback is not None or self.calls == 1):
            return self._fn()
        if self._graph is None:
            try:
                self._graph, self._result, self._kept = _record(self._fn)
            except Exception as error:  # noqa: BLE001 - any capture failure: plain launches from now on
                self.fallback = f"capture failed: {error!r}"
                warnings.warn(f"CapturedStep: {self.fallback}; running with plain launches", RuntimeWarning,
                              stacklevel=2)
                return self._fn()
        self._graph.launch()
        return self._result


def _capture_unavailable():
    """Why CUDA graphs cannot be recorded here, or None."""
    if SIMULATOR:
        return "the Numba CUDA simulator has no CUDA graphs"
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (recording uses CuPy's stream capture)"
    if not hasattr(cupy.cuda.Stream, "begin_capture"):
        return f"CuPy {cupy.__version__} has no stream capture"
    return None


def _record(fn):
    """``fn()``'s launches recorded into a CuPy graph: (graph, fn's result, arrays allocated or used as
    scratch meanwhile)."""
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    mode = getattr(cupy.cuda.runtime, "streamCaptureModeRelaxed", None)
    previous_kept = _capture_kept[:]
    _capture_kept.clear()
    with stream:
        _capture_stream[0] = _external_stream(stream.ptr)
        try:
            stream.begin_capture(**({} if mode is None else {"mode": mode}))
            try:
                result = fn()
            finally:
                graph = stream.end_capture()
        finally:
            _capture_stream[0] = None
            kept = _capture_kept[:]
            _capture_kept[:] = previous_kept
    return graph, result, kept
