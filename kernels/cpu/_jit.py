"""Numba compile options shared by the CPU kernels."""

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
