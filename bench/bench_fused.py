"""The training step's fixed cost and the fused backward kernels (numba backend unless stated).

``test_training_step``: one epoch of ``Trainer.fit`` per round (shuffling and bookkeeping included) for
the three configurations where the per-step overhead matters most; ``extra_info`` holds samples/s and
microseconds per step. ``test_bias_act_backward``: the fused activation-derivative + bias-gradient
pass against the two separate kernel calls it replaces. ``test_step_bookkeeping``: the device metrics
kernels against the host glue they replaced; ``test_clipped_adam_step``: clipping read from the device
scale by the optimizer kernel against a separate scaling pass; ``test_dense_grad_norm``: a Dense layer's
gradient norm from its factors against forming the gradient and taking its norm (``measure``: numpy, numba
and ``numba-formed``).

Run: ``flock /tmp/kernels-bench.lock python -m pytest bench/bench_fused.py --benchmark-enable``.
"""

import functools
import math

import numpy as np
import pytest

import kernels
import nn

STEP_CONFIGS = [((784, 256, 256, 10), 128, "adam", 4096), ((64, 128, 10), 32, "adam", 4096),
                ((784, 128, 10), 1, "sgd", 512)]


def _trainer(widths, optimizer):
    model = nn.Sequential([nn.Dense(w, activation="relu") for w in widths[1:-1]] + [nn.Dense(widths[-1])],
                          input_dim=widths[0], seed=0)
    return nn.Trainer(model, optimizer=nn.Adam(lr=1e-3) if optimizer == "adam" else nn.SGD(lr=1e-2))


@pytest.mark.parametrize("widths, batch, optimizer, n", STEP_CONFIGS,
                         ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_training_step(benchmark, widths, batch, optimizer, n):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((n, widths[0])).astype(np.float32), rng.integers(0, widths[-1], n)
    trainer = _trainer(widths, optimizer)
    with kernels.use_backend("numba"):
        trainer.fit(X[:2 * batch], y[:2 * batch], epochs=1, batch_size=batch, verbose=0)  # compile, allocate
        benchmark.pedantic(trainer.fit, args=(X, y), kwargs=dict(epochs=1, batch_size=batch, verbose=0),
                           rounds=7, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing timed
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["samples/s"] = n / median
    benchmark.extra_info["us/step"] = 1e6 * median / math.ceil(n / batch)


@pytest.mark.parametrize("shape", [(128, 256), (32, 128), (256, 1024)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["fused", "separate"])
def test_bias_act_backward(benchmark, impl, shape):
    """relu: the fused kernel against relu_backward + bias_grad (backend functions, no API checks)."""
    from kernels import cpu

    rng = np.random.default_rng(0)
    y = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    dz, db = np.empty_like(y), np.empty(shape[1], np.float32)

    def fused():
        cpu.bias_act_backward(y, dy, "relu", 0.0, dz, db)

    def separate():
        cpu.relu_backward(y.reshape(-1), dy.reshape(-1), dz.reshape(-1))
        cpu.bias_grad(dz, db)

    fn = fused if impl == "fused" else separate
    fn()
    benchmark.group = f"bias_act_backward relu {shape[0]}x{shape[1]} f32"
    benchmark(fn)


@pytest.mark.parametrize("impl", ["device", "host"])
def test_step_bookkeeping(benchmark, impl):
    """A step's bookkeeping for 64-128-10 at batch 32 (backend functions, no API checks): ``device`` is
    count_correct + check_step into the metrics buffer (nothing read back), ``host`` the glue they
    replaced (the loss and norms read back, checked and summed, the argmax count in NumPy)."""
    from kernels import cpu

    rng = np.random.default_rng(0)
    out, labels = rng.standard_normal((32, 10)).astype(np.float32), rng.integers(0, 10, 32)
    norms, loss = rng.random(2) + 0.5, np.float32(2.3)
    metrics, scale, norm_sums = np.zeros(kernels.metrics_size(2)), np.ones(1, np.float32), np.zeros(2)

    def device():
        cpu.count_correct(out, labels, 0.0, metrics)
        cpu.check_step(loss, 32, norms, math.inf, metrics, scale)

    def host():
        value = float(loss)
        if not math.isfinite(value) or not np.isfinite(norms).all():
            raise FloatingPointError
        norm_sums.__iadd__(norms)
        return value * 32, (out.argmax(axis=1) == labels).sum()

    fn = device if impl == "device" else host
    fn()
    benchmark.group = "step bookkeeping 64-128-10 b32"
    benchmark(fn)


@functools.cache
def _scale_kernel():
    """``scale(src, factor, dst)``: dst = factor * src over the numba backend's threads, scheduled as its
    elementwise kernels are (serial below the parallel threshold, dynamic CHUNK-sized tasks above)."""
    from kernels.cpu._jit import jit
    from kernels.cpu._parallel import chunked, run

    @jit
    def body(lo, hi, src, factor, dst):
        for i in range(lo, hi):
            dst[i] = factor * src[i]

    body_chunks = chunked(body)
    return lambda src, factor, dst: run(body, body_chunks, src.size, src, factor, dst)


@pytest.mark.parametrize("impl", ["scale", "separate"])
def test_clipped_adam_step(benchmark, impl):
    """Adam on the 784-256-256-10 parameter buffer with the gradient clipped by 0.5: the scale read by the
    optimizer kernel against a separate pass over the gradient before it, a parallel numba scale on the
    same threads (backend functions), so that the two differ only in the fusion."""
    from kernels import cpu

    n = 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    rng = np.random.default_rng(0)
    param, grad = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    m, v, half, clipped = np.zeros_like(param), np.zeros_like(param), np.array([0.5], np.float32), np.empty_like(grad)
    scale_pass = _scale_kernel()

    def scale():
        cpu.adam_step(param, grad, m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, half)

    def separate():  # (into a scratch buffer, so that repeating it does not shrink grad towards zero)
        scale_pass(grad, half[0], clipped)
        cpu.adam_step(param, clipped, m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)

    fn = scale if impl == "scale" else separate
    fn()
    if impl == "separate":
        np.testing.assert_array_equal(clipped, grad * half[0])
    benchmark.group = f"adam step, clipped, {n} f32"
    benchmark(fn)


@pytest.mark.parametrize("rows", [1, 2], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("impl", ["numpy", "numba", "numba-formed"])
def test_dense_grad_norm(measure, impl, rows):
    """The gradient norm of a 784 -> 128 Dense layer (dW 784x128 and the bias) at batch 1 and 2, float32:
    ``kernels.dense_grad_norm`` from the factors x (B, 784) and dy (B, 128) (numpy: the reference; numba),
    against ``numba-formed``: dW formed by ``kernels.matmul(x, dy, trans_a=True)`` into a flat buffer that ends
    with the bias (as the trainer's gradient buffer holds a layer), then ``kernels.segment_norms`` over it. The
    same norm but for dW's float32 rounding (rtol 1e-6). ``bytes``: each one's traffic: the factors and the
    bias read (the factored form reads them twice, the second time from cache: counted once) and the norm
    written; the formed gradient adds dW, written by the matmul and read back by the norm (0.8 MB moved where
    the factors are 4 KB at batch 1)."""
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((rows, 784)).astype(np.float32), rng.standard_normal((rows, 128)).astype(np.float32)
    db, out = rng.standard_normal(128).astype(np.float32), np.empty(1)
    factors = x.nbytes + dy.nbytes + db.nbytes + out.nbytes
    if impl == "numba-formed":
        flat = np.empty(784 * 128 + 128, np.float32)  # dW, then the bias
        dw, offsets = flat[:784 * 128].reshape(784, 128), np.array([0, flat.size])
        flat[784 * 128:] = db

        def run():  # measure selects the backend around it (outside the timed call)
            kernels.matmul(x, dy, trans_a=True, out=dw)
            return kernels.segment_norms(flat, offsets, out=out)
        traffic = factors + 2 * dw.nbytes
    else:
        def run():
            return kernels.dense_grad_norm(x, dy, db, out=out)
        traffic = factors
    norm = measure(run, group=f"dense_grad_norm 784x128 b{rows} f32", impl=impl, bytes=traffic, rounds=30,
                   backend="numpy" if impl == "numpy" else "numba")
    expected = np.linalg.norm(np.concatenate([(x.T.astype(np.float64) @ dy.astype(np.float64)).ravel(), db]))
    np.testing.assert_allclose(norm, [expected], rtol=1e-6)
