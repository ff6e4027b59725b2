"""BatchNorm kernels on every backend: against torch.nn.BatchNorm1d (forward in training and
evaluation, running statistics, gradients) in float64, against the reference in float32, a batch split
into parts (as ranks hold it: statistics and backward sums of each part, merged by the kernels) against
the whole batch, finite-difference gradients, edge shapes (0 and 1 rows, no columns), and the public
API's argument checks."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kernels
from helpers import LAYOUTS, arrays, assert_close, numeric_grad, reference, with_layout

ROWS = st.integers(2, 40)
COLS = st.integers(1, 12)
EPS32 = float(np.finfo(np.float32).eps)


def _torch_step(x, gamma, beta, mean, var, dy, momentum, eps):
    bn = torch.nn.BatchNorm1d(x.shape[1], momentum=momentum, eps=eps, dtype=torch.float64)
    x, gamma, beta, mean, var, dy = (torch.from_numpy(np.array(a)) for a in (x, gamma, beta, mean, var, dy))
    with torch.no_grad():  # np.array: torch takes neither negative strides nor read-only arrays
        bn.weight.copy_(gamma)
        bn.bias.copy_(beta)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    xt = x.requires_grad_()
    y = bn(xt)
    y.backward(dy)
    bn.eval()
    with torch.no_grad():
        y_eval = bn(xt)
    return (y.detach().numpy(), bn.running_mean.numpy(), bn.running_var.numpy(), xt.grad.numpy(),
            bn.weight.grad.numpy(), bn.bias.grad.numpy(), y_eval.numpy())


@given(data=st.data(), n=ROWS, c=COLS, momentum=st.sampled_from([0.0, 0.1, 0.9, 1.0]))
def test_batchnorm_matches_torch(backend, data, n, c, momentum):
    x = data.draw(arrays((n, c), np.float64, layout=False)) + 5  # an offset: the variance must not cancel
    x = with_layout(x, data.draw(LAYOUTS))
    gamma, beta, dy = (data.draw(arrays(s, np.float64)) for s in ((c,), (c,), (n, c)))
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


def _exact_forward(x, gamma, beta, momentum=0.1, eps=1e-5):
    """Training forward in float64 from float32 inputs, running statistics from (0, 1): (y, running_mean,
    running_var)."""
    x, gamma, beta = (a.astype(np.float64) for a in (x, gamma, beta))
    n, mean, var = len(x), x.mean(axis=0), x.var(axis=0)
    y = gamma * (x - mean) / np.sqrt(var + eps) + beta
    return y, momentum * mean, (1 - momentum) + momentum * n / (n - 1) * var


def _exact_eval(x, gamma, beta, mean, var, eps=1e-5):
    x, gamma, beta, mean, var = (a.astype(np.float64) for a in (x, gamma, beta, mean, var))
    return (x - mean) * (gamma / np.sqrt(var + eps)) + beta


def _assert_float32_close(name, got, ref, exact, own_error):
    """``got`` within the reference's own float32 error (measured against the float64 ``exact`` result) plus
    ``own_error`` (a bound on got's, a few of its roundings) of the reference, twice over for slack."""
    ref = np.asarray(ref, np.float64)
    error, atol = np.abs(got - ref), 2 * (np.abs(ref - exact) + own_error)
    bad = [tuple(i) for i in np.argwhere(~(error <= atol))]
    assert not bad, (f"{name}: {len(bad)} of {error.size} beyond tolerance, first at {bad[0]}: got {got[bad[0]]!r}, "
                     f"reference {ref[bad[0]]!r}, atol {atol[bad[0]]:.3g}")


@given(data=st.data(), n=ROWS, c=COLS)
def test_float32_matches_reference(fast_backend, data, n, c):
    """Forward, running statistics and evaluation each within the float32 error of the reference (which
    is measured: it computes the mean in float32) plus a few roundings of the compiled backends (float64
    statistics, the mean rounded once to float32); gradients, statistics and sums within their sums' scale."""
    x, dy = data.draw(arrays((n, c), np.float32)), data.draw(arrays((n, c), np.float32))
    gamma, beta = data.draw(arrays((c,), np.float32)), data.draw(arrays((c,), np.float32))
    to = fast_backend.to
    state = [np.zeros(c, np.float32), np.ones(c, np.float32)]
    ref_state = [a.copy() for a in state]
    rm, rv = to(state[0]), to(state[1])
    y, xhat, inv_std = kernels.batchnorm_forward(to(x), to(gamma), to(beta), rm, rv)
    ry, rxhat, rinv = reference(kernels.batchnorm_forward, x, gamma, beta, *ref_state)
    x64 = x.astype(np.float64)
    mean64, var64 = x64.mean(axis=0), x64.var(axis=0)
    shift = np.abs(mean64.astype(np.float32) - mean64)  # the rounding of numba's float32 copy of the mean
    inv = 1 / np.sqrt(var64 + 1e-5)
    xhat_max = (np.abs(x64 - mean64) * inv).max(axis=0)
    # xhat: the mean's rounding times inv_std, and a few ulps of xhat (x - mean, the product, inv_std itself)
    xhat_bound = shift * inv + 8 * EPS32 * xhat_max
    y_error = np.abs(gamma) * xhat_bound + 2 * EPS32 * (np.abs(gamma) * xhat_max + np.abs(beta))
    exact_y, exact_mean, exact_var = _exact_forward(x, gamma, beta)
    _assert_float32_close("y", fast_backend.get(y), ry, exact_y, y_error)
    _assert_float32_close("running_mean", fast_backend.get(rm), ref_state[0], exact_mean, EPS32 * np.abs(exact_mean))
    # running_var: numba's squared deviations from the rounded mean, each rounded, and the result's rounding
    var_error = 0.1 * n / (n - 1) * (2 * EPS32 * var64 + shift**2) + EPS32 * exact_var
    _assert_float32_close("running_var", fast_backend.get(rv), ref_state[1], exact_var, var_error)

    mean_e = data.draw(arrays((c,), np.float32))
    var_e = with_layout(np.abs(data.draw(arrays((c,), np.float32, layout=False))) + 0.01, data.draw(LAYOUTS))
    y_eval = fast_backend.get(kernels.batchnorm_eval(to(x), to(gamma), to(beta), to(mean_e), to(var_e)))
    ry_eval = reference(kernels.batchnorm_eval, x, gamma, beta, mean_e, var_e)
    scaled = np.abs(x64 - mean_e) * np.abs(gamma / np.sqrt(var_e.astype(np.float64) + 1e-5))
    _assert_float32_close("y_eval", y_eval, ry_eval, _exact_eval(x, gamma, beta, mean_e, var_e),
                          4 * EPS32 * (scaled + np.abs(beta)))

    got = kernels.batchnorm_backward(to(dy), xhat, to(gamma), inv_std)
    expected = reference(kernels.batchnorm_backward, dy, rxhat, gamma, rinv)
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
    xhat_error = 8 * EPS32 * (1 + np.abs(x).max()) * float(np.max(rinv, initial=0))
    for name, g, e in zip(["dx", "dgamma", "dbeta"], got, expected):
        assert_close(fast_backend.get(g), e, rtol=1e-4, atol=(1e-5 + xhat_error) * scale, err_msg=name)


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
    gamma, beta, dy = (data.draw(arrays(s, np.float64)) for s in ((c,), (c,), (n, c)))
    y, means, variances, dx, dgamma, dbeta = _parts_step(backend, x, gamma, beta, dy, _cuts(data, n))
    ty, t_mean, t_var, tdx, tdgamma, tdbeta, _ = _torch_step(x, gamma, beta, np.zeros(c), np.ones(c) * 2, dy,
                                                            0.1, 1e-3)
    # x - mean loses ~eps * |x| to cancellation (offset 1e6, nearly equal rows), scaled by gamma * inv_std
    cancel = 8 * np.finfo(np.float64).eps * np.abs(x).max(0) * np.abs(gamma) / np.sqrt(x.var(0) + 1e-3)
    np.testing.assert_allclose(y, ty, rtol=1e-9, atol=1e-9 + cancel.max())
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
    with pytest.raises(ValueError, match=r"^gamma must have shape \(3,\)"):
        kernels.batchnorm_forward(x, c[:2], c, c.copy(), c.copy())
    with pytest.raises(TypeError, match=r"^gamma must have the same dtype as x \(float32\)"):
        kernels.batchnorm_forward(x, c.astype(np.float64), c, c.copy(), c.copy())
    with pytest.raises(ValueError, match=r"^momentum\b"):
        kernels.batchnorm_forward(x, c, c, c.copy(), c.copy(), momentum=1.5)
    with pytest.raises(ValueError, match=r"^eps\b"):
        kernels.batchnorm_eval(x, c, c, c, c, eps=0.0)
    with pytest.raises(ValueError, match=r"^xhat must have shape \(4, 3\)"):
        kernels.batchnorm_backward(x, x[:2], c, c)
    with pytest.raises(ValueError, match=r"^running_mean\b"):
        kernels.batchnorm_forward(x, c, c, np.ones(6, np.float32)[::2], c.copy())
    with pytest.raises(TypeError, match=r"^stats must have dtype float64"):
        kernels.batchnorm_forward(x, c, c, c.copy(), c.copy(), stats=np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match=r"^stats must have shape \(3, 3\) or \(parts, 3, 3\)"):
        kernels.batchnorm_forward(x, c, c, c.copy(), c.copy(), stats=np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"^stats must have shape"):
        kernels.batchnorm_forward(x, c, c, c.copy(), c.copy(), stats=np.ones((0, 3, 3)))
    with pytest.raises(ValueError, match=r"^sums must have shape"):
        kernels.batchnorm_backward(x, x, c, c, sums=np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"^xhat must have shape \(4, 3\)"):
        kernels.batchnorm_backward_sums(x, x[:, :2])
    with pytest.raises(ValueError, match=r"^x must be 2-D"):
        kernels.batchnorm_stats(c)


@pytest.mark.parametrize("n", [0, 1])
def test_training_on_fewer_than_two_rows_raises(backend, n):
    """As torch.nn.BatchNorm1d, training needs 2 rows (a variance per column), with the batch's own or
    given statistics; nothing is written. Evaluation takes any number of rows."""
    x, c = backend.to(np.ones((n, 3))), backend.to(np.ones(3))
    mean, var = backend.to(np.zeros(3)), backend.to(np.ones(3))
    with pytest.raises(ValueError, match=rf"^x must have at least 2 rows in training .*got shape \({n}, 3\)"):
        kernels.batchnorm_forward(x, c, c, mean, var)
    if not backend.is_cuda:  # device statistics are not read (a synchronisation)
        stats = np.stack([kernels.batchnorm_stats(x), kernels.batchnorm_stats(np.ones((0, 3)))])
        with pytest.raises(ValueError, match=rf"^stats must count at least 2 rows in training .*got {n} rows"):
            kernels.batchnorm_forward(x, c, c, mean, var, stats=stats)
    np.testing.assert_array_equal(backend.get(mean), 0)
    np.testing.assert_array_equal(backend.get(var), 1)
    y = backend.get(kernels.batchnorm_eval(x, c, c, mean, var))
    assert y.shape == (n, 3)
    assert_close(y, 1 / np.sqrt(1 + 1e-5) + 1)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_statistics_and_gradients_of_few_rows_match_the_reference(backend, n):
    """A part of a batch may hold 0 or 1 rows: its statistics, backward sums and gradients (its own sums,
    or the batch's) are the reference's; 0 rows give an empty dx and zero dgamma, dbeta."""
    rng = np.random.default_rng(n)
    x, dy = rng.standard_normal((n, 3)), rng.standard_normal((n, 3))
    gamma, inv_std = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    to, get = backend.to, backend.get
    assert_close(get(kernels.batchnorm_stats(to(x))), reference(kernels.batchnorm_stats, x))
    assert_close(get(kernels.batchnorm_backward_sums(to(dy), to(x))), reference(kernels.batchnorm_backward_sums, dy, x))
    other = reference(kernels.batchnorm_backward_sums, rng.standard_normal((4, 3)), rng.standard_normal((4, 3)))
    for sums in (None, np.stack([other, reference(kernels.batchnorm_backward_sums, dy, x)])):
        got = kernels.batchnorm_backward(to(dy), to(x), to(gamma), to(inv_std), sums=to(sums))
        expected = reference(kernels.batchnorm_backward, dy, x, gamma, inv_std, sums=sums)
        for name, g, e in zip(["dx", "dgamma", "dbeta"], got, expected):
            assert_close(get(g), e, err_msg=name)
            assert get(g).shape == e.shape
    stats = np.stack([reference(kernels.batchnorm_stats, a) for a in (x, rng.standard_normal((4, 3)))])
    state = [to(np.zeros(3)), to(np.ones(3))]
    y, xhat, got_inv = kernels.batchnorm_forward(to(x), to(gamma), to(gamma), *state, stats=to(stats))
    ref_state = [np.zeros(3), np.ones(3)]
    expected = [*reference(kernels.batchnorm_forward, x, gamma, gamma, *ref_state, stats=stats), *ref_state]
    for name, g, e in zip(["y", "xhat", "inv_std", "running_mean", "running_var"], [y, xhat, got_inv, *state],
                          expected):
        assert_close(get(g), e, err_msg=name)


def test_no_columns_give_empty_results(backend):
    """A batch with no columns works in every form and gives empty results."""
    to, get = backend.to, backend.get
    x, c = to(np.ones((4, 0))), to(np.ones(0))
    mean, var = to(np.zeros(0)), to(np.ones(0))
    stats = kernels.batchnorm_stats(x)
    assert get(stats).shape == (3, 0)
    for parts in (None, stats, to(np.zeros((2, 3, 0)))):
        y, xhat, inv_std = kernels.batchnorm_forward(x, c, c, mean, var, stats=parts)
        assert [get(a).shape for a in (y, xhat, inv_std)] == [(4, 0), (4, 0), (0,)]
    assert get(kernels.batchnorm_eval(x, c, c, mean, var)).shape == (4, 0)
    sums = kernels.batchnorm_backward_sums(x, xhat)
    assert get(sums).shape == (3, 0)
    for parts in (None, sums, to(np.zeros((2, 3, 0)))):
        dx, dgamma, dbeta = kernels.batchnorm_backward(x, xhat, c, inv_std, sums=parts)
        assert [get(a).shape for a in (dx, dgamma, dbeta)] == [(4, 0), (0,), (0,)]
    with pytest.raises(ValueError, match=r"^x must have at least 2 rows"):
        kernels.batchnorm_forward(to(np.ones((1, 0))), c, c, mean, var)
