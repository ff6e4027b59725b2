"""Argument validation shared by every public kernel.

Everything here runs before a kernel touches memory, works on NumPy and device arrays alike (it reads
only ``shape``, ``dtype``, ``strides`` and flags), and raises ``TypeError``/``ValueError`` messages that
name the argument, what was seen and what was expected.
"""

import math
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _is_array(x):
    return hasattr(x, "shape") and hasattr(x, "dtype")


def float_array(name, x, ndim=None):
    """Check that ``x`` is a float32/float64 array (of rank ``ndim`` when given)."""
    if not _is_array(x):
        raise TypeError(f"{name} must be a NumPy or CUDA array, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if ndim is not None and len(x.shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)} ({len(x.shape)}-D)")
    return x


def same_dtype(**arrays):
    """Check that all given arrays share one dtype; returns it."""
    first = dtype = None
    for name, a in arrays.items():
        if a is None:
            continue
        if first is None:
            first, dtype = name, a.dtype
        elif a.dtype != dtype:
            seen = ", ".join(f"{n}: {a.dtype}" for n, a in arrays.items() if a is not None)
            raise TypeError(f"{name} must have the same dtype as {first} ({dtype}); got {seen}")
    return np.dtype(dtype)


def shape(name, x, expected, because=""):
    """Check ``x.shape == expected``."""
    if tuple(x.shape) != tuple(expected):
        why = f" ({because})" if because else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{why}, got {tuple(x.shape)}")


def _writeable(x):
    flags = getattr(x, "flags", None)
    return flags is None or not hasattr(flags, "writeable") or flags.writeable


def _c_contiguous(x):
    flags = getattr(x, "flags", None)
    if flags is None:  # Numba (simulator) device arrays expose is_c_contiguous()
        return x.is_c_contiguous()
    return bool(flags["C_CONTIGUOUS"])  # NumPy and CuPy flag objects and Numba's flags dict all index so


def inplace(name, x):
    """A buffer a kernel writes into: writeable and C-contiguous."""
    if not _writeable(x):
        raise ValueError(f"{name} is read-only; it must be a writeable array")
    if not _c_contiguous(x):
        raise ValueError(f"{name} must be C-contiguous to be written in place, got strides {x.strides}")
    return x


def flag(name, value):
    """A boolean option: True/False or a NumPy bool (a truthy string such as "no" is refused)."""
    if value is True or value is False:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _host(x):
    """The NumPy array holding x's data: x itself, or the array behind a CUDA simulator device array."""
    if isinstance(x, np.ndarray):
        return x
    ary = getattr(x, "_ary", None)
    return ary if isinstance(ary, np.ndarray) else None


def _owner(x):
    """The NumPy array that allocated x's memory; None for device arrays and foreign buffers."""
    if type(x) is not np.ndarray:
        return None
    while x.base is not None:
        if type(x.base) is not np.ndarray:
            return None
        x = x.base
    return x if x.flags.owndata else None


def _layout(x):
    """(data address, shape, byte strides, itemsize), from NumPy's or CUDA's array interface."""
    host = _host(x)
    if host is not None:
        return host.__array_interface__["data"][0], host.shape, host.strides, host.itemsize
    cai = x.__cuda_array_interface__
    shape, itemsize = tuple(cai["shape"]), np.dtype(cai["typestr"]).itemsize
    # the array's own strides first: numba-cuda's interface calls a broadcast (stride 0) array C-contiguous
    strides = getattr(x, "strides", None) or cai.get("strides")
    if strides is None:  # C-contiguous
        strides, step = [], itemsize
        for n in reversed(shape):
            strides.insert(0, step)
            step *= n
    return cai["data"][0], shape, tuple(strides), itemsize


def _span(layout):
    """The byte range [lo, hi) an array's elements occupy (empty for an empty array)."""
    lo, shape, strides, itemsize = layout
    if 0 in shape:
        return lo, lo
    hi = lo + itemsize
    for n, stride in zip(shape, strides):
        if stride < 0:
            lo += (n - 1) * stride
        else:
            hi += (n - 1) * stride
    return lo, hi


def _shared(a, b):
    """None when a and b share no memory; "same" when they are the same elements in the same layout;
    else "partial". Reads only data addresses, shapes and strides: works on device arrays, copies nothing
    (device arrays whose byte ranges interleave without touching count as overlapping)."""
    ha, hb = _host(a), _host(b)
    if ha is not None and hb is not None:
        if not np.may_share_memory(ha, hb):
            return None  # byte ranges apart
        try:
            if not np.shares_memory(ha, hb, max_work=10_000):
                return None  # interleaved views, e.g. x[::2] and x[1::2]
        except _TooHardError:
            pass
    elif ha is not None or hb is not None:
        return None  # host and device memory (select() refuses such a mix anyway)
    la, lb = _layout(a), _layout(b)
    (a_lo, a_hi), (b_lo, b_hi) = _span(la), _span(lb)
    if a_lo >= b_hi or b_lo >= a_hi:
        return None
    return "same" if la == lb else "partial"


_TooHardError = getattr(np, "exceptions", np).TooHardError


def no_overlap(name, buf, same_ok=False, **others):
    """``buf`` (a buffer a kernel writes) shares no memory with any of ``others``; with ``same_ok`` it may
    also be exactly one of them (element for element: an elementwise kernel reads each element before it
    writes it, so that is a correct in-place call)."""
    _check_pairs([(name, buf)], others.items(), same_ok)


def disjoint(**buffers):
    """No two of ``buffers`` (a step's parameter, gradient and state, None entries skipped) share memory."""
    items = [(n, a) for n, a in buffers.items() if a is not None]
    owners = [id(_owner(a)) for _, a in items]
    if id(None) in owners or len(set(owners)) < len(owners):  # else: all allocated separately by NumPy
        for i, item in enumerate(items[:-1]):
            _check_pairs([item], items[i + 1:], why="an optimizer step writes param and its state and reads grad")


def _check_pairs(written, read, same_ok=False, why=None):
    """Each (name, array) of ``written`` against each different one of ``read``. Runs on every call:
    arrays that NumPy allocated separately (the common case) are told apart by their owners alone; a pair
    with an unknown owner (device arrays, ``as_strided`` views, foreign buffers) gets the exact test."""
    read = [(n, a, _owner(a)) for n, a in read if a is not None]
    for name, buf in written:
        owner = _owner(buf)
        for n, a, a_owner in read:
            if a is buf and same_ok or owner is not None and a_owner is not None and a_owner is not owner:
                continue
            shared = _shared(buf, a)
            if shared is None or shared == "same" and same_ok:
                continue
            how = "exactly the same memory as" if shared == "same" else "memory overlapping"
            rule = f"be exactly {n} (in place) or share no memory with it" if same_ok else f"not share memory with {n}"
            why = why or f"the kernel reads {n} while it writes {name}"
            raise ValueError(f"{name} must {rule}, got {how} {n} ({why}); pass a separate buffer")


def out(out_arr, shape_, dtype, backend, like, *, reads, same_ok=False, name="out"):
    """Validate a user ``out=`` buffer, or allocate one on ``like``'s device when it is None.

    ``reads`` (name -> array) are the inputs the kernel reads: a user buffer must not share memory with
    them (``same_ok``: except by being exactly one of them, for elementwise kernels).
    """
    if out_arr is None:
        return backend.empty(shape_, dtype, like)
    if type(out_arr) is np.ndarray:  # the common case, checked in ~1 us (the general path reads flags by name)
        flags = out_arr.flags
        if out_arr.dtype == dtype and out_arr.shape == tuple(shape_) and flags.writeable and flags.c_contiguous:
            no_overlap(name, out_arr, same_ok, **reads)
            return out_arr
    if not _is_array(out_arr):
        raise TypeError(f"{name} must be an array, got {type(out_arr).__name__}")
    if np.dtype(out_arr.dtype) != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {out_arr.dtype}")
    shape(name, out_arr, shape_)
    inplace(name, out_arr)
    no_overlap(name, out_arr, same_ok, **reads)
    return out_arr


def labels(name, y, n, n_classes):
    """Integer class ids of shape (n,), each in [0, n_classes)."""
    if not _is_array(y):
        raise TypeError(f"{name} must be an integer array, got {type(y).__name__}")
    if np.dtype(y.dtype).kind not in "iu":
        raise TypeError(f"{name} must hold integer class ids, got dtype {y.dtype}")
    shape(name, y, (n,), "one class id per row")
    if isinstance(y, np.ndarray) and y.size:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_classes:
            raise ValueError(f"{name} must be in [0, {n_classes}) for {n_classes} classes, got values in [{lo}, {hi}]")
    return y


def sign_targets(name, t):
    """Hinge targets: every value -1 or +1."""
    if isinstance(t, np.ndarray) and t.size and not np.all((t == 1) | (t == -1)):
        bad = t[(t != 1) & (t != -1)].flat[0]
        raise ValueError(f"{name} must hold only -1 and +1, found {bad}")
    return t


def scalar(name, value, *, low=None, high=None, low_open=False, high_open=False):
    """A finite real hyperparameter within [low, high] (bounds made open by the flags)."""
    if type(value) is float and low is None and high is None and math.isfinite(value):
        return value  # the common case, first: this runs on every kernel call
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"{name} must be a finite number in {lo}, {hi}, got {value!r}")
    return value


def count(name, value, minimum, none=False):
    """A count of epochs, steps, rows...: an integer (not a bool) of at least ``minimum``, or None when
    ``none`` allows it; 1.5 or True is refused, not truncated."""
    if value is None and none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be a {'non-negative' if minimum == 0 else 'positive'} integer"
                         f"{' or None' if none else ''}, got {value!r}")
    return int(value)


def step(value):
    """Optimizer step counter: an integer >= 1 (step counts from 1, as in torch.optim)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"step must be an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"step must be >= 1 (it counts from 1), got {value}")
    return int(value)


def seed(value):
    """Dropout seed: an integer in [0, 2**64)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {type(value).__name__}")
    if not 0 <= value < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {value}")
    return int(value)
