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


def out(out_arr, shape_, dtype, backend, like, name="out"):
    """Validate a user ``out=`` buffer, or allocate one on ``like``'s device when it is None."""
    if out_arr is None:
        return backend.empty(shape_, dtype, like)
    if not _is_array(out_arr):
        raise TypeError(f"{name} must be an array, got {type(out_arr).__name__}")
    if np.dtype(out_arr.dtype) != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {out_arr.dtype}")
    shape(name, out_arr, shape_)
    return inplace(name, out_arr)


def no_overlap(name, out_arr, **inputs):
    """``out`` must not share memory with an input the kernel still reads after writing ``out``."""
    if not isinstance(out_arr, np.ndarray):
        return
    for n, a in inputs.items():
        if isinstance(a, np.ndarray) and np.may_share_memory(out_arr, a):
            raise ValueError(f"{name} must not overlap {n}: the kernel reads {n} while it writes {name}")


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
