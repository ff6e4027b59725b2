"""Losses in float32, forward and backward: NumPy reference vs numba vs PyTorch CPU (autograd) vs JAX.

Our kernels return the loss and write the gradient in one call; for torch the same work is the loss
function's forward plus ``backward()`` on a ``requires_grad`` input (its ``.grad`` reset each round, as
``zero_grad(set_to_none=True)`` does); for JAX ``jax.jit(jax.value_and_grad(loss))``. ``bytes`` is one
call's traffic: inputs read, gradient written. Our backend is selected around the timed calls, not in them.
"""

import numpy as np
import pytest

import kernels

from .conftest import jax_jit

IMPLS = ["numpy", "numba", "torch", "jax"]
ROWS, CLASSES = 512, 1000
N = 2**20

GROUPS = {"softmax_cross_entropy": "softmax_cross_entropy fwd+bwd 512x1000 f32",
          "binary_cross_entropy": "binary_cross_entropy fwd+bwd 1M f32",
          "mse": "mse fwd+bwd 1M f32"}


def _inputs(name):
    rng = np.random.default_rng(0)
    if name == "softmax_cross_entropy":
        return (rng.standard_normal((ROWS, CLASSES)) * 3).astype(np.float32), rng.integers(0, CLASSES, ROWS)
    target = rng.random(N) if name == "binary_cross_entropy" else rng.standard_normal(N)
    return (rng.standard_normal(N) * 3).astype(np.float32), target.astype(np.float32)


def _torch_call(name, pred, target):
    torch = pytest.importorskip("torch")
    functional = {"softmax_cross_entropy": torch.nn.functional.cross_entropy,
                  "binary_cross_entropy": torch.nn.functional.binary_cross_entropy_with_logits,
                  "mse": torch.nn.functional.mse_loss}[name]
    p, t = torch.from_numpy(pred).requires_grad_(), torch.from_numpy(target)

    def call():
        p.grad = None
        functional(p, t).backward()
    return call


def _jax_call(name, pred, target):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    loss = {"softmax_cross_entropy": lambda p, t: -jnp.mean(jnp.take_along_axis(
                jax.nn.log_softmax(p, axis=1), t[:, None], axis=1)),
            "binary_cross_entropy": lambda p, t: jnp.mean(jax.nn.softplus(p) - p * t),
            "mse": lambda p, t: jnp.mean((p - t) ** 2)}[name]
    call, p, t = jax_jit(jax.value_and_grad(loss)), jax.device_put(pred), jax.device_put(target)
    return lambda: call(p, t)


def _our_call(name, pred, target):
    """The kernel call; ``measure`` selects the backend around it (outside the timed call)."""
    fn, grad = getattr(kernels, name), np.empty_like(pred)
    return lambda: fn(pred, target, out=grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", GROUPS)
def test_loss(measure, name, impl):
    pred, target = _inputs(name)
    call = {"torch": _torch_call, "jax": _jax_call}.get(impl, _our_call)(name, pred, target)
    measure(call, group=GROUPS[name], impl=impl, bytes=2 * pred.nbytes + target.nbytes, rounds=30,
            backend=impl if impl in ("numpy", "numba") else None)
