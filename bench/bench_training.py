"""End-to-end training: one epoch of an MLP with Adam on synthetic data, samples per second.

Implementations: ``numpy`` (nn on the reference backend), ``numba`` (nn on the compiled backend) and
``torch`` (the equivalent torch.nn model and torch.optim.Adam loop, CPU). Each call is one epoch of
``Trainer.fit`` (shuffling, input checks and gradient-norm bookkeeping included) or of the torch loop.
``flops`` counts the matmuls only: 2 per multiply-add forward, 4 backward (dW and dx).
``benchmark.extra_info["samples/s"]`` holds the throughput.
"""

import numpy as np
import pytest
import torch

import kernels
import nn

CONFIGS = [((784, 256, 256, 10), 128, 4096), ((64, 128, 10), 32, 2048)]  # widths, batch size, samples


def _data(widths, n):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, widths[0])).astype(np.float32), rng.integers(0, widths[-1], n)


def _nn_epoch(widths, batch, X, y, backend):
    with kernels.use_backend(backend):
        model = nn.Sequential([nn.Dense(w, activation="relu") for w in widths[1:-1]] + [nn.Dense(widths[-1])],
                              input_dim=widths[0], seed=0)
    trainer = nn.Trainer(model, optimizer=nn.Adam(lr=1e-3))

    def epoch():
        with kernels.use_backend(backend):
            trainer.fit(X, y, epochs=1, batch_size=batch, verbose=0)

    return epoch


def _torch_epoch(widths, batch, X, y):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(0)

    def epoch():
        order = torch.randperm(len(Xt), generator=generator)
        for start in range(0, len(Xt), batch):
            idx = order[start:start + batch]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(Xt[idx]), yt[idx]).backward()
            opt.step()

    return epoch


@pytest.mark.parametrize("impl", ["numpy", "numba", "torch"])
@pytest.mark.parametrize("widths, batch, n", CONFIGS, ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple)
                         else None)
def test_training_epoch(measure, benchmark, impl, widths, batch, n):
    X, y = _data(widths, n)
    fn = _torch_epoch(widths, batch, X, y) if impl == "torch" else _nn_epoch(widths, batch, X, y, impl)
    macs = n * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    measure(fn, group=f"train epoch {'-'.join(map(str, widths))} b{batch} f32", impl=impl, flops=6 * macs,
            rounds=5)
    if benchmark.stats is not None:
        benchmark.extra_info["samples/s"] = n / benchmark.stats.stats.median
