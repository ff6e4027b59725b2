"""Test configuration: the backend fixture, and the CUDA simulator when no GPU is present.

The simulator must be switched on before numba.cuda is first imported, so it is decided here, at
collection, from whether an NVIDIA device node exists. Nothing in ``import kernels`` imports numba.cuda.
"""

import importlib
import os

if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    # pytest has already imported numba (setup.cfg's filterwarnings names a numba warning class), so
    # numba's configuration, which numba-cuda shares, was read before the line above: read it again.
    import numba.core.config

    numba.core.config.reload_config()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import kernels  # noqa: E402

# Numba compiles on first call: no per-example deadline. The backend fixture is entered once per test
# and stays active for all of hypothesis's examples, which is what we want.
settings.register_profile("default", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("default"), max_examples=25, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def _cuda_available():
    try:
        from numba import cuda
        importlib.import_module("kernels.cuda")
    except ImportError:
        return False
    return cuda.is_available()


class Backend:
    """One backend under test: moves host arrays to it (``to``) and results back (``get``)."""

    def __init__(self, name):
        self.name = name
        self.is_cuda = name == "cuda"
        # cuda under the simulator: every GPU thread is a Python thread, so keep such tests' shapes small
        self.simulated = self.is_cuda and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

    def to(self, x):
        """``x`` on the device in the same layout: a non-contiguous host view (transposed, strided, negative or
        zero strides) becomes a device view with the same strides, into a copy of the memory it spans."""
        if not self.is_cuda or x is None:
            return x
        from numba import cuda
        if not isinstance(x, np.ndarray) or x.flags.c_contiguous or x.size == 0:
            return cuda.to_device(np.ascontiguousarray(x))
        # the memory x spans: from its lowest-addressed element (the last index along a negative stride)
        first = x[tuple(slice(n - 1, n) if s < 0 else slice(0, 1) for n, s in zip(x.shape, x.strides))]
        low = sum((n - 1) * s for n, s in zip(x.shape, x.strides) if s < 0)  # first - x[0, ...], in bytes
        span = sum((n - 1) * abs(s) for n, s in zip(x.shape, x.strides)) + x.itemsize
        assert low % x.itemsize == 0 == span % x.itemsize, x.strides
        region = cuda.to_device(np.lib.stride_tricks.as_strided(first, (span // x.itemsize,), (x.itemsize,)).copy())
        if self.simulated:  # the simulator's device array wraps a NumPy array
            return type(region)(np.ndarray(x.shape, x.dtype, region._ary, -low, x.strides))
        return type(region)(x.shape, x.strides, x.dtype, gpu_data=region.gpu_data.view(-low))

    def get(self, x):
        if hasattr(x, "copy_to_host"):  # Numba device array (real or simulated)
            return x.copy_to_host()
        if kernels.is_device_array(x):  # CuPy
            return x.get()
        return np.asarray(x)

    def __repr__(self):
        return self.name


BACKENDS = ["numpy", "numba"] + (["cuda"] if _cuda_available() else [])


def _hold_the_simulator_to_the_gpu():
    """Make the simulator's device arrays refuse, on the host, what a real Numba device array refuses (both
    passed here and failed on an H200): an assignment through a ``...`` index, and a transpose as a view (a
    GPU's ``.T`` is a contiguous copy made by a kernel, and exists for 2-D arrays only)."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    setitem = FakeCUDAArray.__setitem__

    def __setitem__(self, idx, val):
        if idx is Ellipsis or isinstance(idx, tuple) and any(i is Ellipsis for i in idx):
            raise TypeError("a Numba device array takes no ... index on a GPU: use copy_to_device (nn: xp.copyto)")
        return setitem(self, idx, val)

    def transpose(self, axes=None):
        if axes is not None and tuple(axes) == tuple(range(self.ndim)):
            return self
        if self.ndim != 2:
            raise NotImplementedError("transposing a non-2D DeviceNDArray isn't supported")
        return FakeCUDAArray(np.ascontiguousarray(np.transpose(self._ary, axes)), stream=self.stream)

    FakeCUDAArray.__setitem__, FakeCUDAArray.transpose = __setitem__, transpose
    FakeCUDAArray.T = property(transpose)


if "cuda" in BACKENDS and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    _hold_the_simulator_to_the_gpu()


@pytest.fixture(params=[pytest.param(n, marks=[pytest.mark.cuda] if n == "cuda" else []) for n in BACKENDS])
def backend(request):
    """Each test using this runs once per backend that can run here (cuda under the simulator)."""
    with kernels.use_backend(request.param):
        yield Backend(request.param)


@pytest.fixture(params=[pytest.param(n, marks=[pytest.mark.cuda] if n == "cuda" else [])
                        for n in BACKENDS if n != "numpy"])
def fast_backend(request):
    """The compiled backends only: for tests that compare a backend with the reference."""
    with kernels.use_backend(request.param):
        yield Backend(request.param)


@pytest.fixture
def cuda_backend():
    """The cuda backend alone: for the cuda-only tests (tests/test_cuda.py), which move arrays with ``to``."""
    return Backend("cuda")


@pytest.fixture
def nn_backend(backend):
    """The ``backend`` fixture for nn tests. On cuda, nn keeps its arrays in CuPy where CuPy runs, else in
    Numba device arrays, so these tests run under the Numba CUDA simulator too (keep their cuda cases small:
    ``backend.simulated``)."""
    return backend
