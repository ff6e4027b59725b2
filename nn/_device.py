"""The one place that picks where nn's arrays live, and how nn allocates them and copies them.

Parameters, gradients, optimizer state and batches live where the kernels run: NumPy arrays for the
``numpy`` and ``numba`` backends; for ``cuda``, CuPy arrays where CuPy can run (installed, a GPU, not the
CUDA simulator), else Numba device arrays (so nn trains under the Numba CUDA simulator without CuPy).
nn's glue reaches them through an array namespace ``xp`` with the few functions it needs (``empty``,
``zeros``, ``ones``, ``zeros_like``, ``asarray`` and ``array`` from host data, ``copyto``, ``multiply``):
NumPy, CuPy, or :class:`NumbaArrays`, built on the cuda kernels backend's ``empty``/``zeros``/``to_device``/
``scale``. Every device-to-host copy nn makes goes through :func:`to_host`, i.e. the backend's ``to_host``.
"""

import numpy as np

import kernels
from kernels import _dispatch


class NumbaArrays:
    """The array namespace for Numba device arrays: allocation and host-to-device copies through the
    cuda kernels backend."""

    @staticmethod
    def _cuda():
        return _dispatch.module("cuda")

    def empty(self, shape, dtype):
        return self._cuda().empty(shape, dtype, None)

    def zeros(self, shape, dtype):
        return self._cuda().zeros(shape, dtype, None)

    def ones(self, shape, dtype):
        return self.asarray(np.ones(shape, dtype))

    def zeros_like(self, a):
        return self.zeros(a.shape, a.dtype)

    def asarray(self, a, dtype=None):
        """``a`` on the device (a device array of that dtype is returned as it is)."""
        if kernels.is_device_array(a) and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        return self.array(a, dtype)

    def array(self, a, dtype=None):
        """A new device array with ``a``'s values (host data, or a device array copied on the device)."""
        if kernels.is_device_array(a):
            if dtype is not None and np.dtype(dtype) != a.dtype:
                raise TypeError(f"cannot convert a device array from {a.dtype} to {np.dtype(dtype)} on the device")
            out = self.empty(a.shape, a.dtype)
            out.copy_to_device(a)
            return out
        return self._cuda().to_device(np.asarray(a, dtype), None)

    @staticmethod
    def copyto(dst, src):
        """``dst[...] = src``, which a Numba device array refuses on a GPU (no ``...`` index; the simulator
        takes it): ``src`` a device array of dst's shape and dtype, or host data (a scalar too) broadcast to
        dst's shape and cast on the host. A synchronous copy: for setting weights and state, not per step."""
        if not kernels.is_device_array(src):
            src = np.ascontiguousarray(np.broadcast_to(np.asarray(src, dst.dtype), dst.shape))
        dst.copy_to_device(src)

    def multiply(self, a, factor, out):
        """``out = a * factor`` on the device (an asynchronous launch): ``a`` a device array of out's size,
        ``factor`` a host number. The one product nn's glue makes (a rank's weighted loss)."""
        self._cuda().scale(a, factor, out)

    def __repr__(self):
        return "NumbaArrays()"


NUMBA_ARRAYS = NumbaArrays()


def _cupy():
    """The CuPy module when nn's cuda arrays should be CuPy's, else None."""
    from numba.core import config

    if config.ENABLE_CUDASIM:
        return None
    try:
        import cupy
    except ImportError:
        return None
    return cupy if cupy.cuda.is_available() else None


def namespace(backend=None):
    """The array namespace for ``backend`` (default: the kernels' current backend)."""
    backend = backend or kernels.get_backend()
    if backend != "cuda":
        return np
    return _cupy() or NUMBA_ARRAYS


def namespace_of(a):
    """The array namespace an existing array belongs to."""
    if not kernels.is_device_array(a):
        return np
    return _cupy() if type(a).__module__.startswith("cupy") else NUMBA_ARRAYS


def to_host(a):
    """A NumPy array with the values of ``a``: for a device array, the backend's device-to-host copy (a
    synchronisation); a host array is returned as it is."""
    return _dispatch.module("cuda").to_host(a) if kernels.is_device_array(a) else np.asarray(a)
