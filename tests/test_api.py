"""Backend selection, dispatch and the argument checks every public kernel shares."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import kernels


class FakeDeviceArray:
    """Looks like a CUDA array to the dispatcher (it has ``__cuda_array_interface__``)."""

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.__cuda_array_interface__ = {"shape": shape, "typestr": self.dtype.str, "version": 3}


def test_import_compiles_nothing():
    code = "import sys, kernels; print('numba' in sys.modules, 'numba.cuda' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_default_backend_is_numba_and_env_overrides():
    code = "import kernels; print(kernels.get_backend())"
    env = {k: v for k, v in os.environ.items() if k != "KERNELS_BACKEND"}

    def run(**extra):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, **extra})

    assert run().stdout.strip() == "numba"
    assert run(KERNELS_BACKEND="numpy").stdout.strip() == "numpy"
    bad = run(KERNELS_BACKEND="fortran")
    assert bad.returncode != 0 and "KERNELS_BACKEND must be one of" in bad.stderr


def test_set_backend_and_use_backend_nest_and_restore():
    before = kernels.get_backend()
    try:
        kernels.set_backend("numpy")
        assert kernels.get_backend() == "numpy"
        with kernels.use_backend("numba"):
            assert kernels.get_backend() == "numba"
            with kernels.use_backend("numpy"):
                assert kernels.get_backend() == "numpy"
            assert kernels.get_backend() == "numba"
        assert kernels.get_backend() == "numpy"
    finally:
        kernels.set_backend(before)


def test_use_backend_restores_after_an_exception():
    before = kernels.get_backend()
    with pytest.raises(RuntimeError), kernels.use_backend("numpy" if before != "numpy" else "numba"):
        raise RuntimeError
    assert kernels.get_backend() == before


def test_use_backend_is_per_thread():
    seen = {}
    with kernels.use_backend("numpy"):
        t = threading.Thread(target=lambda: seen.setdefault("other", kernels.get_backend()))
        t.start()
        t.join()
        assert kernels.get_backend() == "numpy"
    assert seen["other"] == kernels.get_backend()


@pytest.mark.parametrize("name", ["torch", "", None, "NUMPY"])
def test_unknown_backend_names_are_rejected(name):
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.set_backend(name)
    with pytest.raises(ValueError, match="backend must be one of"):
        with kernels.use_backend(name):
            pass


def test_reference_and_numba_backends_agree_through_the_same_call():
    x = np.linspace(-3, 3, 101, dtype=np.float32)
    with kernels.use_backend("numpy"):
        ref = kernels.sigmoid(x)
    with kernels.use_backend("numba"):
        fast = kernels.sigmoid(x)
    np.testing.assert_allclose(fast, ref, rtol=2e-6)


def test_mixing_host_and_device_arrays_names_both():
    host = np.ones((2, 3), np.float32)
    device = FakeDeviceArray((3, 4))
    with pytest.raises(TypeError, match=r"b is a CUDA device array but a is a host"):
        kernels.matmul(host, device)


def test_cuda_backend_refuses_host_arrays_instead_of_copying():
    with kernels.use_backend("cuda"), pytest.raises(TypeError, match="needs CUDA device arrays.*x is a NumPy"):
        kernels.relu(np.ones(3, np.float32))


def test_host_backend_override_refuses_device_arrays():
    with kernels.use_backend("numba"), pytest.raises(TypeError, match="runs on host arrays.*x is a CUDA"):
        kernels.relu(FakeDeviceArray((3,)))


@pytest.mark.parametrize("bad, exc, msg", [
    ([1.0, 2.0], TypeError, "x must be a NumPy or CUDA array, got list"),
    (np.arange(3), TypeError, "x must have dtype float32 or float64, got int64"),
    (np.ones(3, np.float16), TypeError, "x must have dtype float32 or float64, got float16"),
])
def test_inputs_must_be_float32_or_float64_arrays(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        kernels.relu(bad)


def test_float32_is_never_promoted():
    for fn in (kernels.relu, kernels.sigmoid, kernels.tanh, kernels.leaky_relu):
        assert fn(np.ones(5, np.float32)).dtype == np.float32
    loss, grad = kernels.mse(np.ones(4, np.float32), np.zeros(4, np.float32))
    assert loss.dtype == np.float32 and grad.dtype == np.float32


def test_out_is_checked_before_writing():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"out must have shape \(2, 3\), got \(3, 2\)"):
        kernels.relu(x, out=np.empty((3, 2), np.float32))
    with pytest.raises(TypeError, match="out must have dtype float32, got float64"):
        kernels.relu(x, out=np.empty((2, 3)))
    ro = np.empty((2, 3), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        kernels.relu(x, out=ro)
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        kernels.relu(x, out=np.empty((3, 2), np.float32).T)


def test_out_is_filled_and_returned():
    x = np.array([-1.0, 2.0], np.float32)
    out = np.full(2, 7, np.float32)
    assert kernels.relu(x, out=out) is out
    np.testing.assert_array_equal(out, [0, 2])


def test_in_place_elementwise_is_allowed():
    x = np.array([-1.0, 2.0, -3.0])
    kernels.relu(x, out=x)
    np.testing.assert_array_equal(x, [0, 2, 0])


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(lr=float("nan")), ValueError, r"lr must be a finite number in \[0, inf\), got nan"),
    (dict(lr=-1.0), ValueError, "lr must be a finite number"),
    (dict(lr=True), TypeError, "lr must be a real number, got bool"),
    (dict(lr="0.1"), TypeError, "lr must be a real number, got str"),
    (dict(lr=0.1, momentum=0.9), ValueError, "velocity must be given"),
    (dict(lr=0.1, nesterov=True), ValueError, "nesterov=True needs momentum > 0"),
    (dict(lr=0.1, step=0), ValueError, "step must be >= 1"),
    (dict(lr=0.1, step=1.5), TypeError, "step must be an integer"),
])
def test_hyperparameters_are_validated(kwargs, exc, msg):
    p, g = np.zeros(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(exc, match=msg):
        kernels.sgd_step(p, g, **kwargs)


def test_warmup_runs_every_kernel_on_both_dtypes():
    assert kernels.warmup("numpy") == "numpy"
    assert kernels.warmup("numba", dtypes=("float32",)) == "numba"
