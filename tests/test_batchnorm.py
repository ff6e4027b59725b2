"""BatchNorm kernels on every backend: against torch.nn.BatchNorm1d (forward in training and
evaluation, running statistics, gradients) in float64, against the reference in float32, a batch split
into parts (as ranks hold it: statistics and backward sums of each part, merged by the kernels) against
the whole batch, finite-difference gradients, and the public API's argument checks."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kernels
from helpers import arrays, assert_close, numeric_grad, reference

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
    stats, sums = kernels.batchnorm_stats(to(x)), kernels.batchnorm_backward_sums(to(dy), xhat)
    assert stats.dtype == sums.dtype == np.float64
    ref_stats, size = reference(kernels.batchnorm_stats, x), 1 + float(np.abs(x).max())
    count, mean, m2 = fast_backend.get(stats)
    np.testing.assert_array_equal(count, ref_stats[0])
    assert_close(mean, ref_stats[1], rtol=1e-6, atol=1e-6 * size)
    assert_close(m2, ref_stats[2], rtol=1e-5, atol=1e-6 * n * size**2)
    ref_sums = reference(kernels.batchnorm_backward_sums, dy, fast_backend.get(xhat))  # the same xhat
    assert_close(fast_backend.get(sums), ref_sums, rtol=1e-4, atol=1e-4 * np.abs(dy).sum(axis=0).max())
    scale = np.abs(dy).sum(axis=0).max() * (1 + np.abs(gamma).max())
    # xhat's own float32 rounding, amplified by inv_std: large where a column is (nearly) constant, e.g.
    # a zero-stride x, where the compiled backends' float64 statistics give xhat = 0 exactly
    xhat_error = 8 * np.finfo(np.float32).eps * (1 + np.abs(x).max()) * float(np.max(rinv, initial=0))
    for g, e in zip(got, expected):
        assert_close(fast_backend.get(g), e, rtol=1e-4, atol=(1e-5 + xhat_error) * scale)


def _cuts(data, n):
    """Split points of n rows into 1-4 parts (empty parts included: ranks never have one, the merge allows it)."""
    return sorted(data.draw(st.lists(st.integers(0, n), min_size=0, max_size=3)))


def _parts_step(backend, x, gamma, beta, dy, cuts, momentum=0.1, eps=1e-3):
    """Forward and backward of a batch held in parts (split at ``cuts``), each part with the statistics
    and the backward sums of all of them stacked, as the ranks do; returns the parts' results joined."""
    to, get = backend.to, backend.get
    parts = [(x[a:b], dy[a:b]) for a, b in zip([0] + cuts, cuts + [len(x)])]
    stats = to(np.stack([get(kernels.batchnorm_stats(to(xp))) for xp, _ in parts]))
    results = []
    for xp, dyp in parts:
        mean, var = to(np.zeros(x.shape[1])), to(np.ones(x.shape[1]) * 2)
        y, xhat, inv_std = kernels.batchnorm_forward(to(xp), to(gamma), to(beta), mean, var, momentum=momentum,
                                                     eps=eps, stats=stats)
        results.append([to, xhat, inv_std, dyp, [get(a) for a in (y, mean, var)]])
    sums = to(np.stack([get(kernels.batchnorm_backward_sums(to(dyp), xhat)) for _, xhat, _, dyp, _ in results]))
    out = []
    for _, xhat, inv_std, dyp, (y, mean, var) in results:
        dx, dgamma, dbeta = kernels.batchnorm_backward(to(dyp), xhat, to(gamma), inv_std, sums=sums)
        out.append((y, mean, var, get(dx), get(dgamma), get(dbeta)))
    y, means, variances, dx, dgammas, dbetas = zip(*out)
    return np.concatenate(y), means, variances, np.concatenate(dx), sum(dgammas), sum(dbetas)


@given(data=st.data(), n=ROWS, c=COLS, offset=st.sampled_from([0.0, 5.0, 1e6]))
def test_a_batch_in_parts_matches_torch_on_the_whole_batch(backend, data, n, c, offset):
    """Every part normalises with the whole batch's statistics and gets the whole batch's dx; the parts'
    dgamma/dbeta add up to the batch's. An offset of 1e6 (spread ~3): the merge has no cancellation,
    where sum(x^2) - n mean^2 would lose ~1e-4 of the variance in float64."""
    x = data.draw(arrays((n, c), np.float64, layout=False)) + offset
    gamma, beta, dy = (data.draw(arrays(s, np.float64, layout=False)) for s in ((c,), (c,), (n, c)))
    y, means, variances, dx, dgamma, dbeta = _parts_step(backend, x, gamma, beta, dy, _cuts(data, n))
    ty, t_mean, t_var, tdx, tdgamma, tdbeta, _ = _torch_step(x, gamma, beta, np.zeros(c), np.ones(c) * 2, dy,
                                                            0.1, 1e-3)
    np.testing.assert_allclose(y, ty, rtol=1e-9, atol=1e-9)
    for mean, var in zip(means, variances):  # every part updates its running estimates the same way
        np.testing.assert_allclose(mean, t_mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(var, t_var, rtol=1e-9, atol=1e-12)
    for name, got, expected in [("dx", dx, tdx), ("dgamma", dgamma, tdgamma), ("dbeta", dbeta, tdbeta)]:
        np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-8 * np.abs(dy).sum(), err_msg=name)


@given(data=st.data(), n=st.integers(2, 9), c=st.integers(1, 4))
def test_gradients_in_parts_match_finite_differences(backend, data, n, c):
    """float64: d(sum(w * y))/dx, dgamma, dbeta with the batch in parts, against central differences of
    the whole-batch forward."""
    x, w = (data.draw(arrays((n, c), np.float64, scale=1.0, layout=False)) for _ in range(2))
    gamma, beta = (data.draw(arrays((c,), np.float64, scale=1.0, layout=False)) for _ in range(2))
    cuts = _cuts(data, n)
    _, _, _, dx, dgamma, dbeta = _parts_step(backend, x, gamma, beta, w, cuts)

    def loss(x=x, gamma=gamma, beta=beta):
        with kernels.use_backend("numpy"):
            y, _, _ = kernels.batchnorm_forward(x, gamma, beta, np.zeros(c), np.ones(c), eps=1e-3)
        return float((w * y).sum())

    assert_close(dx, numeric_grad(lambda v: loss(x=v), x), rtol=1e-5, atol=1e-6)
    assert_close(dgamma, numeric_grad(lambda v: loss(gamma=v), gamma), rtol=1e-5, atol=1e-6)
    assert_close(dbeta, numeric_grad(lambda v: loss(beta=v), beta), rtol=1e-5, atol=1e-6)


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
    with pytest.raises(TypeError, match="stats.*float64"):
        kernels.batchnorm_forward(x, c, c, c.copy(), c.copy(), stats=np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match=r"stats must have shape \(3, 3\) or \(parts, 3, 3\)"):
        kernels.batchnorm_forward(x, c, c, c.copy(), c.copy(), stats=np.ones((2, 3)))
    with pytest.raises(ValueError, match="stats"):
        kernels.batchnorm_forward(x, c, c, c.copy(), c.copy(), stats=np.ones((0, 3, 3)))
    with pytest.raises(ValueError, match="sums"):
        kernels.batchnorm_backward(x, x, c, c, sums=np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="xhat"):
        kernels.batchnorm_backward_sums(x, x[:, :2])
    with pytest.raises(ValueError, match="x must be 2-D"):
        kernels.batchnorm_stats(c)
