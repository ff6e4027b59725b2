"""The one dispatch point: which backend runs a call.

A backend is a module (``kernels.reference``, ``kernels.cpu``, ``kernels.cuda``) exporting every kernel of
the contract under the same name, plus ``empty(shape, dtype, like)`` and ``ascontiguous(x)``. It is
chosen by the arrays of a call: CUDA arrays (anything with ``__cuda_array_interface__``, CuPy or Numba
device arrays) go to ``cuda``, NumPy arrays to the default CPU backend (``numba`` unless the environment
variable ``KERNELS_BACKEND`` or :func:`set_backend` says otherwise). :func:`use_backend` overrides it for
a block. Backends are imported on first use, so ``import kernels`` compiles nothing.
"""

import contextlib
import importlib
import os
import threading

import numpy as np

_MODULES = {"numpy": "kernels.reference", "numba": "kernels.cpu", "cuda": "kernels.cuda"}
_HOST_BACKENDS = ("numpy", "numba")

_default = os.environ.get("KERNELS_BACKEND", "numba")
if _default not in _MODULES:
    raise ValueError(f"KERNELS_BACKEND must be one of {sorted(_MODULES)}, got {_default!r}")
_local = threading.local()  # per-thread override set by use_backend()


def _check_name(name):
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {sorted(_MODULES)}, got {name!r}")
    return name


def set_backend(name):
    """Set the process-wide default backend: ``"numpy"``, ``"numba"`` or ``"cuda"``."""
    global _default
    _default = _check_name(name)


def get_backend():
    """The backend name calls on host arrays use right now (the override, else the default)."""
    return getattr(_local, "name", None) or _default


@contextlib.contextmanager
def use_backend(name):
    """Run the block with ``name`` as the backend (this thread only); restores the previous one."""
    previous = getattr(_local, "name", None)
    _local.name = _check_name(name)
    try:
        yield
    finally:
        _local.name = previous


def is_device_array(x):
    """True for CUDA arrays: CuPy, Numba device arrays, and the CUDA simulator's fake device arrays."""
    return hasattr(x, "__cuda_array_interface__") or type(x).__name__ == "FakeCUDAArray"


_loaded = {}  # name -> backend module, once imported


def module(name):
    """The backend module for ``name``, imported on first use."""
    backend = _loaded.get(name)
    if backend is None:
        backend = _loaded[name] = importlib.import_module(_MODULES[_check_name(name)])
    return backend


def select(**arrays):
    """The backend module for a call whose array arguments are ``arrays`` (None entries are ignored).

    Mixing host and device arrays is an error naming both, never a hidden copy. Runs on every kernel
    call, so it is one pass over the arguments with plain NumPy arrays recognised by their type first.
    """
    device = host = None
    for n, a in arrays.items():
        if a is None:
            continue
        if type(a) is not np.ndarray and is_device_array(a):
            device = device or n
        else:
            host = host or n
    if device and host:
        raise TypeError(
            f"{device} is a CUDA device array but {host} is a host (NumPy) array; "
            "pass both on the same device (copy explicitly, e.g. cupy.asarray or .get())"
        )
    override = getattr(_local, "name", None)
    name = override or _default
    if device:
        if name in _HOST_BACKENDS and override:
            raise TypeError(f"backend {name!r} runs on host arrays, but {device} is a CUDA device array")
        return module("cuda")
    if name == "cuda":
        raise TypeError(
            f"backend 'cuda' needs CUDA device arrays (CuPy or Numba), but {host or 'the input'} "
            "is a NumPy array; move it to the device explicitly"
        )
    return module(name)
