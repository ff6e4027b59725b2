"""Numba compile options shared by the CPU kernels."""

import types

import numba

# Fast-math flags that let LLVM reassociate and vectorise reductions and contract a*b+c into FMAs,
# but not nnan/ninf: kernels must keep IEEE NaN/Inf behaviour, and not afn: libm accuracy stays.
FASTMATH = frozenset({"nsz", "arcp", "contract", "reassoc"})


def jit(fn=None, *, parallel=False, fastmath=True, inline="never"):
    """``numba.njit`` with the project's options: on-disk cache, no GIL, safe fast-math."""
    options = dict(cache=True, nogil=True, parallel=parallel, fastmath=set(FASTMATH) if fastmath else False,
                   inline=inline)
    if inline == "always":  # an inlined helper is compiled into its callers; nothing to cache
        options.pop("cache")
    decorator = numba.njit(**options)
    return decorator if fn is None else decorator(fn)


def serial(kernel):
    """``kernel`` (a ``parallel=True`` dispatcher) compiled again without threads, under its own name (its
    own cache file: Numba's cache key ignores compile options): the same code, ``prange`` running as
    ``range``, so the same results, at about half the compile time. For inputs below the kernel's
    parallel threshold, where it runs serially anyway."""
    fn = kernel.py_func
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    twin.__qualname__, twin.__doc__ = fn.__qualname__ + "_serial", fn.__doc__
    options = {name: value for name, value in kernel.targetoptions.items() if name != "nopython"}
    return numba.njit(**{**options, "parallel": False}, cache=True)(twin)
