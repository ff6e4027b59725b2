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


def test_warmup_compiles_what_real_calls_need():
    """After warmup, calls at parallel sizes (every kernel's large-array path) compile nothing new."""
    code = """
import importlib, numba, numpy as np, kernels
modules = [importlib.import_module("kernels.cpu." + m) for m in ("activations", "dropout", "losses", "matmul", "optim")]

def compiled():
    return {(m.__name__, k): len(v.signatures) for m in modules
            for k, v in vars(m).items() if isinstance(v, numba.core.registry.CPUDispatcher)}

kernels.warmup("numba", dtypes=("float32",))
before = compiled()
n = 1 << 18
x = np.linspace(-3, 3, n, dtype=np.float32)
p, g, s1, s2 = (np.linspace(0, 1, n, dtype=np.float32) for _ in range(4))
big = x.reshape(512, 512)
kernels.matmul(big, big, bias=x[:512], activation="relu")
for f in (kernels.relu, kernels.leaky_relu, kernels.sigmoid, kernels.tanh):
    f(x)
for f in (kernels.relu_backward, kernels.leaky_relu_backward, kernels.sigmoid_backward, kernels.tanh_backward):
    f(x, x)
kernels.softmax_backward(kernels.softmax(big), big)
kernels.softmax_cross_entropy(big, np.arange(512))
kernels.mse(x, x), kernels.binary_cross_entropy(x, x), kernels.hinge(x, np.sign(x) + (x == 0)), kernels.bias_grad(big)
kernels.dropout(x, 0.5, 1)
kernels.sgd_step(p, g, lr=0.1, momentum=0.9, velocity=s1, step=1)
kernels.adam_step(p, g, s1, s2, step=1)
kernels.rmsprop_step(p, g, s1, momentum=0.9, momentum_buffer=s2)
kernels.adagrad_step(p, g, s1)
kernels.adadelta_step(p, g, s1, s2)
after = compiled()
print([k for k in after if after[k] != before[k]])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"compiled on first real call after warmup: {proc.stdout}"


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_out_overlapping_an_input_is_refused(backend_name):
    """The aliasing calls that gave silent wrong answers now raise, on every host backend."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    y = np.arange(4) % 6
    flat = x.reshape(-1)
    cases = [
        (lambda: kernels.softmax_cross_entropy(x, y, out=x), "out must not share memory with logits"),
        (lambda: kernels.bias_grad(x, out=x[0]), "out must not share memory with dy"),
        (lambda: kernels.softmax(x[:3], out=x[1:]), "out must not share memory with x, got memory overlapping"),
        (lambda: kernels.softmax(x, out=x), "out must not share memory with x, got exactly the same"),
        (lambda: kernels.softmax_backward(x, x.copy(), out=x), "out must not share memory with y"),
        (lambda: kernels.matmul(x, np.eye(6, dtype=np.float32), out=x), "out must not share memory with a"),
        (lambda: kernels.matmul(x[:2, :2].copy(), x[:2, :2].copy(), bias=flat[2:4], out=flat[:4].reshape(2, 2)),
         "out must not share memory with bias"),
        (lambda: kernels.relu(x[:, ::-1], out=x), "out must be exactly x .in place. or share no memory"),
        (lambda: kernels.mse(x[1:], x[:3].copy(), out=x[:3]), "out must be exactly pred"),
        (lambda: kernels.tanh_backward(x[1:], x[1:].copy(), out=x[:3]), "out must be exactly y"),
    ]
    with kernels.use_backend(backend_name):
        for call, msg in cases:
            before = x.copy()
            with pytest.raises(ValueError, match=msg):
                call()
            np.testing.assert_array_equal(x, before)  # refused before anything was written


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_adjacent_disjoint_views_of_one_buffer_are_accepted(backend_name):
    """An output right after its input in the same buffer, sharing no element with it: computed as usual."""
    values = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    with kernels.use_backend(backend_name):
        buf = values.copy()
        out = buf[2:]
        assert kernels.relu(buf[:2], out=out) is out
        np.testing.assert_array_equal(buf, np.concatenate([values[:2], np.maximum(values[:2], 0)]))
        buf = values.copy()
        kernels.softmax(buf[2:], out=buf[:2])
        e = np.exp(values[2:] - values[2:].max(axis=1, keepdims=True))
        np.testing.assert_allclose(buf, np.concatenate([e / e.sum(axis=1, keepdims=True), values[2:]]), rtol=1e-6)
        flat = values.reshape(-1).copy()
        loss, grad = kernels.mse(flat[:8], flat[8:16], out=flat[16:])
        np.testing.assert_allclose(loss, np.mean((values.flat[:8] - values.flat[8:16]) ** 2), rtol=1e-6)
        np.testing.assert_allclose(grad, (values.flat[:8] - values.flat[8:16]) / 4, rtol=1e-6)
        np.testing.assert_array_equal(flat[:16], values.reshape(-1)[:16])


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_optimizer_buffers_must_not_alias(backend_name):
    p, g, m, v = (np.zeros(8, np.float32) for _ in range(4))
    with kernels.use_backend(backend_name):
        with pytest.raises(ValueError, match="m must not share memory with v"):
            kernels.adam_step(p, g, m, m, step=1)
        with pytest.raises(ValueError, match="param must not share memory with m"):
            kernels.adam_step(p, g, p, v, step=1)
        with pytest.raises(ValueError, match="param must not share memory with grad"):
            kernels.sgd_step(p, p[::-1], lr=0.1)
        with pytest.raises(ValueError, match="square_avg must not share memory with acc_delta"):
            kernels.adadelta_step(p, g, m, m)
        with pytest.raises(ValueError, match="grad must not share memory with sum_sq"):
            kernels.adagrad_step(p, g, g)
        with pytest.raises(ValueError, match="square_avg must not share memory with momentum_buffer"):
            kernels.rmsprop_step(p, g, m, momentum=0.9, momentum_buffer=m)
        both = np.zeros(16, np.float32)
        kernels.sgd_step(both[:8], both[8:][::-1], lr=0.1)  # adjacent but disjoint views are fine
        kernels.adagrad_step(both[:8], g, both[8:])


class _Subclass(np.ndarray):
    """An ndarray subclass: the overlap check does not name the owner of its memory."""


def _unowned_views(x):
    """Views of ``x``'s memory whose owner the overlap check cannot name (their base is not a NumPy array, or
    they are not plain ndarrays): only the exact memory test tells them apart."""
    return {"as_strided": np.lib.stride_tricks.as_strided(x, x.shape, x.strides),
            "sliding_window_view": np.lib.stride_tricks.sliding_window_view(x, (1,) * x.ndim)[(...,) + (0,) * x.ndim],
            "frombuffer": np.frombuffer(memoryview(x), x.dtype).reshape(x.shape),
            "subclass": x.view(_Subclass)}


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_overlap_is_found_through_views_numpy_does_not_own(backend_name):
    """An input or state buffer that is a view of the written buffer NumPy cannot trace to its owner is
    compared by memory, not skipped (accepted, matmul returned relative errors of 59 and sgd_step wrong
    params); an unowned view of other memory is accepted."""
    rng = np.random.default_rng(5)
    x, b = rng.standard_normal((6, 6)).astype(np.float32), rng.standard_normal((6, 6)).astype(np.float32)
    labels = np.arange(6) % 6
    p, g = np.ones(8, np.float32), np.full(8, 0.5, np.float32)
    with kernels.use_backend(backend_name):
        for kind, view in _unowned_views(x).items():
            cases = [(lambda: kernels.matmul(view, b, out=x), "out must not share memory with a"),
                     (lambda: kernels.softmax_cross_entropy(view, labels, out=x), "out must not share memory with")]
            if view.flags.writeable:
                cases.append((lambda: kernels.matmul(b, x, out=view), "out must not share memory with b"))
            for call, msg in cases:
                before = x.copy()
                with pytest.raises(ValueError, match=msg):
                    call()
                np.testing.assert_array_equal(x, before, err_msg=kind)
        for kind, view in _unowned_views(p).items():
            if view.flags.writeable:
                with pytest.raises(ValueError, match="^param must not share memory with velocity"):
                    kernels.sgd_step(p, g, lr=0.1, momentum=0.9, velocity=view, step=1)
            with pytest.raises(ValueError, match="^param must not share memory with grad"):
                kernels.sgd_step(p, view, lr=0.1)
            np.testing.assert_array_equal(p, 1, err_msg=kind)
        other = _unowned_views(b.copy())["as_strided"]
        np.testing.assert_allclose(kernels.matmul(other, b, out=x), b @ b, rtol=1e-5, atol=1e-5)


def test_overlap_check_reads_cuda_array_interfaces():
    """Device arrays are compared by data pointer and extent, without copying them to the host."""
    from kernels import _checks

    class Device:
        def __init__(self, ptr, shape, strides=None, dtype=np.float32):
            self.shape, self.dtype = shape, np.dtype(dtype)
            self.__cuda_array_interface__ = {"data": (ptr, False), "shape": shape, "strides": strides,
                                             "typestr": self.dtype.str, "version": 3}

    base = 1 << 20
    whole = Device(base, (4, 6))
    assert _checks._shared(whole, Device(base, (4, 6))) == "same"
    assert _checks._shared(whole, Device(base + 4 * 6, (6,))) == "partial"  # row 1
    assert _checks._shared(whole, Device(base + 4 * 24, (6,))) is None  # just past the end
    assert _checks._shared(whole, Device(base + 4 * 23, (4,), (-4,))) == "partial"  # reversed, ends inside
    assert _checks._shared(whole, Device(base, (0, 6))) is None  # empty
    assert _checks._shared(whole, np.zeros((4, 6), np.float32)) is None  # host memory is elsewhere
    # numba-cuda's interface gives a broadcast array (x[0] repeated, 24 bytes) no strides, i.e. C-contiguous
    # (96 bytes, reaching into whole); its own strides are read first (a false overlap, seen on an H200)
    broadcast = Device(base - 48, (4, 6))
    broadcast.strides = (0, 4)
    assert _checks._shared(whole, broadcast) is None
    with pytest.raises(ValueError, match="m must not share memory with v"):
        _checks.disjoint(param=whole, grad=Device(base + 4096, (4, 6)), m=Device(base + 8192, (24,)),
                         v=Device(base + 8192 + 92, (6,)))


@pytest.mark.parametrize("bad", ["no", 1, 0, None, np.int64(1), 1.0])
def test_flags_accept_only_booleans(bad):
    x = np.ones((3, 3), np.float32)
    with pytest.raises(TypeError, match="trans_a must be a bool"):
        kernels.matmul(x, x, trans_a=bad)
    with pytest.raises(TypeError, match="trans_b must be a bool"):
        kernels.matmul(x, x, trans_b=bad)
    p, g, m, v = (np.zeros(4, np.float32) for _ in range(4))
    with pytest.raises(TypeError, match="decoupled must be a bool"):
        kernels.adam_step(p, g, m, v, step=1, decoupled=bad)
    with pytest.raises(TypeError, match="nesterov must be a bool"):
        kernels.sgd_step(p, g, lr=0.1, momentum=0.9, velocity=m, nesterov=bad)
    np.testing.assert_allclose(kernels.matmul(x, x, trans_a=np.True_, trans_b=np.bool_(False)), x @ x)
