"""Launch geometry, device allocation and the shared device helpers of the cuda backend.

Block sizes depend on where the kernels run: on a GPU they are sized for occupancy and bandwidth; under
the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, where every GPU thread is a Python thread) they are
small, so the tests stay fast while still covering partial blocks and tiles.
"""

import functools
import math
import sys
import threading

import numba
import numpy as np
from numba import cuda
from numba.cuda.core.config import ENABLE_CUDASIM as SIMULATOR

THREADS = 32 if SIMULATOR else 256  # threads per block of 1-D kernels (a power of two: tree reductions)
# Threads per block of the row kernels (softmax, cross-entropy): each simulated syncthreads costs
# milliseconds, so the simulator runs few threads and few blocks, each block striding over rows.
ROW_THREADS = 4 if SIMULATOR else 128
ZERO = numba.float32(0)  # float32 constants: exact, and they never promote a float32 kernel to float64
ONE = numba.float32(1)


def _like_argument(fn):
    """``fn`` returning its argument's NumPy type: the simulator's math functions return Python floats,
    which NumPy 2 would then round to float32 when combined with ONE or ZERO (CUDA keeps float64)."""
    return lambda x: type(x)(fn(x))


# The math functions kernels use: CUDA's libdevice on a GPU; typed like their argument in the simulator.
exp, log, log1p, sqrt, tanh = (_like_argument(f) if SIMULATOR else f
                               for f in (math.exp, math.log, math.log1p, math.sqrt, math.tanh))


class _SimulatedKernel:
    """A simulator kernel launched with a short GIL switch interval, restored after the launch.

    The simulator runs a block's threads as Python threads and polls them at every syncthreads; with
    the default 5 ms interval each syncthreads costs milliseconds, with 50 us the tests run ~10x faster.
    """

    def __init__(self, compiled):
        self._compiled = compiled

    def __getitem__(self, config):
        launch = self._compiled[config]

        def run(*args):
            previous = sys.getswitchinterval()
            sys.setswitchinterval(5e-5)
            try:
                launch(*args)
            finally:
                sys.setswitchinterval(previous)

        return run


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


if SIMULATOR:
    _thread_safe_shared_arrays()


def kernel(fn):
    """``cuda.jit`` for a kernel (not a device function); see :class:`_SimulatedKernel` for the simulator."""
    compiled = cuda.jit(fn)
    return _SimulatedKernel(compiled) if SIMULATOR else compiled


@functools.cache
def sm_count():
    """The GPU's number of streaming multiprocessors (4 in the simulator: a few blocks, as on a GPU)."""
    return 4 if SIMULATOR else cuda.get_current_device().MULTIPROCESSOR_COUNT


def _max_blocks():
    """Grid-stride kernels launch at most this many blocks: enough to fill every SM several times (in the
    simulator, where blocks run one after another, one per "SM")."""
    return sm_count() if SIMULATOR else 32 * sm_count()


def grid(n, threads=THREADS):
    """``(blocks, threads)`` for a grid-stride loop over ``n`` elements (n >= 1)."""
    return min(math.ceil(n / threads), _max_blocks()), threads


def row_grid(rows):
    """``(blocks, threads)`` for the row kernels: one block per row (blocks stride over the rows when
    there are more rows than the grid limit, and always in the simulator)."""
    return min(rows, _max_blocks() if SIMULATOR else 2**31 - 1), ROW_THREADS


def is_cupy(x):
    return type(x).__module__.split(".")[0] == "cupy"


def empty(shape, dtype, like):
    """An uninitialised array on ``like``'s device, of the same kind: CuPy for CuPy, else Numba."""
    if is_cupy(like):
        import cupy

        return cupy.empty(shape, dtype)
    return cuda.device_array(shape, dtype)


def scalar_result(dtype, like):
    """A device scalar for a loss: 1 element written by the kernel at [0], returned 0-d by :func:`as_scalar`."""
    return empty((1,), dtype, like)


def as_scalar(buf):
    return buf.reshape(())


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

        return cupy.ascontiguousarray(x)
    out = cuda.device_array(x.shape, x.dtype)
    _copy(x, out)
    return out


@cuda.jit(device=True)
def block_reduce(shared, value, take_max):
    """Sum (or max, with ``take_max``) of ``value`` over the threads of a 1-D block, returned to all.

    A tree in shared memory (``shared`` holds blockDim.x elements, a power of two). Warp shuffles would
    save the last five steps on a GPU, but the simulator has no shuffles, and this path is the tested one.
    """
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


@functools.cache
def _sum_kernel(dtype):
    nb_dtype, zero = numba.from_dtype(dtype), dtype.type(0)

    @kernel
    def sum_divide(partials, divisor, result):
        shared = cuda.shared.array(THREADS, nb_dtype)
        acc = zero
        for i in range(cuda.threadIdx.x, partials.shape[0], cuda.blockDim.x):
            acc += partials[i]
        total = block_reduce(shared, acc, False)
        if cuda.threadIdx.x == 0:
            result[0] = total / divisor

    return sum_divide


def sum_divide(partials, divisor, result):
    """``result[0] = sum(partials) / divisor`` in one block: the deterministic last step of a reduction."""
    _sum_kernel(np.dtype(partials.dtype))[1, THREADS](partials, np.dtype(partials.dtype).type(divisor), result)
