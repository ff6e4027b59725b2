"""Fused optimizer steps on 10M float32 parameters: NumPy reference vs numba vs torch.optim.

Each step updates the buffers in place, so every round times a real step on evolving state. For torch,
``.grad`` is set once and ``optimizer.step()`` is timed ("torch" is the fused CPU kernel, the fastest
torch has; "torch-foreach" the multi-tensor path). ``bytes`` is the real traffic of one step: each buffer
read once and each updated one written once.
"""

import numpy as np
import pytest

import kernels

N = 10_000_000
IMPLS = ["numpy", "numba", "torch", "torch-foreach"]

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


def _kernel_step(impl, fn, kwargs, states, param, grad):
    state = {name: np.zeros_like(param) for name in states}
    takes_step = fn in (kernels.adam_step, kernels.sgd_step)
    counter = iter(range(1, 1 << 30))

    def step():
        with kernels.use_backend(impl):
            fn(param, grad, **state, **kwargs, **(dict(step=next(counter)) if takes_step else {}))
    return step


def _torch_step(impl, torch_name, torch_kwargs, param, grad):
    torch = pytest.importorskip("torch")
    weight = torch.from_numpy(param).requires_grad_()
    weight.grad = torch.from_numpy(grad)
    mode = dict(foreach=True) if impl == "torch-foreach" else dict(fused=True)
    return getattr(torch.optim, torch_name)([weight], **torch_kwargs, **mode).step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_optimizer_step(measure, name, impl):
    fn, kwargs, states, torch_name, torch_kwargs = CASES[name]
    param, grad = _buffers()
    if impl.startswith("torch"):
        step = _torch_step(impl, torch_name, torch_kwargs, param, grad)
    else:
        step = _kernel_step(impl, fn, kwargs, states, param, grad)
    updated = 1 + len(states)  # param and state: read and written; grad: read
    measure(step, group=f"{name} 10M f32", impl=impl, bytes=(2 * updated + 1) * param.nbytes)
    assert np.isfinite(param[:1000]).all()
