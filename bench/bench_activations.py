"""Activations in float32: NumPy reference vs numba vs PyTorch CPU vs JAX (XLA), in the same run and group.

Every implementation writes into preallocated outputs where it can (``out=``; JAX has no ``out=`` and
allocates its result), so the timings are the kernels, not the allocator. ``bytes`` is one call's memory
traffic: arrays read plus arrays written.
"""

import numpy as np
import pytest

import kernels

from .conftest import jax_jit

IMPLS = ["numpy", "numba", "torch", "jax"]
BIG = 16 * 2**20  # 16M elements: 64 MiB per float32 array, far beyond the caches
ROWS, COLS = 512, 1000


def _arrays(name):
    """Named float32 inputs and outputs for one benchmark."""
    shape, names = ((ROWS, COLS), ("x", "out")) if name == "softmax" else (BIG, ("x", "dy", "out", "dx"))
    rng = np.random.default_rng(0)
    return {n: (rng.standard_normal(shape) * 3).astype(np.float32) for n in names}


def _torch_call(name, a):
    torch = pytest.importorskip("torch")
    t = {n: torch.from_numpy(v) for n, v in a.items()}
    return {
        "sigmoid": lambda: torch.sigmoid(t["x"], out=t["out"]),
        "tanh": lambda: torch.tanh(t["x"], out=t["out"]),
        "relu": lambda: (torch.clamp_min(t["x"], 0, out=t["out"]),
                         torch.ops.aten.threshold_backward.grad_input(t["dy"], t["x"], 0, grad_input=t["dx"])),
        "softmax": lambda: torch.softmax(t["x"], 1, out=t["out"]),  # softmax.int_out: no allocation
    }[name]


def _jax_call(name, a):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    fn = {"sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "softmax": lambda x: jax.nn.softmax(x, axis=1),
          "relu": lambda x, dy: (jax.nn.relu(x), jnp.where(x > 0, dy, 0))}[name]
    args = [jax.device_put(a[n]) for n in (("x", "dy") if name == "relu" else ("x",))]
    call = jax_jit(fn)
    return lambda: call(*args)


def _our_call(name, a):
    """The kernel call; ``measure`` selects the backend around it (outside the timed call)."""
    return {
        "sigmoid": lambda: kernels.sigmoid(a["x"], out=a["out"]),
        "tanh": lambda: kernels.tanh(a["x"], out=a["out"]),
        "relu": lambda: (kernels.relu(a["x"], out=a["out"]), kernels.relu_backward(a["x"], a["dy"], out=a["dx"])),
        "softmax": lambda: kernels.softmax(a["x"], out=a["out"]),
    }[name]


# arrays read + written per call: relu is x -> y, then x, dy -> dx; and the distinct arrays touched (the roof's
# working set): relu's x, y, dy, dx
ARRAYS_MOVED = {"sigmoid": 2, "tanh": 2, "relu": 5, "softmax": 2}
ARRAYS_TOUCHED = {"sigmoid": 2, "tanh": 2, "relu": 4, "softmax": 2}
GROUPS = {"sigmoid": "sigmoid 16M f32", "relu": "relu fwd+bwd 16M f32", "tanh": "tanh 16M f32",
          "softmax": "softmax 512x1000 f32"}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", GROUPS)
def test_activation(measure, name, impl):
    a = _arrays(name)
    call = {"torch": _torch_call, "jax": _jax_call}.get(impl, _our_call)(name, a)
    measure(call, group=GROUPS[name], impl=impl, bytes=ARRAYS_MOVED[name] * a["x"].nbytes,
            working_set=ARRAYS_TOUCHED[name] * a["x"].nbytes, rounds=20 if name == "softmax" else 7,
            backend=impl if impl in ("numpy", "numba") else None)
