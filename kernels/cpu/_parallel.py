"""Elementwise loops, serial on small buffers and in parallel chunks on large ones.

A kernel is a ``jit`` body ``body(lo, hi, *args)`` updating elements ``lo <= i < hi`` of flat buffers,
plus its parallel driver ``_body_chunks = chunked(_body)``, which calls it on each chunk (:func:`_driver`).
:func:`run` calls the body directly below :data:`PARALLEL_MIN` elements (no thread start-up) and the
driver above it. The bounds are unsigned: indices provably never go negative, so Numba's negative-index
wraparound (a select per access) drops out and LLVM vectorises the body's loop.

Why a driver per body rather than one generic driver taking the body as an argument: Numba keys its
on-disk cache on the argument types, and a dispatcher's type differs in every process, so such a driver
recompiles (2-3 s) on every start; it also costs about 5 us per call to type the dispatcher. (A closure
over the body would miss the cache in the same way: Numba keys it on the pickled closure, and a pickled
dispatcher holds an id made anew in every process.) Why not one function compiled twice
(parallel and serial): the cache key ignores compile options, so the two would overwrite each other.
Numba's cache does not see edits to this file from the modules that inline its helpers or hold its
drivers: clear the ``__pycache__`` of ``kernels/cpu`` after changing CHUNK or :func:`_driver`.

Scheduling: Numba splits a ``prange`` into one equal block per thread unless a chunk size is set, so a
thread whose core is busy (another library's pool still spinning, a neighbour process) holds the whole
call up. :func:`dynamic` runs a parallel kernel with Numba's chunk size 1: the threading layer hands out
the loop's iterations (CHUNK-sized pieces, or rows) as threads become free, TBB by work stealing. Which
elements a piece covers never depends on timing, and reductions add per-piece partials in index order
(:func:`ordered_sum`), so results are bitwise the same on any thread count and under any load.
"""

import types

import numba
import numpy as np
from numba import prange

from . import _math
from ._jit import jit

CHUNK = 1 << 14  # elements per parallel task: 64 KiB of a float32 buffer, a multiple of any vector width
# Below this, waking the threads costs about what sharing the work saves: for adam_step in float32 with
# 2 threads the parallel loop broke even at 32K elements and was 1.3x faster at 64K, 1.5x at 128K.
PARALLEL_MIN = 1 << 16


@jit(inline="always")
def n_chunks(n):
    """How many CHUNK-sized pieces cover n elements."""
    return (n + CHUNK - 1) // CHUNK


@jit(inline="always")
def chunk(c, n):
    """Unsigned bounds ``(lo, hi)`` of chunk ``c`` of ``n`` elements."""
    lo = c * CHUNK
    return np.uint64(lo), np.uint64(min(n, lo + CHUNK))


@jit(inline="always")
def ordered_sum(values):
    """Sum of a 1-D array of per-chunk partials on the calling thread, always in the same order.

    ``values.sum()`` inside a ``parallel=True`` function becomes a parallel reduction split by thread
    count, so its rounding would change with the number of threads.
    """
    total = _math.typed(0, values)
    for i in range(values.size):
        total += values[i]
    return total


def _driver(n, *args):
    """What :func:`chunked` makes for ``body`` (never compiled itself): ``body(lo, hi, *args)`` on each chunk."""
    for c in prange(n_chunks(n)):
        lo, hi = chunk(c, n)
        body(lo, hi, *args)  # noqa: F821 - each driver's own global (see chunked)


def chunked(body):
    """The parallel driver ``<body>_chunks(n, *args)`` of the ``jit`` body ``body(lo, hi, *args)``.

    A copy of :func:`_driver` with ``body`` as a global, cached as if written beside ``body``: under its
    own qualified name (Numba keys its on-disk cache on the defining file and qualified name, so drivers
    sharing one name would load each other's code) and in ``body``'s file, so an edit of that file
    invalidates it (the cached driver holds body's compiled code)."""
    fn = body.py_func
    name, qualname = fn.__name__ + "_chunks", fn.__qualname__ + "_chunks"
    names = dict(co_filename=fn.__code__.co_filename, co_name=name)
    if hasattr(_driver.__code__, "co_qualname"):  # Python 3.11 on
        names["co_qualname"] = qualname
    driver = types.FunctionType(_driver.__code__.replace(**names), {**globals(), "body": body}, name)
    driver.__qualname__, driver.__module__ = qualname, fn.__module__
    driver.__doc__ = f"``{fn.__name__}(lo, hi, *args)`` on each chunk of ``0 <= i < n``, in parallel."
    return jit(driver, parallel=True)


_set_chunksize = None  # Numba's setter of the calling thread's prange chunk size, once its threads run
_get_threads = None  # Numba's getter of the calling thread's thread count, once its threads run


def num_threads():
    """``numba.get_num_threads()`` without its cost: that takes the threading layer's start-up locks on
    every call (~1.5 us, a tenth of a 16^3 matmul); the layer's C getter reads the same thread-local."""
    global _get_threads
    if _get_threads is None:
        from numba.np.ufunc import parallel

        numba.get_num_threads()  # starts the threading layer, which defines the getter
        _get_threads = getattr(parallel, "_get_num_threads", numba.get_num_threads)
    threads = _get_threads()
    return threads if threads > 0 else numba.get_num_threads()  # (numba raises for a broken count)


def dynamic(kernel, *args):
    """``kernel(*args)`` with its ``prange`` iterations handed out one at a time (see the module doc)."""
    global _set_chunksize
    if _set_chunksize is None:
        from numba.np.ufunc import parallel

        numba.get_num_threads()  # starts the threading layer, which defines the setter
        # the C setter directly: numba.set_parallel_chunksize takes a process-wide lock, ~20 us a call
        _set_chunksize = getattr(parallel, "_set_parallel_chunksize", numba.set_parallel_chunksize)
    previous = _set_chunksize(1)
    try:
        return kernel(*args)
    finally:
        _set_chunksize(previous)


def scheduled(kernel, small=None, minimum=PARALLEL_MIN):
    """``kernel`` (its first argument an array) run through :func:`dynamic` from ``minimum`` elements on (the
    kernel's own parallel threshold); below, ``small`` if given (its serial twin, ``_jit.serial``), else
    ``kernel`` itself. The one way the numba backend picks between a kernel and its serial twin."""
    small = kernel if small is None else small

    def call(x, *args):
        return small(x, *args) if x.size < minimum else dynamic(kernel, x, *args)

    call.__name__, call.__doc__ = kernel.__name__, kernel.__doc__
    call.kernel, call.small, call.minimum = kernel, small, minimum  # what the compiled step picks alike
    return call


def run(body, body_chunks, n, *args):
    """``body(lo, hi, *args)`` over ``0 <= i < n``: one serial call when small, else ``body_chunks``."""
    if n < PARALLEL_MIN:
        body(np.uint64(0), np.uint64(n), *args)
    else:
        dynamic(body_chunks, n, *args)
