"""Dropout on 16M float32 elements: NumPy reference vs numba vs torch.nn.functional.dropout.

numpy and numba write into a preallocated ``out`` (traffic: read x, write out); torch allocates its
result and draws a Bernoulli mask, as it does in training.
"""

import numpy as np
import pytest

import kernels

N = 16 * 2**20


@pytest.mark.parametrize("impl", ["numpy", "numba", "torch"])
def test_dropout(measure, impl):
    x = np.random.default_rng(0).standard_normal(N).astype(np.float32)
    out = np.empty_like(x)
    if impl == "torch":
        torch = pytest.importorskip("torch")
        tx = torch.from_numpy(x)

        def run():
            return torch.nn.functional.dropout(tx, 0.5, training=True)
    else:
        def run():
            with kernels.use_backend(impl):
                return kernels.dropout(x, 0.5, 42, out=out)
    y = measure(run, group="dropout 16M f32 p=0.5", impl=impl, bytes=2 * x.nbytes)
    kept = np.asarray(y[: 1 << 16]) != 0
    assert 0.45 < kept.mean() < 0.55
