"""The training step's fixed cost and the fused backward kernels (numba backend unless stated).

``test_training_step``: one epoch of ``Trainer.fit`` per round (shuffling and bookkeeping included) for
the three configurations where the per-step overhead matters most; ``extra_info`` holds samples/s and
microseconds per step. ``test_bias_act_backward``: the fused activation-derivative + bias-gradient
pass against the two separate kernel calls it replaces.

Run: ``flock /tmp/kernels-bench.lock python -m pytest bench/bench_fused.py --benchmark-enable``.
"""

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
