"""Numba compile options shared by the CPU kernels."""

import types

import numba
from numba.core.cpu_options import ParallelOptions

# Fast-math flags that let LLVM reassociate and vectorise reductions and contract a*b+c into FMAs,
# but not nnan/ninf: kernels must keep IEEE NaN/Inf behaviour, and not afn: libm accuracy stays.
FASTMATH = frozenset({"nsz", "arcp", "contract", "reassoc"})
# Threads only where a kernel says ``prange``: Numba's parallel=True would also turn array expressions,
# slice assignments and allocations (``db[:] = 0``, ``np.zeros``) into parallel loops of their own, which
# under a chunk size of 1 (``_parallel.dynamic``) are handed out one element at a time: bias_act_backward
# at 256x1024 took 3.7x as long that way. An options object, not a dict: Numba empties the dict it is given
# on the first compile, and later signatures would compile with every option on.
PRANGE_ONLY = ParallelOptions(dict(prange=True, fusion=True, comprehension=False, reduction=False,
                                   inplace_binop=False, setitem=False, numpy=False, stencil=False))


def jit(fn=None, *, parallel=False, fastmath=True, inline="never"):
    """``numba.njit`` with the project's options: on-disk cache, no GIL, safe fast-math."""
    options = dict(cache=True, nogil=True, parallel=PRANGE_ONLY if parallel else False,
                   fastmath=set(FASTMATH) if fastmath else False, inline=inline)
    if inline == "always":  # an inlined helper is compiled into its callers; nothing to cache
        options.pop("cache")
    decorator = numba.njit(**options)
    return decorator if fn is None else decorator(fn)


def serial(kernel):
    """``kernel`` (a ``parallel=True`` dispatcher) compiled again without threads, under its own name (its
    own cache file: Numba's cache key ignores compile options): the same code, ``prange`` running as
    ``range``, at about half the compile time. For inputs below the kernel's parallel threshold, where it
    runs serially anyway. The same results to the last bit, not always in it (a cached kernel next to a
    twin compiled in this process can round differently: tests/test_warmup.py), so a caller that must
    reproduce the per-kernel step's bits (the compiled step) calls the function ``_parallel.scheduled``
    picks."""
    fn = kernel.py_func
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    twin.__qualname__, twin.__doc__ = fn.__qualname__ + "_serial", fn.__doc__
    options = {name: value for name, value in kernel.targetoptions.items() if name != "nopython"}
    return numba.njit(**{**options, "parallel": False}, cache=True)(twin)
