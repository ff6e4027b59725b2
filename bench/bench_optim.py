"""Fused optimizer steps on 10M float32 parameters: NumPy reference vs numba vs torch.optim vs JAX.

Each step updates the buffers in place, so every round times a real step on evolving state. For torch,
``.grad`` is set once and ``optimizer.step()`` is timed ("torch" is the fused CPU kernel, the fastest
torch has; "torch-foreach" the multi-tensor path). JAX: the update written in jax.numpy (as optax does it),
jitted with the parameter and state buffers donated so XLA updates them in place. ``bytes`` is the real
traffic of one step: each buffer read once and each updated one written once. The roof is an in-place
read-modify-write over the step's working set (param, grad and state; :func:`kernels.profile.memory_roof`
with ``in_place``): like the step, it has no write-allocate read, which a copy's destination costs.
"""

import numpy as np
import pytest

import kernels

from .conftest import jax_jit

N = 10_000_000
IMPLS = ["numpy", "numba", "torch", "torch-foreach", "jax"]

# name -> (kernel, its keyword arguments, state buffers, torch.optim class, its keyword arguments)
CASES = {
    "adam": (kernels.adam_step, dict(lr=1e-3), ("m", "v"), "Adam", dict(lr=1e-3)),
    "sgd momentum": (kernels.sgd_step, dict(lr=0.01, momentum=0.9), ("velocity",),
                     "SGD", dict(lr=0.01, momentum=0.9)),
    "adagrad": (kernels.adagrad_step, dict(lr=0.01), ("sum_sq",), "Adagrad", dict(lr=0.01)),
}


def _buffers(dtype=np.float32):
    rng = np.random.default_rng(0)
    return rng.standard_normal(N).astype(dtype), (rng.standard_normal(N) * 1e-2).astype(dtype)


def _kernel_step(fn, kwargs, states, param, grad):
    """One step of our kernel; ``measure`` selects the backend around it (outside the timed call)."""
    state = {name: np.zeros_like(param) for name in states}
    takes_step = fn in (kernels.adam_step, kernels.sgd_step)
    counter = iter(range(1, 1 << 30))

    def step():
        fn(param, grad, **state, **kwargs, **(dict(step=next(counter)) if takes_step else {}))
    return step


def _torch_step(impl, torch_name, torch_kwargs, param, grad):
    torch = pytest.importorskip("torch")
    weight = torch.from_numpy(param).requires_grad_()
    weight.grad = torch.from_numpy(grad)
    mode = dict(foreach=True) if impl == "torch-foreach" else dict(fused=True)
    return getattr(torch.optim, torch_name)([weight], **torch_kwargs, **mode).step


def _jax_update(name):
    """``(param, grad, *state, t) -> (param, *state)``: the update of ``name`` in jax.numpy."""
    jnp = pytest.importorskip("jax").numpy

    def adam(p, g, m, v, t, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        return p - lr * (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps), m, v

    def sgd(p, g, velocity, t, lr=0.01, momentum=0.9):
        velocity = momentum * velocity + g
        return p - lr * velocity, velocity

    def adagrad(p, g, sum_sq, t, lr=0.01, eps=1e-10):
        sum_sq = sum_sq + g * g
        return p - lr * g / (jnp.sqrt(sum_sq) + eps), sum_sq

    return {"adam": adam, "sgd momentum": sgd, "adagrad": adagrad}[name]


def _jax_step(name, states, param, grad):
    jax = pytest.importorskip("jax")

    n_state = len(states)
    update = jax_jit(_jax_update(name), donate_argnums=(0, *range(2, 2 + n_state)))
    buffers = [jax.device_put(param), *(jax.device_put(np.zeros_like(param)) for _ in states)]
    g, counter = jax.device_put(grad), iter(range(1, 1 << 30))

    def step():
        buffers[:] = update(buffers[0], g, *buffers[1:], float(next(counter)))
        return buffers
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_optimizer_step(measure, name, impl):
    fn, kwargs, states, torch_name, torch_kwargs = CASES[name]
    param, grad = _buffers()
    if impl.startswith("torch"):
        step = _torch_step(impl, torch_name, torch_kwargs, param, grad)
    elif impl == "jax":
        step = _jax_step(name, states, param, grad)
    else:
        step = _kernel_step(fn, kwargs, states, param, grad)
    updated = 1 + len(states)  # param and state: read and written; grad: read
    # the roof: an in-place read-modify-write over the step's working set (param, grad, state)
    measure(step, group=f"{name} 10M f32", impl=impl, bytes=(2 * updated + 1) * param.nbytes,
            working_set=(updated + 1) * param.nbytes, in_place=True,
            backend=impl if impl in ("numpy", "numba") else None)
    assert np.isfinite(param[:1000]).all()
