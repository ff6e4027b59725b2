"""The training step's bookkeeping kernels (count_correct, check_step): every backend against the NumPy
reference over many shapes and special values, the sticky non-finite flag, the clipping scale bit for
bit as the trainer used to compute it on the host, and the public API's argument checks."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kernels
from helpers import SIZES_2D, reference

NORM_COUNTS = st.sampled_from([0, 1, 2, 3, 7, 8, 9, 17])


def _outputs(rng, rows, cols, dtype, special):
    out = rng.standard_normal((rows, cols)).astype(dtype)
    if special and out.size:
        out.flat[rng.integers(out.size, size=3)] = rng.choice([np.nan, np.inf, -np.inf, 0.0], 3)
    if cols > 1 and rows:
        out[0, 1] = out[0, 0]  # a tie: the first maximum wins
    return out


@given(rows=SIZES_2D, cols=SIZES_2D, dtype=st.sampled_from([np.float32, np.float64]), special=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_count_correct_counts_argmax_hits_and_rows_on_the_right_side(backend, rows, cols, dtype, special, seed):
    """Against counts written here: rows whose np.argmax (first maximum, NaN first) is the label (none without
    columns), and rows whose every output is > 0 exactly where its target is > threshold (all, without
    columns); only the correct count changes, adding to what is there."""
    rng = np.random.default_rng(seed)
    out = _outputs(rng, rows, cols, dtype, special)
    labels = rng.integers(0, max(cols, 1), rows)
    targets = rng.choice([0.0, 0.3, 0.7, 1.0], (rows, cols)).astype(dtype)
    hits = int(np.sum(np.argmax(out, axis=1) == labels)) if cols else 0
    sides = sum(all((o > 0) == (t > 0.5) for o, t in zip(out_row, target_row))
                for out_row, target_row in zip(out, targets))
    for target, threshold, count in ((labels, 0.0, hits), (targets, 0.5, sides)):
        metrics = backend.to(np.full(kernels.metrics_size(1), 2.0))
        kernels.count_correct(backend.to(out), backend.to(target), metrics, threshold=threshold)
        got = kernels.unpack_metrics(backend.get(metrics), 1)
        assert got["correct"] == 2 + count
        got["correct"] = 2
        for value in got.values():
            np.testing.assert_array_equal(value, 2.0)


def test_count_correct_on_known_rows(backend):
    nan = np.nan
    out = np.array([[1, 3, 3], [nan, 5, 1], [2, nan, 9], [0, 0, -1], [-1, 2, 0]], np.float32)
    metrics = backend.to(np.zeros(kernels.metrics_size(0)))
    # argmax: 1 (first of a tie), 0 (NaN first), 1 (NaN wins), 0 (tie), 1
    kernels.count_correct(backend.to(out), backend.to(np.array([1, 0, 2, 0, 2])), metrics)
    assert kernels.unpack_metrics(backend.get(metrics), 0)["correct"] == 3
    # thresholds: every output on its target's side of 0 (targets > 0.5 mean "positive"); rows 0 and 3 miss
    targets = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1], [0, 1, 0], [0, 1, 0]], np.float32)
    kernels.count_correct(backend.to(out), backend.to(targets), metrics, threshold=0.5)
    assert kernels.unpack_metrics(backend.get(metrics), 0)["correct"] == 3 + 3


def _step(backend, loss, norms, metrics, scale_dtype, max_norm, rows=5):
    """check_step on ``backend`` from host values; returns the host metrics and scale."""
    scale = backend.to(np.full(1, 7.0, scale_dtype))
    m = backend.to(metrics.copy())
    if backend.is_cuda:
        loss = backend.to(np.array([loss], scale_dtype))  # as the cuda loss kernels return it: on the device
    kernels.check_step(loss, backend.to(norms), m, scale, rows=rows, max_norm=max_norm)
    return backend.get(m), backend.get(scale)


@given(layers=NORM_COUNTS, seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]),
       max_norm=st.sampled_from([None, 1e-3, 0.5, 3.0, 1e6]), bad=st.sampled_from([None, "loss", "norm"]))
def test_check_step_matches_reference(fast_backend, layers, seed, dtype, max_norm, bad):
    """The compiled backends against the reference (whose own results the tests below check by hand)."""
    backend = fast_backend
    rng = np.random.default_rng(seed)
    metrics = np.zeros(kernels.metrics_size(layers))
    for _ in range(3):  # three steps in a row: sums, then (maybe) a bad step that sticks
        norms = rng.random(layers) * 10.0 ** rng.integers(-3, 3, layers)
        loss = dtype(rng.random() * 3)
        if bad == "loss" and rng.random() < 0.5:
            loss = dtype(rng.choice([np.nan, np.inf]))
        if bad == "norm" and layers and rng.random() < 0.5:
            norms[rng.integers(layers)] = rng.choice([np.nan, np.inf])
        got, scale = _step(backend, loss, norms, metrics, dtype, max_norm)
        expected, expected_scale = np.zeros_like(metrics), np.zeros(1, dtype)
        expected[...] = metrics
        reference(kernels.check_step, loss, norms, expected, expected_scale, rows=5, max_norm=max_norm)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(scale, expected_scale)
        metrics = expected


def test_clipping_scale_is_what_the_trainer_computed_on_the_host(backend):
    """The old host code: scale = max_norm / (sqrt(np.sum(norms**2)) + 1e-6), rounded to the gradient's
    dtype; the kernels sum the squares in NumPy's pairwise order, so it is bit for bit the same."""
    rng = np.random.default_rng(4)
    for layers in (1, 2, 5, 8, 9, 13, 30):
        norms = rng.random(layers) * 10.0 ** rng.integers(-2, 3, layers)
        max_norm = 0.5 * float(np.sqrt(np.sum(norms**2)))
        _, scale = _step(backend, np.float32(1.0), norms, np.zeros(kernels.metrics_size(layers)), np.float32,
                         max_norm)
        assert scale[0] == np.float32(max_norm / (float(np.sqrt(np.sum(norms**2))) + 1e-6))


def test_a_non_finite_step_is_recorded_once_and_sticks(backend):
    norms_ok, norms_bad = np.array([1.0, 2.0]), np.array([3.0, np.nan])
    metrics = np.zeros(kernels.metrics_size(2))
    metrics, scale = _step(backend, np.float64(0.5), norms_ok, metrics, np.float64, None, rows=4)
    assert scale[0] == 1.0
    metrics, scale = _step(backend, np.float64(0.25), norms_bad, metrics, np.float64, None, rows=4)
    assert scale[0] == 0.0
    metrics, scale = _step(backend, np.float64(np.inf), norms_ok, metrics, np.float64, None, rows=4)
    assert scale[0] == 0.0  # every later step is skipped too
    values = kernels.unpack_metrics(metrics, 2)
    assert values["steps"] == 3 and values["bad_step"] == 2 and values["bad_loss"] == 0.25
    assert values["loss_sum"] == 2.0 and list(values["norm_sums"]) == [1.0, 2.0]
    assert values["bad_norms"][0] == 3.0 and math.isnan(values["bad_norms"][1])


CHECK_STEP_ERRORS = {
    "norms dtype": (dict(norms=np.ones(2, np.float32)), TypeError, "norms must have dtype float64"),
    "metrics size": (dict(metrics=np.zeros(4)), ValueError, "metrics must have shape"),
    "metrics dtype": (dict(metrics=np.zeros(9, np.float32)), TypeError, "metrics must be a float64 array"),
    "scale shape": (dict(scale=np.ones(2, np.float32)), ValueError, "scale must have shape \\(1,\\)"),
    "rows": (dict(rows=0), ValueError, "rows must be a positive integer"),
    "max_norm": (dict(max_norm=-1.0), ValueError, "max_norm must be a finite number in \\(0"),
    "loss": (dict(loss="1"), TypeError, "loss must be a real number"),
    "loss shape": (dict(loss=np.ones(2)), ValueError, "loss must be a scalar or a 1-element array"),
}


@pytest.mark.parametrize("change, error, message", CHECK_STEP_ERRORS.values(), ids=CHECK_STEP_ERRORS)
def test_check_step_rejects_bad_arguments(change, error, message):
    args = dict(loss=np.float32(1), norms=np.ones(2), metrics=np.zeros(kernels.metrics_size(2)),
                scale=np.ones(1, np.float32), rows=3, max_norm=None)
    args.update(change)
    with pytest.raises(error, match=message):
        kernels.check_step(**args)


def test_count_correct_rejects_bad_arguments():
    out, metrics = np.zeros((4, 3), np.float32), np.zeros(kernels.metrics_size(0))
    with pytest.raises(ValueError, match="target must have shape \\(4,\\)"):
        kernels.count_correct(out, np.zeros(3, np.int64), metrics)
    with pytest.raises(ValueError, match="target must have shape \\(4, 3\\)"):
        kernels.count_correct(out, np.zeros((4, 2), np.float32), metrics)
    with pytest.raises(ValueError, match="metrics must be a metrics buffer"):
        kernels.count_correct(out, np.zeros(4, np.int64), np.zeros(2))
    with pytest.raises(TypeError, match="metrics must be a float64 array"):
        kernels.count_correct(out, np.zeros(4, np.int64), metrics.astype(np.float32))
