"""Dropout on 16M float32 elements: NumPy reference vs numba vs torch.nn.functional.dropout vs JAX.

numpy and numba write into a preallocated ``out`` (traffic: read x, write out), the mask a hash of the
seed and the element index; torch allocates its result and draws a Bernoulli mask from its generator,
as it does in training; JAX draws its mask with ``jax.random.bernoulli`` (threefry) inside the jit.
Different generators and allocation, so not the same work: the group is marked ``unlike`` and the report
prints the medians and numba's GB/s against its roof, but no "vs best peer" ratio and no chart bars.
"""

import numpy as np
import pytest

import kernels

from .conftest import jax_jit

N = 16 * 2**20
UNLIKE = "each library's own mask generator (counter hash, torch Bernoulli, threefry): no speed ratio"


@pytest.mark.parametrize("impl", ["numpy", "numba", "torch", "jax"])
def test_dropout(measure, impl):
    x = np.random.default_rng(0).standard_normal(N).astype(np.float32)
    out = np.empty_like(x)
    if impl == "torch":
        torch = pytest.importorskip("torch")
        tx = torch.from_numpy(x)

        def run():
            return torch.nn.functional.dropout(tx, 0.5, training=True)
    elif impl == "jax":
        jax = pytest.importorskip("jax")

        call = jax_jit(lambda k, v: v * jax.random.bernoulli(k, 0.5, v.shape) / 0.5)
        jx, key = jax.device_put(x), jax.random.key(42)

        def run():
            return call(key, jx)
    else:
        def run():  # measure selects the backend around it (outside the timed call)
            return kernels.dropout(x, 0.5, 42, out=out)
    y = measure(run, group="dropout 16M f32 p=0.5 (torch, jax: mask drawn too)", impl=impl, bytes=2 * x.nbytes,
                backend=impl if impl in ("numpy", "numba") else None, unlike=UNLIKE)
    kept = np.asarray(y[: 1 << 16]) != 0
    assert 0.45 < kept.mean() < 0.55
