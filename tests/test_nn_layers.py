"""nn layers: whole-model gradient check, initialisation, Dropout and BatchNorm in training vs evaluation,
the flat parameter buffer."""

import numpy as np
import pytest
import torch
from helpers import numeric_grad, reference
from hypothesis import given
from hypothesis import strategies as st
from sklearn.datasets import make_moons

import nn


def _targets(loss, n, k, rng):
    if loss == "softmax_cross_entropy":
        return rng.integers(0, k, n)
    if loss == "binary_cross_entropy":
        return rng.uniform(0, 1, (n, k))
    if loss == "hinge":
        return rng.choice([-1.0, 1.0], (n, k))
    return rng.standard_normal((n, k))


MODELS = {
    "dense-activations-batchnorm": lambda: [
        nn.Dense(6, activation="tanh"), nn.BatchNorm(), nn.Dense(5), nn.LeakyReLU(0.1),
        nn.Dense(5, activation="sigmoid"), nn.Dense(4, activation="leaky_relu", alpha=0.2), nn.ReLU(),
        nn.Dense(4, activation="relu"), nn.Tanh(), nn.Sigmoid(), nn.Dense(3)],
    "softmax-layer": lambda: [nn.Dense(5, activation="tanh"), nn.Dense(3), nn.Softmax()],
}


# Softmax as a layer feeds the losses that take probabilities-like outputs, not the fused softmax loss.
LOSSES = ("softmax_cross_entropy", "mse", "binary_cross_entropy", "hinge")
CASES = [("dense-activations-batchnorm", loss) for loss in LOSSES] + [("softmax-layer", "mse")]


def _model_and_trainer(arch, loss):
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((7, 4)), _targets(loss, 7, 3, rng)
    model = nn.Sequential(MODELS[arch](), input_dim=4, dtype="float64", seed=5)
    trainer = nn.Trainer(model, loss=loss, optimizer="sgd")
    return model, trainer, X, trainer.loss.prepare_targets(y, 3, np.float64)


def _backprop(model, trainer, X, targets):
    """The model's gradient by backpropagation, as a host array."""
    xp = model.xp
    model.backward(trainer.loss(model.forward(xp.asarray(X), training=True), xp.asarray(targets))[1])
    return model.grads


@pytest.mark.parametrize("arch, loss", CASES)
def test_whole_model_gradient_matches_finite_differences(nn_backend, arch, loss):
    """Backpropagation against central differences of the loss in every coordinate, or under the cuda
    simulator (too slow for two forward passes per parameter) along three random directions."""
    model, trainer, X, targets = _model_and_trainer(arch, loss)
    xp = model.xp
    Xd, yd = xp.asarray(X), xp.asarray(targets)
    start = nn_backend.get(model.params).copy()
    # derivatives along the rows of `directions`: the identity's (every coordinate) or random ones
    directions = (np.random.default_rng(0).standard_normal((3, start.size)) if nn_backend.simulated
                  else np.eye(start.size))

    def loss_at(t):
        xp.copyto(model.params, xp.asarray(start + t @ directions))
        return float(trainer.loss(model.forward(Xd, training=True), yd)[0])

    expected = numeric_grad(loss_at, np.zeros(len(directions)))
    xp.copyto(model.params, xp.asarray(start))
    got = directions @ nn_backend.get(_backprop(model, trainer, X, targets))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)
    assert np.abs(expected).max() > 1e-3  # the check has something to compare


@pytest.mark.parametrize("arch, loss", CASES)
def test_whole_model_gradient_matches_reference_backprop(fast_backend, arch, loss):
    """The compiled backends' backpropagation against the NumPy reference's (whose gradient the test above
    checks against finite differences), same model and seed."""
    model, trainer, X, targets = _model_and_trainer(arch, loss)
    got = fast_backend.get(_backprop(model, trainer, X, targets))

    def reference_grads():
        twin, twin_trainer, _, _ = _model_and_trainer(arch, loss)
        return _backprop(twin, twin_trainer, X, targets)

    expected = reference(reference_grads)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)
    assert np.abs(expected).max() > 1e-3  # the check has something to compare


@pytest.mark.parametrize("activation, init, std", [
    ("relu", "he", lambda i, o: np.sqrt(2 / i)), ("leaky_relu", "he", lambda i, o: np.sqrt(2 / i)),
    ("tanh", "xavier", lambda i, o: np.sqrt(2 / (i + o))), (None, "xavier", lambda i, o: np.sqrt(2 / (i + o)))])
def test_default_initialisation_follows_the_activation(activation, init, std):
    dense = nn.Dense(300, activation=activation)
    assert dense.init == init
    W = nn.Sequential([dense], input_dim=200, seed=0).layers[0].params["W"]
    assert W.std() == pytest.approx(std(200, 300), rel=0.02)
    np.testing.assert_array_equal(dense.params["b"], 0)


@pytest.mark.filterwarnings("ignore::nn.GradientWarning")
def test_zero_weights_keep_hidden_units_symmetric():
    """All-zero weights give every hidden unit the same output and the same gradient, so they stay
    identical: the network acts like one hidden unit and cannot learn XOR; a random init can."""
    X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], float)
    y = np.array([0, 1, 1, 0])
    results = {}
    for init in ("zeros", None):
        model = nn.Sequential([nn.Dense(8, activation="sigmoid", init=init), nn.Dense(2, init=init)], seed=1)
        trainer = nn.Trainer(model, optimizer=nn.Adam(lr=0.05))
        trainer.fit(X, y, epochs=300, batch_size=None, verbose=0)
        W1, W2 = model.layers[0].params["W"], model.layers[1].params["W"]
        results[init] = trainer.evaluate(X, y)["accuracy"]
        symmetric = np.all(W1 == W1[:, :1]) and np.all(W2 == W2[:1, :])
        assert symmetric == (init == "zeros")
    assert np.abs(W1).max() > 0.1  # the random-init weights moved
    assert results["zeros"] <= 0.75 and results[None] == 1.0


@given(rate=st.sampled_from([0.1, 0.5, 0.8]), seed=st.integers(0, 2**32))
def test_dropout_only_in_training_inverted_and_seeded(rate, seed):
    x = np.ones((64, 50), np.float32)
    model = nn.Sequential([nn.Dropout(rate)], input_dim=50, seed=seed)
    np.testing.assert_array_equal(model.forward(x, training=False), x)
    y = model.forward(x, training=True)
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / (1 - rate), rtol=1e-6)
    assert abs(1 - kept.mean() - rate) < 0.05
    dx = model.layers[0].backward(np.full_like(x, 2))  # the same mask, the same scale
    np.testing.assert_array_equal(dx, 2 * y)
    again = nn.Sequential([nn.Dropout(rate)], input_dim=50, seed=seed)
    np.testing.assert_array_equal(again.forward(x, training=True), y)
    assert not np.array_equal(model.forward(x, training=True), y)  # a new mask every call


def test_batchnorm_matches_torch_in_training_and_evaluation(nn_backend):
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((16, 5)) * 3 + 2 for _ in range(3)]
    model = nn.Sequential([nn.BatchNorm(momentum=0.2)], input_dim=5, dtype="float64")
    bn = model.layers[0]
    model.xp.copyto(bn.params["gamma"], model.xp.asarray(rng.uniform(0.5, 2, 5)))
    model.xp.copyto(bn.params["beta"], model.xp.asarray(rng.standard_normal(5)))
    ref = torch.nn.BatchNorm1d(5, momentum=0.2, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(nn_backend.get(bn.params["gamma"])))
        ref.bias.copy_(torch.from_numpy(nn_backend.get(bn.params["beta"])))
    for x in batches:
        out = model.forward(model.xp.asarray(x), training=True)
        np.testing.assert_allclose(nn_backend.get(out), ref(torch.from_numpy(x)).detach().numpy(), rtol=1e-12,
                                   atol=1e-12)
    np.testing.assert_allclose(nn_backend.get(bn.running_mean), ref.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(nn_backend.get(bn.running_var), ref.running_var.numpy(), rtol=1e-12)
    ref.eval()
    x = rng.standard_normal((4, 5))
    evaluated = nn_backend.get(model.forward(model.xp.asarray(x), training=False))
    np.testing.assert_allclose(evaluated, ref(torch.from_numpy(x)).detach().numpy(), rtol=1e-12, atol=1e-12)
    trained = nn_backend.get(model.forward(model.xp.asarray(x), training=True))
    assert not np.allclose(evaluated, trained)  # training normalises with the batch's own statistics


@pytest.mark.parametrize("rows, batch_size", [(9, 1), (9, 4), (1, 32)])
def test_batchnorm_refuses_a_training_step_of_one_row(rows, batch_size):
    """A step of one row (batch_size 1, or the epoch's last) would update the running variance as if the
    batch variance were 0: fit refuses it naming batch_size, before any step, as torch's BatchNorm1d does."""
    model = nn.Sequential([nn.Dense(3), nn.BatchNorm(), nn.Dense(2)], input_dim=4, seed=0)
    trainer = nn.Trainer(model, compiled=False)
    X, y = np.random.default_rng(0).standard_normal((rows, 4)).astype(np.float32), np.zeros(rows, np.int64)
    before = model.params.copy()
    with pytest.raises(ValueError, match=rf"^batch_size={batch_size} leaves a training step of 1 row"):
        trainer.fit(X, y, epochs=1, batch_size=batch_size, verbose=0)
    np.testing.assert_array_equal(model.params, before)
    if rows > 1:
        trainer.fit(X[:8], y[:8], epochs=1, batch_size=4, verbose=0)  # two steps of 4 rows: trained
        assert not np.array_equal(model.params, before)


def test_parameters_and_gradients_are_views_of_one_flat_buffer():
    model = nn.Sequential([nn.Dense(4, activation="relu"), nn.BatchNorm(), nn.Dense(3)], input_dim=5, seed=0)
    assert model.params.size == 5 * 4 + 4 + 2 * 4 + 4 * 3 + 3
    for layer in model.layers:
        for name, p in layer.params.items():
            assert np.shares_memory(p, model.params) and np.shares_memory(layer.grads[name], model.grads)
    model.params[...] = 7
    assert np.all(model.layers[2].params["W"] == 7)
    assert [name for name, _ in model.parameter_layers()] == ["dense_0", "batchnorm_0", "dense_1"]


def _stateful_layers():
    return [nn.Dense(16, activation="relu"), nn.BatchNorm(), nn.Dropout(0.3), nn.Dense(2)]


def test_restoring_best_weights_keeps_the_dropout_counter_running():
    """Early stopping restores the best epoch's weights and BatchNorm statistics, not the dropout counter:
    the next fit draws new masks instead of replaying the ones already used."""
    X, y = make_moons(100, noise=0.1, random_state=0)
    model = nn.Sequential(_stateful_layers(), seed=0)
    trainer = nn.Trainer(model, optimizer=nn.Adam(lr=0.01))
    stop = nn.EarlyStopping(patience=2)
    trainer.fit(X, y, epochs=30, batch_size=20, validation_data=(X, 1 - y), callbacks=[stop], verbose=0)
    assert stop.best_epoch < trainer.epoch
    params, state = stop.best_weights
    np.testing.assert_array_equal(model.params, params)
    np.testing.assert_array_equal(model.layers[1].running_mean, state["batchnorm_0.running_mean"])
    assert model.layers[2].calls == trainer.optimizer.t  # one mask per step taken, none rewound


def test_reset_parameters_gives_the_model_a_new_one_has():
    """Weights, BatchNorm running statistics and dropout counters all start over."""
    X, y = make_moons(100, noise=0.1, random_state=0)
    X = (X * 5 + 3).astype(np.float32)
    model = nn.Sequential(_stateful_layers(), seed=0)
    nn.Trainer(model).fit(X, y, epochs=2, verbose=0)
    model.reset_parameters()
    fresh = nn.Sequential(_stateful_layers(), input_dim=2, seed=0)
    for key, value in fresh.state().items():
        np.testing.assert_array_equal(model.state()[key], value)
    np.testing.assert_array_equal(model(X), fresh(X))


def test_config_round_trip_rebuilds_the_same_model():
    model = nn.Sequential([nn.Dense(4, activation="leaky_relu", alpha=0.2), nn.Dropout(0.3), nn.BatchNorm(),
                           nn.Tanh(), nn.Dense(2, init="normal", init_std=0.5)], input_dim=3, dtype="float64", seed=9)
    again = nn.Sequential.from_config(model.config())
    assert [repr(a) for a in again.layers] == [repr(b) for b in model.layers]
    np.testing.assert_array_equal(again.params, model.params)  # same seed, same initial weights
    assert again.dtype == np.float64


@pytest.mark.parametrize("make, message", [
    (lambda: nn.Dense(0), "units"), (lambda: nn.Dense(3, activation="softplus"), "activation"),
    (lambda: nn.Dense(3, init="orthogonal"), "init"), (lambda: nn.Dropout(1.0), "rate"),
    (lambda: nn.LeakyReLU(-0.5), "alpha"), (lambda: nn.Sequential([]), "at least one"),
    (lambda: nn.Activation("gelu"), "activation")])
def test_bad_layer_arguments_raise_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (2**64, ValueError), (1.5, TypeError), (True, TypeError),
                                         ("7", TypeError)])
def test_model_seed_must_be_a_non_negative_integer(seed, error):
    with pytest.raises(error, match=r"^seed\b"):
        nn.Sequential([nn.Dense(2)], input_dim=3, seed=seed)
