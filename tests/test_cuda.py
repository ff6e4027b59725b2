"""The cuda backend's device handling: dispatch by array type, device-side copies of strided views, device
scalars for losses, out-of-range labels, tile and block edges. The kernels' values are checked against the
reference by every family's tests through the ``backend`` fixture; these are the cuda-only behaviours.
Runs under the Numba CUDA simulator when no GPU is present."""

import contextlib
import dataclasses
import io
import os
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kernels
from helpers import DTYPES, TOL, assert_close, reference, with_layout

cuda = pytest.importorskip("numba").cuda
if not cuda.is_available():
    pytest.skip("no CUDA device and the simulator is off", allow_module_level=True)

import kernels.cuda  # noqa: E402
from kernels.cuda._launch import GPU, SIMULATOR, STATS, geometry, use_geometry  # noqa: E402
from kernels.cuda.matmul import tiles_for  # noqa: E402

pytestmark = pytest.mark.cuda
LARGE_TILES, SMALL_TILES = geometry().large_tiles, geometry().small_tiles


def _rand(shape, dtype, seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def _is_numba_device(x):
    return hasattr(x, "copy_to_host") and kernels.is_device_array(x)


def test_device_arrays_dispatch_to_cuda_and_results_stay_on_the_device():
    x = _rand((7, 5), np.float32)
    d = cuda.to_device(x)
    y = kernels.sigmoid(d)  # default backend is numba: the device array alone selects cuda
    assert _is_numba_device(y) and y.shape == x.shape and y.dtype == x.dtype
    assert_close(y.copy_to_host(), reference(kernels.sigmoid, x))
    loss, grad = kernels.mse(d, cuda.to_device(np.zeros_like(x)))
    assert _is_numba_device(loss) and loss.shape == () and _is_numba_device(grad)
    assert_close(loss.copy_to_host(), np.mean(x * x))


def test_mixing_host_and_device_arrays_names_both():
    d = cuda.to_device(np.ones(4, np.float32))
    with pytest.raises(TypeError, match=r"x is a CUDA device array but dy is a host"):
        kernels.relu_backward(d, np.ones(4, np.float32))
    with pytest.raises(TypeError, match=r"param is a CUDA device array but grad is a host"):
        kernels.adagrad_step(d, np.ones(4, np.float32), cuda.to_device(np.zeros(4, np.float32)))


def test_kernels_never_copy_device_data_to_the_host(monkeypatch):
    x = _rand((9, 6), np.float64)
    d, dy = cuda.to_device(x), cuda.to_device(_rand((9, 6), np.float64, seed=1))
    labels = cuda.to_device(np.arange(9) % 6)
    param, grad, m, v = (cuda.to_device(np.abs(_rand(20, np.float64, seed=s))) for s in range(4))

    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel copied device data to the host")

    monkeypatch.setattr(type(d), "copy_to_host", forbidden)
    results = [kernels.matmul(d, d, trans_a=True, bias=cuda.to_device(np.ones(6)), activation="tanh"),
               kernels.softmax(d), kernels.softmax_backward(d, dy), kernels.relu(d[:, ::2]),
               *kernels.softmax_cross_entropy(d, labels), *kernels.binary_cross_entropy(d, dy),
               kernels.bias_grad(d), kernels.dropout(d, 0.5, 3)]
    kernels.adam_step(param, grad, m, v, step=1)
    assert all(kernels.is_device_array(r) for r in results)


@pytest.mark.parametrize("view", ["transposed", "strided", "rank3"])
def test_non_contiguous_device_views_are_copied_on_the_device(cuda_backend, view):
    base = _rand((6, 10, 4), np.float32)
    host = {"transposed": base[0].T, "strided": base[1, ::3, 1:], "rank3": base[:, ::2]}[view]
    dev = cuda_backend.to(host)  # a view with host's strides (on a GPU a device array's .T is a copy)
    assert not dev.is_c_contiguous()
    assert_close(kernels.tanh(dev).copy_to_host(), np.tanh(host))
    assert_close(kernels.relu_backward(dev, dev).copy_to_host(), np.where(host > 0, host, 0))


@pytest.mark.parametrize("layout", ["F", "strided", "negative", "zero"])
def test_every_kernel_family_reads_non_contiguous_device_views(cuda_backend, layout):
    """The tests' ``to`` keeps a host view's layout on the device; each family gets such views (and refuses a
    non-contiguous ``out``, as on the host). Batch normalisation's are in test_batchnorm.py."""
    to = cuda_backend.to
    x, dy = (with_layout(_rand((5, 7), np.float64, seed), layout) for seed in (11, 12))
    y = with_layout(reference(kernels.softmax, x), layout)
    sign = with_layout(np.sign(_rand((5, 7), np.float64, 13)), layout)
    labels, offsets = (with_layout(a, layout) for a in (np.arange(5) * 3 % 7, np.array([0, 3, 3, 11, 20])))
    flat = with_layout(_rand(20, np.float64, 14), layout)  # 1-D: "F" is C-contiguous, the others are not
    assert not to(x).is_c_contiguous()
    for host in (x, labels, offsets):
        dev = to(host)
        assert dev.is_c_contiguous() == host.flags.c_contiguous and dev.strides == host.strides
        # copied on the device first: Numba's copy_to_host assumes the view starts at its lowest address
        np.testing.assert_array_equal(kernels.cuda.ascontiguous(dev).copy_to_host(), host)
    calls = [(kernels.softmax, x), (kernels.softmax_backward, y, dy), (kernels.softmax_cross_entropy, x, labels),
             (kernels.mse, x, dy), (kernels.binary_cross_entropy, x, np.abs(sign)), (kernels.hinge, x, sign),
             (kernels.bias_grad, dy), (kernels.dropout, x, 0.4, 7), (kernels.bias_act_backward, y, dy, "tanh"),
             (kernels.bias_act_backward, x, dy, "leaky_relu"), (kernels.segment_norms, flat, offsets)]
    for fn, *args in calls:
        got = fn(*(to(a) if isinstance(a, np.ndarray) else a for a in args))
        for g, e in zip(*((r if isinstance(r, tuple) else (r,)) for r in (got, reference(fn, *args)))):
            assert_close(g.copy_to_host(), e, err_msg=fn.__name__)
    metrics, expected = to(np.zeros(kernels.metrics_size(0))), np.zeros(kernels.metrics_size(0))
    kernels.count_correct(to(x), to(labels), metrics)
    reference(kernels.count_correct, x, labels, expected)
    np.testing.assert_array_equal(metrics.copy_to_host(), expected)
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        kernels.softmax(to(x), out=to(with_layout(np.zeros((5, 7)), layout)))


@given(m=st.integers(1, 2 * LARGE_TILES[0] + 1), n=st.integers(1, 2 * LARGE_TILES[1] + 1),
       k=st.sampled_from(sorted({0, 1, 2 * SMALL_TILES[2] + 3} | {t[2] + d for t in (LARGE_TILES, SMALL_TILES)
                                                                   for d in (-1, 0, 1)})),
       trans_a=st.booleans(), trans_b=st.booleans(), dtype=DTYPES,
       activation=st.sampled_from([None, "relu", "leaky_relu", "sigmoid", "tanh"]), bias=st.booleans())
@example(m=2 * LARGE_TILES[0] + 1, n=2 * LARGE_TILES[1], k=LARGE_TILES[2] + 1, trans_a=True, trans_b=True,
         dtype=np.float32, activation="tanh", bias=True)  # large tiles
@example(m=SMALL_TILES[0] + 1, n=2 * SMALL_TILES[1] - 1, k=SMALL_TILES[2] - 1, trans_a=False, trans_b=True,
         dtype=np.float64, activation="leaky_relu", bias=True)  # small tiles
@settings(max_examples=16)
def test_matmul_tile_edges_transposes_and_epilogue(m, n, k, trans_a, trans_b, dtype, activation, bias):
    a = _rand((k, m) if trans_a else (m, k), dtype, 1)
    b = _rand((n, k) if trans_b else (k, n), dtype, 2)
    c = _rand(n, dtype, 3) if bias else None
    expected = reference(kernels.matmul, a, b, trans_a=trans_a, trans_b=trans_b, bias=c, activation=activation,
                         alpha=0.2)
    got = kernels.matmul(cuda.to_device(a), cuda.to_device(b), trans_a=trans_a, trans_b=trans_b,
                         bias=None if c is None else cuda.to_device(c), activation=activation, alpha=0.2)
    tol = TOL[np.dtype(dtype)]
    assert_close(got.copy_to_host(), expected, rtol=50 * tol["rtol"], atol=50 * tol["atol"] * max(k, 1))


def test_matmul_reads_strided_device_views_without_copying():
    a, b = _rand((12, 20), np.float64, 4), _rand((30, 9), np.float64, 5)
    da, db = cuda.to_device(a), cuda.to_device(b)
    got = kernels.matmul(da[:, ::2], db[::3])  # (12, 10) @ (10, 9), both non-contiguous
    assert_close(got.copy_to_host(), a[:, ::2] @ b[::3])
    got_t = kernels.matmul(da[:, ::2].T, db[::3].T, trans_a=True, trans_b=True)  # op() undoes the .T views
    assert_close(got_t.copy_to_host(), a[:, ::2] @ b[::3])


@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 1), (9, 3), (5, 130), (11, 7)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_kernels_cover_block_striding_and_partial_rows(rows, cols, dtype):
    """More rows than simulator blocks (each block strides over rows), rows shorter and longer than a block."""
    x, dy = _rand((rows, cols), dtype, 6), _rand((rows, cols), dtype, 7)
    labels = np.arange(rows) * 5 % cols
    y = kernels.softmax(cuda.to_device(x))
    assert_close(y.copy_to_host(), reference(kernels.softmax, x))
    expected_dx = reference(kernels.softmax_backward, reference(kernels.softmax, x), dy)
    assert_close(kernels.softmax_backward(y, cuda.to_device(dy)).copy_to_host(), expected_dx,
                 atol=10 * TOL[np.dtype(dtype)]["atol"])
    loss, grad = kernels.softmax_cross_entropy(cuda.to_device(x), cuda.to_device(labels))
    expected_loss, expected_grad = reference(kernels.softmax_cross_entropy, x, labels)
    assert loss.shape == () and loss.dtype == dtype
    assert_close(loss.copy_to_host(), expected_loss)
    assert_close(grad.copy_to_host(), expected_grad)


@pytest.mark.parametrize("bad", [-1, 4, 2**40])
def test_out_of_range_device_labels_make_the_loss_and_their_row_nan(bad):
    x = _rand((3, 4), np.float32, 8)
    labels = np.array([1, bad, 3], dtype=np.int64)
    loss, grad = kernels.softmax_cross_entropy(cuda.to_device(x), cuda.to_device(labels))
    grad = grad.copy_to_host()
    assert np.isnan(loss.copy_to_host())
    assert np.isnan(grad[1]).all()
    good = np.array([1, 3])
    _, expected = reference(kernels.softmax_cross_entropy, x[[0, 2]], good)
    assert_close(grad[[0, 2]], expected * 2 / 3)  # the mean is over all 3 rows


@pytest.mark.parametrize("bad", [0.0, 3.0, 0.5, np.nan])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_device_hinge_targets_other_than_plus_or_minus_one_make_the_loss_and_their_gradient_nan(bad, dtype):
    """As out-of-range labels: device targets are not checked on the host (targets {0, 3} gave a finite loss)."""
    scores, target = np.array([0.5, -0.2, 2.0], dtype), np.array([1.0, bad, -1.0], dtype)
    loss, grad = kernels.hinge(cuda.to_device(scores), cuda.to_device(target))
    grad = grad.copy_to_host()
    assert np.isnan(loss.copy_to_host()) and np.isnan(grad[1])
    _, expected = reference(kernels.hinge, scores[[0, 2]], target[[0, 2]])
    assert_close(grad[[0, 2]], expected * 2 / 3)  # the mean is over all 3 elements


def test_scratch_buffers_of_a_recorded_step_are_kept_with_it(monkeypatch):
    """A captured graph replays the pointers of the scratch buffers it recorded: they must outlive the
    scratch cache's eviction. Recording is simulated by a capture stream (the default one, 0)."""
    import gc
    import weakref

    from kernels.cuda import _launch

    scores, target = cuda.to_device(np.array([0.5, -0.2], np.float32)), cuda.to_device(np.ones(2, np.float32))
    kernels.hinge(scores, target)  # the eager first call allocates the scratch buffers
    blocks = _launch.grid(2)[0]
    cached = weakref.ref(_launch._scratch("numba", "partials", (blocks,), np.dtype(np.float32)))
    monkeypatch.setattr(_launch, "_capture_stream", [0])
    monkeypatch.setattr(_launch, "_capture_kept", [])
    kernels.hinge(scores, target)
    kept = _launch._capture_kept
    _launch._scratch.cache_clear()  # as an eviction would
    gc.collect()
    assert cached() is not None and any(a is cached() for a in kept)


@pytest.mark.parametrize("size", [1, 33, 1000, 4099])
def test_bias_grad_and_pointwise_losses_across_block_counts(size):
    dy = _rand((size, 3), np.float64, 9)
    for _ in range(2):  # twice: the block counters of the one-launch reductions are reset for the next call
        assert_close(kernels.bias_grad(cuda.to_device(dy)).copy_to_host(), dy.sum(axis=0))
    target = np.sign(_rand(size * 3, np.float64, 10))
    for fn in (kernels.mse, kernels.binary_cross_entropy, kernels.hinge, kernels.mse):
        loss, grad = fn(cuda.to_device(dy.ravel()), cuda.to_device(target))
        expected_loss, expected_grad = reference(fn, dy.ravel(), target)
        assert_close(loss.copy_to_host(), expected_loss)
        assert_close(grad.copy_to_host(), expected_grad)


@pytest.mark.parametrize("seed", [0, 1, 2**63 + 5, 2**64 - 1])
@pytest.mark.parametrize("p", [0.0, 1e-7, 0.5, 0.999])
def test_dropout_mask_is_bitwise_the_cpu_mask(seed, p):
    x = np.arange(1, 2050, dtype=np.float32)
    with kernels.use_backend("numba"):
        expected = kernels.dropout(x, p, seed)
    np.testing.assert_array_equal(kernels.dropout(cuda.to_device(x), p, seed).copy_to_host(), expected)


def test_cupy_arrays_get_cupy_outputs(monkeypatch):
    """CuPy is not installed here: a stand-in module checks that CuPy in means CuPy out."""
    calls = []
    cupy = types.SimpleNamespace(empty=lambda shape, dtype: calls.append(("empty", shape, dtype)) or "cupy-array",
                                 ascontiguousarray=lambda x: calls.append(("ascontiguousarray", x)) or "cupy-copy")
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    array_type = type("ndarray", (), {"__module__": "cupy._core.core",
                                      "flags": types.SimpleNamespace(c_contiguous=False)})
    like = array_type()
    assert kernels.cuda.empty((2, 3), np.float32, like) == "cupy-array"
    assert kernels.cuda.ascontiguous(like) == "cupy-copy"
    assert calls == [("empty", (2, 3), np.float32), ("ascontiguousarray", like)]
    assert _is_numba_device(kernels.cuda.empty((2,), np.float64, cuda.to_device(np.ones(1))))


def test_host_device_copies_keep_the_array_kind(monkeypatch):
    """to_device/zeros give CuPy arrays for a CuPy ``like`` (a stand-in module here), Numba device arrays
    otherwise; to_host copies either kind back (CuPy's .get(), Numba's copy_to_host)."""
    calls = []
    cupy = types.SimpleNamespace(asarray=lambda x: calls.append(("asarray", x.shape)) or "cupy-array")
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    like = type("ndarray", (), {"__module__": "cupy._core.core", "get": lambda self: "host copy"})()
    assert kernels.cuda.to_device(np.ones(3), like) == "cupy-array"
    assert kernels.cuda.zeros((2, 2), np.float32, like) == "cupy-array"
    assert calls == [("asarray", (3,)), ("asarray", (2, 2))]
    assert kernels.cuda.to_host(like) == "host copy"
    on_device = kernels.cuda.to_device(np.arange(4.0)[::2], None)  # non-contiguous host data is fine
    assert _is_numba_device(on_device)
    np.testing.assert_array_equal(kernels.cuda.to_host(on_device), [0.0, 2.0])
    np.testing.assert_array_equal(kernels.cuda.to_host(kernels.cuda.zeros((2,), np.float64, None)), [0.0, 0.0])


def test_nn_keeps_numba_device_arrays_where_cupy_cannot_run():
    """Under the simulator (or without CuPy) nn's cuda arrays are Numba device arrays."""
    from nn import _device

    if _device._cupy() is not None:
        pytest.skip("CuPy runs here, so nn keeps CuPy arrays")
    xp = _device.namespace("cuda")
    assert xp is _device.NUMBA_ARRAYS
    a = xp.asarray(np.arange(3, dtype=np.float32))
    assert _is_numba_device(a) and _device.namespace_of(a) is xp and _device.namespace_of(np.ones(1)) is np
    b = xp.array(a)  # a copy on the device
    xp.copyto(a, xp.zeros((3,), np.float32))
    np.testing.assert_array_equal(_device.to_host(b), [0, 1, 2])
    np.testing.assert_array_equal(_device.to_host(a), [0, 0, 0])
    xp.copyto(a, 2.5)  # host data: a scalar broadcast, a list cast to a's dtype
    np.testing.assert_array_equal(_device.to_host(a), [2.5, 2.5, 2.5])
    xp.copyto(a, [1, 2, 3])
    np.testing.assert_array_equal(_device.to_host(a), [1, 2, 3])
    with pytest.raises(ValueError):
        xp.copyto(a, xp.zeros((4,), np.float32))
    with pytest.raises(TypeError):
        xp.copyto(a, xp.zeros((3,), np.float64))
    assert _device.to_host(xp.ones((2,), np.float64)).tolist() == [1.0, 1.0]
    full, loss = xp.zeros((4,), np.float32), cuda.to_device(np.array(3.0, np.float32))  # a loss kernel's 0-d result
    xp.multiply(loss, 1 / 3, out=full[-1:])  # a rank's weighted loss in the slot after its gradients
    assert _device.to_host(full).tolist() == [0, 0, 0, np.float32(3.0) * np.float32(1 / 3)]


# Compiles every kernel for a real GPU (compute capability 9.0) down to LLVM IR, in a process without the
# simulator: the simulator runs kernels as Python and checks no types. Needs no GPU and no driver (the
# current device is only asked for its compute capability); NVVM, which makes PTX, is not needed either.
# The GPU's launch constants (GPU geometry) are the ones compiled: warp-shuffle rows, 128x128x8 tiles.
TARGET_CHECK = r"""
import importlib, types as pytypes
import numpy as np
import numba.cuda.dispatcher
from numba import types
import warnings
from numba.cuda.compiler import compile_cuda

numba.cuda.dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))
launch, act, los, mm, opt, dr = (importlib.import_module("kernels.cuda." + m) for m in
                                 ("_launch", "activations", "losses", "matmul", "optim", "dropout"))
G = launch.GPU
for dtype in (np.float32, np.float64):
    f, b = types.float32 if dtype is np.float32 else types.float64, types.boolean
    v, m2, any2 = types.Array(f, 1, "C"), types.Array(f, 2, "C"), types.Array(f, 2, "A")
    u32 = types.Array(types.uint32, 1, "C")
    d = np.dtype(dtype)
    formulas = importlib.import_module("kernels._scalar").ACTIVATIONS.values()
    kernels = [(act._unary_kernel(forward), (v, f, v)) for forward, _ in formulas]
    kernels += [(act._binary_kernel(backward), (v, v, f, v)) for _, backward in formulas]
    kernels += [(act._unary_kernel(act._times), (v, f, v))]
    for warp_rows in (True, False):
        forward, backward = act._softmax_kernels(d, warp_rows, G.row_threads)
        kernels += [(forward, (m2, m2)), (backward, (m2, m2, m2))]
        kernels += [(los._cross_entropy_kernel(d, warp_rows, G.row_threads),
                     (m2, types.Array(label, 1, "C"), f, f, m2, v, u32, v)) for label in (types.int64, types.uint8)]
    kernels += [(launch._copy1d, (types.Array(f, 1, "A"), v)),
                (launch._copy2d, (any2, m2)),
                (los._bias_grad_kernel(d), (any2, types.int64, m2, u32, v)),
                (dr._dropout, (v, types.uint64, types.uint64, f, v)),
                (opt._sgd, (v, v, v, b, v, f, f, f, f, b, b, b)), (opt._adam, (v, v, v, b, v, v) + (f,) * 8 + (b,)),
                (opt._rmsprop, (v, v, v, b, v, v) + (f,) * 6 + (b,)), (opt._adagrad, (v, v, v, b, v, f, f, f)),
                (opt._adadelta, (v, v, v, b, v, v) + (f,) * 5)]
    kernels += [(los._pointwise_kernel(t, d, G.threads), (v, v, f, f, v, v, u32, v))
                for t in (los._mse_terms, los._bce_terms, los._hinge_terms)]
    kernels += [(mm._gemm_kernel(d, tiles, ta, tb, bias, activation), (any2, any2, types.Array(f, 1, "A"), f, m2))
                for tiles, ta, tb, bias, activation in [
                    (G.large_tiles, False, False, True, "relu"), (G.large_tiles, True, False, False, None),
                    (G.large_tiles, False, True, False, None), (G.small_tiles, True, True, True, "leaky_relu"),
                    (G.small_tiles, False, False, True, "sigmoid"), (G.small_tiles, False, True, False, "tanh")]]
    print(len(kernels))
    for kernel, signature in kernels:
        ir = compile_cuda(kernel.py_func, types.void, signature, cc=(9, 0)).library.get_llvm_str()
        doubles = [line for line in ir.splitlines() if " double" in line and "declare" not in line]
        assert not (dtype is np.float32 and doubles), (kernel.py_func.__name__, doubles[:3])
        print(kernel.py_func.__name__, dtype.__name__, len(doubles))
    # the step's bookkeeping: float64 metrics by design, so only compiled (the loss and scale in the dtype)
    met, d64 = importlib.import_module("kernels.cuda.metrics"), types.Array(types.float64, 1, "C")
    for kernel, signature in [(met._count_labels, (m2, types.Array(types.int64, 1, "C"), d64)),
                              (met._count_thresholds, (m2, m2, f, d64)),
                              (met._check_step, (v, types.float64, d64, types.float64, d64, v))]:
        compile_cuda(kernel.py_func, types.void, signature, cc=(9, 0))
        print("bookkeeping:" + kernel.py_func.__name__, "compiled")
"""


def test_every_kernel_compiles_for_a_gpu_and_float32_kernels_do_no_float64_math():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(kernels.__file__)))
    result = subprocess.run([sys.executable, "-c", TARGET_CHECK], capture_output=True, text=True, env=env,
                            cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    count = int(lines[0])
    doubles = [int(line.split()[2]) for line in lines if len(line.split()) == 3]  # name, dtype, float64 lines
    assert count > 30 and len(doubles) == 2 * count  # float32 then float64
    assert set(doubles[:count]) == {0} and max(doubles[count:]) > 0  # the check sees doubles


# ---- the GPU's launch constants, run under the simulator ---------------------------------------------------
# The simulator normally runs shrunk constants (see kernels.cuda._launch.Geometry); these cases run the ones
# a GPU gets (256-thread blocks, 128x128x8 and 64x64x16 GEMM tiles, four one-row warps per row block), so the
# real indexing runs somewhere. Slow (each GPU thread is a Python thread): a few small cases each.

BLOCK_ROWS = dataclasses.replace(GPU, warp_rows=False)  # the GPU's row blocks, one block (tree) per row


@pytest.mark.parametrize("m, n, k, trans_a, trans_b, activation", [
    (130, 129, 9, False, False, "relu"),  # large tiles: 2 x 2 blocks of 128 x 128, two K steps of 8
    (129, 130, 8, True, False, None),
    (129, 131, 17, False, True, "tanh"),  # the trans_b (dx = dy W^T) path
    (65, 20, 17, True, True, "sigmoid"),  # small tiles (64 x 64 x 16): too few large tiles for the SMs
])
def test_matmul_with_the_gpu_tiles(monkeypatch, m, n, k, trans_a, trans_b, activation):
    a = _rand((k, m) if trans_a else (m, k), np.float32, 1)
    b = _rand((n, k) if trans_b else (k, n), np.float32, 2)
    c = _rand(n, np.float32, 3)
    expected = reference(kernels.matmul, a, b, trans_a=trans_a, trans_b=trans_b, bias=c, activation=activation)
    monkeypatch.setitem(tiles_for.__globals__, "sm_count", lambda: 4)  # the simulator's count, on a GPU too
    with use_geometry(GPU):
        assert tiles_for(m, n) == (GPU.small_tiles if m < 100 else GPU.large_tiles)
        got = kernels.matmul(cuda.to_device(a), cuda.to_device(b), trans_a=trans_a, trans_b=trans_b,
                             bias=cuda.to_device(c), activation=activation)
    assert_close(got.copy_to_host(), expected, rtol=1e-4, atol=1e-4 * k)


def _row_inputs(dtype=np.float32):
    """Rows around a warp's width, and the special values: +inf, a row of -inf, NaN, huge logits."""
    x = _rand((7, 45), dtype, 11)
    x[2, 3], x[3], x[4, 7], x[5, :2] = np.inf, -np.inf, np.nan, (np.finfo(dtype).max, -np.finfo(dtype).max)
    return x, _rand((7, 45), dtype, 12), np.arange(7) * 4 % 45


@contextlib.contextmanager
def _quiet():
    """inf - inf and friends: NaN silently on a GPU, a RuntimeWarning from the simulator's NumPy scalars
    (in its kernel threads too, so a warnings filter rather than np.errstate)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _row_results(x, dy, labels):
    d = cuda.to_device
    y = kernels.softmax(d(x)).copy_to_host()
    finite = np.where(np.isfinite(y), y, 0)
    dx = kernels.softmax_backward(d(finite), d(dy)).copy_to_host()
    loss, grad = kernels.softmax_cross_entropy(d(x[[0, 1, 6]]), d(labels[[0, 1, 6]]))
    return y, dx, loss.copy_to_host(), grad.copy_to_host()


@pytest.mark.parametrize("geometry_", [GPU, BLOCK_ROWS], ids=["warp shuffles", "block tree"])
def test_row_kernels_with_the_gpu_constants(geometry_):
    x, dy, labels = _row_inputs()
    with use_geometry(geometry_), _quiet():
        y, dx, loss, grad = _row_results(x, dy, labels)
    with _quiet():
        expected = reference(kernels.softmax, x)
        expected_dx = reference(kernels.softmax_backward, np.where(np.isfinite(expected), expected, 0), dy)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    assert_close(y[~np.isnan(y)], expected[~np.isnan(expected)])
    assert_close(dx, expected_dx)
    expected_loss, expected_grad = reference(kernels.softmax_cross_entropy, x[[0, 1, 6]], labels[[0, 1, 6]])
    assert_close(loss, expected_loss)
    assert_close(grad, expected_grad)


def test_warp_shuffle_and_tree_reductions_agree():
    """The same rows through one warp per row (shuffles) and one block per row (shared-memory tree):
    equal up to rounding (the sums are added in a different order), with NaN in the same places."""
    x, dy, labels = _row_inputs(np.float64)
    with _quiet():
        with use_geometry(GPU):
            shuffled = _row_results(x, dy, labels)
        with use_geometry(BLOCK_ROWS):
            tree = _row_results(x, dy, labels)
    for s, t in zip(shuffled, tree):
        np.testing.assert_allclose(s, t, rtol=1e-13, atol=1e-15)


def test_elementwise_losses_and_optimizers_with_the_gpu_blocks():
    """256-thread blocks; 700 elements make three blocks, so the last-block mean adds three partials."""
    x, t = _rand(700, np.float32, 13), np.sign(_rand(700, np.float32, 14))
    param, grad, m, v = (np.abs(_rand(700, np.float32, s)) for s in range(15, 19))
    with use_geometry(GPU):
        got_relu = kernels.relu(cuda.to_device(x)).copy_to_host()
        losses = [fn(cuda.to_device(x), cuda.to_device(t)) for fn in (kernels.mse, kernels.hinge)]
        dev = [cuda.to_device(a) for a in (param, grad, m, v)]
        kernels.adam_step(*dev, step=3)
    assert_close(got_relu, np.maximum(x, 0))
    for (loss, g), fn in zip(losses, (kernels.mse, kernels.hinge)):
        expected_loss, expected_grad = reference(fn, x, t)
        assert_close(loss.copy_to_host(), expected_loss)
        assert_close(g.copy_to_host(), expected_grad)
    expected = [a.copy() for a in (param, grad, m, v)]
    with kernels.use_backend("numpy"):
        kernels.adam_step(*expected, step=3)
    for got, want in zip(dev, expected):
        assert_close(got.copy_to_host(), want)


# ---- launches: one per loss, counted per step, and CUDA graph replay --------------------------------------


def test_float_reads_a_device_loss():
    x = _rand(50, np.float32, 20)
    loss, _ = kernels.mse(cuda.to_device(x), cuda.to_device(np.zeros_like(x)))
    assert loss.shape == () and kernels.is_device_array(loss)
    assert float(loss) == pytest.approx(float(np.mean(x * x)), rel=1e-6)


def _training_step(batch=8, fan_in=5, hidden=6, classes=4):
    """A two-layer classifier's step on device arrays (the launches nn makes): returns (step, buffers)."""
    rng = np.random.default_rng(21)
    d = {name: cuda.to_device(rng.standard_normal(shape).astype(np.float32)) for name, shape in [
        ("x", (batch, fan_in)), ("w1", (fan_in, hidden)), ("b1", (hidden,)), ("w2", (hidden, classes)),
        ("b2", (classes,))]}
    d["labels"] = cuda.to_device(np.arange(batch) % classes)
    state = {name: [cuda.to_device(np.zeros(d[name].shape, np.float32)) for _ in range(2)]
             for name in ("w1", "b1", "w2", "b2")}

    def step():
        h = kernels.matmul(d["x"], d["w1"], bias=d["b1"], activation="relu")
        logits = kernels.matmul(h, d["w2"], bias=d["b2"])
        loss, dlogits = kernels.softmax_cross_entropy(logits, d["labels"])
        grads = {"w2": kernels.matmul(h, dlogits, trans_a=True), "b2": kernels.bias_grad(dlogits)}
        dh = kernels.relu_backward(h, kernels.matmul(dlogits, d["w2"], trans_b=True))
        grads["w1"], grads["b1"] = kernels.matmul(d["x"], dh, trans_a=True), kernels.bias_grad(dh)
        for name, g in grads.items():
            kernels.adam_step(d[name], g, *state[name], step=1)
        return loss

    return step, d


def test_launches_per_training_step():
    """2 forward GEMMs, 1 fused loss (it was a loss kernel and a 1-block sum), 3 backward GEMMs, 2 bias
    gradients, 1 relu backward, 4 optimizer steps: 13 launches."""
    step, _ = _training_step()
    step()
    before = STATS["launches"]
    step()
    assert STATS["launches"] - before == 13
    for fn, args in [(kernels.softmax_cross_entropy, (_rand((5, 3), np.float32), np.arange(5) % 3)),
                     (kernels.mse, (_rand(9, np.float32), _rand(9, np.float32, 1)))]:
        before = STATS["launches"]
        fn(*(cuda.to_device(a) for a in args))
        assert STATS["launches"] - before == 1


@pytest.mark.skipif(not SIMULATOR, reason="a GPU can capture: bench/gpu_check.py checks the replay there")
def test_captured_step_falls_back_to_plain_launches_where_capture_is_unavailable():
    step, _ = _training_step()
    captured = kernels.cuda.CapturedStep(step)
    assert not captured.captured and "simulator" in captured.fallback
    plain, _ = _training_step()
    forced = kernels.cuda.CapturedStep(plain, capture=False)
    assert forced.fallback == "capture=False"
    for _ in range(3):
        before = STATS["launches"]
        loss = captured()
        assert STATS["launches"] - before == 13  # every call launches every kernel
        assert float(loss) == float(forced())  # and computes what plain launches compute


class _FakeGraph:
    def __init__(self):
        self.launches = 0

    def launch(self):
        self.launches += 1


def test_captured_step_runs_once_records_once_then_only_replays(monkeypatch):
    """The recording itself needs CuPy and a GPU (bench/gpu_check.py); here a stand-in recorder checks the
    step's sequence: a plain first call, one recording, then graph launches only, same outputs each time."""
    from kernels.cuda import _launch

    recorded = []

    def record(fn):
        recorded.append(STATS["launches"])
        result = fn()
        return _FakeGraph(), result, []

    monkeypatch.setattr(_launch, "_capture_unavailable", lambda: None)
    monkeypatch.setattr(_launch, "_record", record)
    step, _ = _training_step()
    captured = kernels.cuda.CapturedStep(step)
    first = captured()
    assert not captured.captured and not recorded
    second = captured()
    assert captured.captured and len(recorded) == 1 and captured._graph.launches == 1
    before = STATS["launches"]
    assert captured() is second and captured() is second and first is not second
    assert STATS["launches"] == before and captured._graph.launches == 3  # replays launch no kernel


def test_a_failed_recording_falls_back_with_a_warning(monkeypatch):
    from kernels.cuda import _launch

    def record(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(_launch, "_capture_unavailable", lambda: None)
    monkeypatch.setattr(_launch, "_record", record)
    step, _ = _training_step()
    captured = kernels.cuda.CapturedStep(step)
    captured()
    with pytest.warns(RuntimeWarning, match="capture failed"):
        loss = captured()
    assert not captured.captured and "not permitted" in captured.fallback and np.isfinite(float(loss))


def test_launch_overhead_counts_one_launch_and_no_conversion_per_call():
    from kernels.profile import launch_overhead

    rows = launch_overhead(calls=2, file=io.StringIO())
    assert [r["kernel"].split()[0] for r in rows] == ["relu", "matmul", "softmax_cross_entropy", "mse", "adam_step"]
    assert all(r["launches"] == 1 and r["conversions"] == 0 and r["us"] > 0 for r in rows)


def _fake_cupy_array(ptr, shape):
    array_type = type("ndarray", (), {"__module__": "cupy._core.core"})
    x = array_type()
    x.data, x.shape, x.strides = types.SimpleNamespace(ptr=ptr), shape, (8 * shape[-1], 8)
    x.dtype, x.__cuda_array_interface__ = np.dtype(np.float64), {"data": (ptr, False), "shape": shape}
    return x


def test_cupy_arguments_are_wrapped_once_per_buffer_without_sync_and_launch_on_cupys_stream(monkeypatch):
    """CuPy is not installed here: stand-ins check the conversion cache and the choice of stream."""
    from kernels.cuda import _launch

    wrapped = []
    def wrap(desc, owner, sync):
        wrapped.append((desc["data"][0], owner, sync))
        return f"view {len(wrapped)}"

    monkeypatch.setattr(cuda, "from_cuda_array_interface", wrap, raising=False)  # not in the simulator
    monkeypatch.setattr(_launch, "_VIEWS", {})
    a, same, other = _fake_cupy_array(4096, (2, 3)), _fake_cupy_array(4096, (2, 3)), _fake_cupy_array(4096, (3, 2))
    before = STATS["conversions"]
    assert _launch.device_view(a) == _launch.device_view(same) == "view 1"  # same buffer: wrapped once
    assert _launch.device_view(other) == "view 2"  # another shape over the same pointer: another view
    assert wrapped == [(4096, None, False)] * 2 and STATS["conversions"] - before == 2
    numba_array = cuda.to_device(np.ones(2))
    assert _launch.device_view(numba_array) is numba_array

    current = types.SimpleNamespace(ptr=0)
    cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(get_current_stream=lambda: current))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(_launch, "_external_stream", lambda ptr: f"external {ptr}")
    assert _launch.stream_for(a) == 0  # CuPy's default (legacy) stream is Numba's stream 0
    current.ptr = 77
    assert _launch.stream_for(a) == "external 77" and _launch.stream_for(numba_array) == 0
    monkeypatch.setattr(_launch, "_capture_stream", ["capture"])
    assert _launch.stream_for(a) == _launch.stream_for(numba_array) == "capture"  # while recording: one stream


def test_low_occupancy_warnings_are_silenced_on_purpose_only():
    """numba-cuda warns when a grid has under 128 blocks (a GPU-only warning, so a stand-in kernel here)."""
    from numba.cuda.core.errors import NumbaPerformanceWarning

    from kernels.cuda import _launch

    class Compiled:
        def __getitem__(self, config):
            warnings.warn(NumbaPerformanceWarning(f"Grid size {config[0]} will likely result in GPU "
                                                  "under-utilization due to low occupancy."))
            warnings.warn(NumbaPerformanceWarning("another performance warning"))
            return config

    with pytest.warns(NumbaPerformanceWarning) as caught:
        assert _launch._configure(Compiled(), 1, 32, 0) == (1, 32, 0)
    assert len(caught) == 1 and "another performance warning" in str(caught[0].message)
