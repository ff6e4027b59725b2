"""BatchNorm kernels on every backend: against torch.nn.BatchNorm1d (forward in training and
evaluation, running statistics, gradients) in float64, against the reference in float32, and the
public API's argument checks."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kernels
from helpers import arrays, assert_close, reference

ROWS = st.integers(2, 40)
COLS = st.integers(1, 12)


def _torch_step(x, gamma, beta, mean, var, dy, momentum, eps):
    bn = torch.nn.BatchNorm1d(x.shape[1], momentum=momentum, eps=eps, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(gamma))
        bn.bias.copy_(torch.from_numpy(beta))
        bn.running_mean.copy_(torch.from_numpy(mean))
        bn.running_var.copy_(torch.from_numpy(var))
    xt = torch.from_numpy(x).requires_grad_()
    y = bn(xt)
    y.backward(torch.from_numpy(dy))
    bn.eval()
    with torch.no_grad():
        y_eval = bn(xt)
    return (y.detach().numpy(), bn.running_mean.numpy(), bn.running_var.numpy(), xt.grad.numpy(),
            bn.weight.grad.numpy(), bn.bias.grad.numpy(), y_eval.numpy())


@given(data=st.data(), n=ROWS, c=COLS, momentum=st.sampled_from([0.0, 0.1, 0.9, 1.0]))
def test_batchnorm_matches_torch(backend, data, n, c, momentum):
    x = data.draw(arrays((n, c), np.float64)) + 5  # an offset: the variance must not cancel
    gamma, beta, dy = (data.draw(arrays(s, np.float64, layout=False)) for s in ((c,), (c,), (n, c)))
    mean, var = np.zeros(c), np.ones(c) * 2
    eps = 1e-3
    expected = _torch_step(x, gamma, beta, mean, var, dy, momentum, eps)
    rm, rv = backend.to(mean.copy()), backend.to(var.copy())
    to = backend.to
    y, xhat, inv_std = kernels.batchnorm_forward(to(x), to(gamma), to(beta), rm, rv, momentum=momentum, eps=eps)
    dx, dgamma, dbeta = kernels.batchnorm_backward(to(dy), xhat, to(gamma), inv_std)
    y_eval = kernels.batchnorm_eval(to(x), to(gamma), to(beta), rm, rv, eps=eps)
    got = [backend.get(a) for a in (y, rm, rv, dx, dgamma, dbeta, y_eval)]
    for name, g, e in zip(["y", "running_mean", "running_var", "dx", "dgamma", "dbeta", "y_eval"], got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-9, err_msg=name)


@given(data=st.data(), n=ROWS, c=COLS)
def test_float32_matches_reference(fast_backend, data, n, c):
    x = data.draw(arrays((n, c), np.float32))
    gamma, beta, dy = (data.draw(arrays(s, np.float32, layout=False)) for s in ((c,), (c,), (n, c)))
    to = fast_backend.to
    state = [np.zeros(c, np.float32), np.ones(c, np.float32)]
    ref_state = [a.copy() for a in state]
    rm, rv = to(state[0]), to(state[1])
    y, xhat, inv_std = kernels.batchnorm_forward(to(x), to(gamma), to(beta), rm, rv)
    got = [y, rm, rv, *kernels.batchnorm_backward(to(dy), xhat, to(gamma), inv_std)]
    ry, rxhat, rinv = reference(kernels.batchnorm_forward, x, gamma, beta, *ref_state)
    expected = [ry, *ref_state, *reference(kernels.batchnorm_backward, dy, rxhat, gamma, rinv)]
    scale = np.abs(dy).sum(axis=0).max() * (1 + np.abs(gamma).max())
    # xhat's own float32 rounding, amplified by inv_std: large where a column is (nearly) constant, e.g.
    # a zero-stride x, where the compiled backends' float64 statistics give xhat = 0 exactly
    xhat_error = 8 * np.finfo(np.float32).eps * (1 + np.abs(x).max()) * float(np.max(rinv, initial=0))
    for g, e in zip(got, expected):
        assert_close(fast_backend.get(g), e, rtol=1e-4, atol=(1e-5 + xhat_error) * scale)


def test_bad_arguments_raise_naming_them():
    x = np.ones((4, 3), np.float32)
    c = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="gamma"):
        kernels.batchnorm_forward(x, c[:2], c, c.copy(), c.copy())
    with pytest.raises(TypeError, match="dtype"):
        kernels.batchnorm_forward(x, c.astype(np.float64), c, c.copy(), c.copy())
    with pytest.raises(ValueError, match="momentum"):
        kernels.batchnorm_forward(x, c, c, c.copy(), c.copy(), momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        kernels.batchnorm_eval(x, c, c, c, c, eps=0.0)
    with pytest.raises(ValueError, match="xhat"):
        kernels.batchnorm_backward(x, x[:2], c, c)
    with pytest.raises(ValueError, match="running_mean"):
        kernels.batchnorm_forward(x, c, c, np.ones(6, np.float32)[::2], c.copy())
