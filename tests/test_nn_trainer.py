"""nn trainer: gradient-descent variants, history, early stopping, gradient health, NaN/Inf stops,
bad input caught before training, reproducibility."""

import time

import numpy as np
import pytest
from sklearn.datasets import make_moons

import kernels
import nn
from helpers import reference
from nn import Layer


def _moons(n=120, seed=0):
    return make_moons(n, noise=0.1, random_state=seed)


def _model(seed=0, **kw):
    return nn.Sequential([nn.Dense(16, activation="tanh"), nn.Dense(16, activation="relu"), nn.Dense(2)],
                         seed=seed, **kw)


@pytest.mark.parametrize("batch_size, epochs, lr", [(None, 300, 0.5), (16, 60, 0.2), (1, 20, 0.01)],
                         ids=["full-batch", "mini-batch", "stochastic"])
def test_sgd_full_batch_mini_batch_and_stochastic_all_learn(nn_backend, batch_size, epochs, lr):
    X, y = _moons()
    if nn_backend.simulated:  # a few steps in the simulator, step for step with the reference backend
        X, y, epochs = X[:6], y[:6], 2

        def run():
            trainer = nn.Trainer(_model(), optimizer=nn.SGD(lr=lr, momentum=0.9))
            return trainer.fit(X, y, epochs=epochs, batch_size=batch_size, verbose=0).history, trainer.optimizer.t

        (got, t), (expected, _) = run(), reference(run)
        np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-5)
        np.testing.assert_allclose(got["accuracy"], expected["accuracy"], atol=1 / len(X) + 1e-9)
        assert t == epochs * (1 if batch_size is None else -(-len(X) // batch_size))
        return
    trainer = nn.Trainer(_model(), optimizer=nn.SGD(lr=lr, momentum=0.9))
    history = trainer.fit(X, y, epochs=epochs, batch_size=batch_size, verbose=0)
    steps_per_epoch = 1 if batch_size is None else -(-len(X) // batch_size)
    assert trainer.optimizer.t == epochs * steps_per_epoch
    assert history["loss"][-1] < 0.1 and history["accuracy"][-1] > 0.96
    assert trainer.evaluate(X, y)["accuracy"] > 0.96


def test_history_records_losses_metrics_and_gradient_norms(capsys):
    X, y = _moons()
    trainer = nn.Trainer(_model(), optimizer=nn.Adam(lr=0.01))
    history = trainer.fit(X, y, epochs=3, batch_size=32, validation_split=0.25, verbose=1)
    assert history.epochs == [1, 2, 3]
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    assert list(history.grad_norms) == ["dense_0", "dense_1", "dense_2"]
    assert all(len(v) == 3 and min(v) > 0 for v in history.grad_norms.values())
    assert history["val_loss"][-1] == pytest.approx(trainer.evaluate(X[-30:], y[-30:])["loss"], rel=1e-6)
    assert history["loss"][2] < history["loss"][0]
    out = capsys.readouterr()
    assert "epoch 3/3: loss" in out.out and "val_accuracy" in out.out
    assert "sample/s" in out.err  # the tqdm bar
    trainer.fit(X, y, epochs=1, verbose=0)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("batch_size, batchnorm", [(1, False), (2, True), (3, True)])
def test_dense_layers_gradient_norms_come_from_their_factors_at_one_or_two_rows(nn_backend, batch_size, batchnorm):
    """At a step of at most FACTORED_NORM_ROWS rows on one process each Dense layer's gradient norm is
    ``Dense.grad_norm``'s (its factors, ``kernels.dense_grad_norm``: the compiled step's too), within float32
    rounding of the formed gradient's norm; another layer's (BatchNorm's) and every norm at more rows are
    ``segment_norms``' of the formed gradient."""
    X, y = _moons(8)
    layers = [nn.Dense(8, activation="relu")] + ([nn.BatchNorm()] if batchnorm else []) + [nn.Dense(2)]
    trainer = nn.Trainer(nn.Sequential(layers, seed=0), optimizer=nn.SGD(lr=0.1), compiled=False)
    norms = trainer.fit(X[:batch_size], y[:batch_size], epochs=1, batch_size=batch_size, verbose=0).grad_norms
    model = trainer.model
    grads = nn_backend.get(model.grads).astype(np.float64)  # the one step's gradient, not yet overwritten
    for layer in layers:
        got, formed = norms[layer.name][0], np.linalg.norm(grads[model.slices[layer.name]])
        if isinstance(layer, nn.Dense) and batch_size <= nn.layers.FACTORED_NORM_ROWS:
            out = nn_backend.to(np.zeros(1))
            layer.grad_norm(out)
            assert got == nn_backend.get(out)[0]
            assert got == pytest.approx(formed, rel=1e-6)
        else:
            assert got == pytest.approx(formed, rel=1e-12)


def test_predict_returns_host_outputs_in_evaluation_mode():
    X, y = _moons()
    model = nn.Sequential([nn.Dense(8, activation="relu"), nn.Dropout(0.5), nn.Dense(2)], seed=0)
    trainer = nn.Trainer(model)
    trainer.fit(X, y, epochs=2, verbose=0)
    out = trainer.predict(X, batch_size=50)
    np.testing.assert_array_equal(out, trainer.predict(X))  # deterministic: no dropout
    np.testing.assert_allclose(out, model.forward(X.astype(np.float32)), rtol=1e-6)
    assert out.shape == (len(X), 2) and out.dtype == np.float32


def _val_flipped():
    """Validation labels flipped: as training improves, validation loss gets worse."""
    X, y = _moons(seed=1)
    return X, 1 - y


class Recorder(nn.Callback):
    def on_train_begin(self, trainer):
        self.weights = []

    def on_epoch_end(self, trainer, epoch, logs):
        self.weights.append(trainer.model.params.copy())


def test_early_stopping_stops_and_restores_the_best_weights():
    X, y = _moons()
    recorder = Recorder()
    stopper = nn.EarlyStopping(monitor="val_loss", patience=2)
    trainer = nn.Trainer(_model(), optimizer=nn.Adam(lr=0.01))
    history = trainer.fit(X, y, epochs=50, batch_size=16, validation_data=_val_flipped(),
                          callbacks=[recorder, stopper], verbose=0)
    best = int(np.argmin(history["val_loss"]))
    assert len(history.epochs) == best + 1 + 2 < 50
    assert stopper.stopped_epoch == len(history.epochs)
    np.testing.assert_array_equal(trainer.model.params, recorder.weights[best])


def test_early_stopping_restores_the_best_weights_when_training_runs_out_of_epochs():
    X, y = _moons()
    recorder = Recorder()
    trainer = nn.Trainer(_model(), optimizer=nn.Adam(lr=0.01))
    history = trainer.fit(X, y, epochs=4, batch_size=16, validation_data=_val_flipped(),
                          callbacks=[recorder, nn.EarlyStopping(patience=10)], verbose=0)
    best = int(np.argmin(history["val_loss"]))
    assert len(history.epochs) == 4 and best < 3
    np.testing.assert_array_equal(trainer.model.params, recorder.weights[best])
    assert not np.array_equal(trainer.model.params, recorder.weights[-1])


def test_early_stopping_on_accuracy_maximises_and_needs_the_metric():
    X, y = _moons()
    stopper = nn.EarlyStopping(monitor="accuracy", patience=0, min_delta=1.0)  # no epoch can improve by 1.0
    history = nn.Trainer(_model()).fit(X, y, epochs=10, callbacks=[stopper], verbose=0)
    assert stopper.sign == -1 and len(history.epochs) == 2
    with pytest.raises(ValueError, match="val_loss.*validation_data"):
        nn.Trainer(_model()).fit(X, y, epochs=1, callbacks=[nn.EarlyStopping()], verbose=0)


def test_vanishing_gradients_warn_naming_the_lower_layers():
    X, y = _moons()
    deep = [nn.Dense(16, activation="sigmoid", init="normal", init_std=0.1) for _ in range(6)]
    trainer = nn.Trainer(nn.Sequential(deep + [nn.Dense(2)], seed=0), optimizer=nn.SGD(lr=0.1))
    with pytest.warns(nn.GradientWarning, match="vanish.*dense_0"):
        trainer.fit(X, y, epochs=1, verbose=0)


def test_exploding_gradients_warn():
    X = np.random.default_rng(0).standard_normal((64, 4))
    y = X.sum(axis=1, keepdims=True) * 100
    model = nn.Sequential([nn.Dense(32, activation="relu", init="normal", init_std=3.0), nn.Dense(1)], seed=0)
    trainer = nn.Trainer(model, loss="mse", optimizer=nn.SGD(lr=1e-6))
    with pytest.warns(nn.GradientWarning, match=r"explode.*clip gradients \(clip_norm=\.\.\.\)"):
        trainer.fit(X, y, epochs=1, verbose=0)
    trainer.clip_norm = 10.0  # already clipping: the advice is not to clip
    with pytest.warns(nn.GradientWarning, match=r"explode.*before clipping to clip_norm=10\)$"):
        trainer.fit(X, y, epochs=1, verbose=0)


def test_healthy_training_does_not_warn(recwarn):
    X, y = _moons()
    nn.Trainer(_model()).fit(X, y, epochs=2, verbose=0)
    assert not [w for w in recwarn if issubclass(w.category, nn.GradientWarning)]


class NaNGrad(Layer):
    """A test layer whose parameter gradient is NaN (a numerically broken custom layer)."""

    def build(self, input_dim, xp, dtype):
        super().build(input_dim, xp, dtype)
        self.param_shapes = {"s": (input_dim,)}

    def forward(self, x, training):
        return x * self.params["s"]

    def backward(self, dy, need_dx=True):
        self.grads["s"][...] = np.nan
        return dy * self.params["s"]


def test_nan_gradient_stops_training_naming_the_layer():
    X, y = _moons()
    model = nn.Sequential([nn.Dense(8, activation="relu"), NaNGrad(), nn.Dense(2)], seed=0)
    trainer = nn.Trainer(model)
    with pytest.raises(nn.NonFiniteError, match=r"epoch 1, step 1: the gradient of layer 'nangrad_0' became nan"):
        trainer.fit(X, y, epochs=1, verbose=0)
    assert trainer.optimizer.t == 0 and np.isfinite(model.params).all()  # no update with garbage


def test_nan_loss_stops_training_naming_the_layer():
    X, y = _moons()
    model = nn.Sequential([nn.Dense(8, activation="relu"), nn.Dense(2)], input_dim=2, seed=0)
    model.layers[1].params["W"][0, 0] = np.inf
    with pytest.raises(nn.NonFiniteError, match="loss became nan.*layer 'dense_1' has non-finite weights W"):
        nn.Trainer(model).fit(X, y, epochs=1, verbose=0)


def test_diverging_training_stops_before_it_writes_non_finite_weights():
    X = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    y = X @ np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    model = nn.Sequential([nn.Dense(16, activation="relu"), nn.Dense(1)], seed=0)
    trainer = nn.Trainer(model, loss="mse", optimizer=nn.SGD(lr=5.0))
    with pytest.raises(nn.NonFiniteError, match="loss became inf .*layer 'dense_1' outputs values up to"):
        trainer.fit(X, y, epochs=50, batch_size=8, verbose=0)
    assert np.isfinite(model.params).all()


BAD_INPUT = [
    (lambda X, y: (X, y[:-1]), ValueError, "X has 120 samples but y has 119"),
    (lambda X, y: (X[:, :1], y), ValueError, "X has 1 features, but the first layer \\(dense_0\\) expects 2"),
    (lambda X, y: (X, np.where(y == 1, 5, y)), ValueError, "y has label 5 at index .* outside \\[0, 2\\)"),
    (lambda X, y: (X, y - 1), ValueError, "y has label -1"),
    (lambda X, y: (X[:0], y[:0]), ValueError, "X is empty"),
    (lambda X, y: (np.where(np.arange(X.size).reshape(X.shape) == 7, np.nan, X), y), ValueError,
     "X contains nan at index \\(3, 1\\)"),
    (lambda X, y: (X, y + 0.5), ValueError, "integer class labels"),
    (lambda X, y: (X[0], y), ValueError, "2-D"),
]


@pytest.mark.parametrize("corrupt, error, message", BAD_INPUT)
def test_bad_input_raises_a_clear_error_before_any_training(corrupt, error, message):
    X, y = _moons()
    model = nn.Sequential([nn.Dense(8, activation="relu"), nn.Dense(2)], input_dim=2, seed=0)
    before = model.params.copy()
    trainer = nn.Trainer(model)
    with pytest.raises(error, match=message):
        trainer.fit(*corrupt(X, y), epochs=1, verbose=0)
    np.testing.assert_array_equal(model.params, before)
    assert trainer.optimizer.t == 0 and trainer.epoch == 0


def test_bad_validation_data_and_arguments_raise_before_training():
    X, y = _moons()
    trainer = nn.Trainer(_model())
    Xv = X.copy()
    Xv[4, 0] = np.inf
    with pytest.raises(ValueError, match="validation_data X contains inf at index \\(4, 0\\)"):
        trainer.fit(X, y, validation_data=(Xv, y), verbose=0)
    with pytest.raises(ValueError, match="not both"):
        trainer.fit(X, y, validation_data=(X, y), validation_split=0.1, verbose=0)
    with pytest.raises(ValueError, match="batch_size"):
        trainer.fit(X, y, batch_size=0, verbose=0)
    with pytest.raises(ValueError, match="hinge"):
        nn.Trainer(nn.Sequential([nn.Dense(1)]), loss="hinge").fit(X, y, verbose=0)
    assert trainer.optimizer.t == 0


@pytest.mark.parametrize("loss, targets", [("mse", lambda y: y[:, None] * 2.0 - 1),
                                           ("binary_cross_entropy", lambda y: y.astype(float)),
                                           ("hinge", lambda y: y * 2.0 - 1)])
def test_other_losses_train_a_one_output_model(loss, targets):
    X, y = _moons()
    model = nn.Sequential([nn.Dense(16, activation="tanh"), nn.Dense(16, activation="tanh"), nn.Dense(1)], seed=0)
    trainer = nn.Trainer(model, loss=loss, optimizer=nn.Adam(lr=0.02))
    history = trainer.fit(X, targets(y), epochs=40, batch_size=16, verbose=0)
    assert history["loss"][-1] < 0.25 * history["loss"][0]
    if loss != "mse":
        assert history["accuracy"][-1] > 0.95


def test_same_seed_gives_bitwise_identical_training(nn_backend):
    X, y = _moons(40 if nn_backend.simulated else 120)
    runs = []
    for seed in (3, 3, 4):
        model = nn.Sequential([nn.Dense(16, activation="relu"), nn.BatchNorm(), nn.Dropout(0.3), nn.Dense(2)],
                              seed=seed)
        trainer = nn.Trainer(model, optimizer=nn.Adam(lr=0.01))
        history = trainer.fit(X, y, epochs=3, batch_size=16, validation_split=0.2, verbose=0)
        runs.append((nn_backend.get(model.params), history.history))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    assert not np.array_equal(runs[0][0], runs[2][0])


class NaNAfter(Layer):
    """A test layer whose parameter gradient turns NaN from its ``bad``-th backward pass on (counting from 1)."""

    def __init__(self, bad):
        super().__init__()
        self.bad, self.calls = bad, 0

    def build(self, input_dim, xp, dtype):
        super().build(input_dim, xp, dtype)
        self.param_shapes = {"s": (input_dim,)}

    def init_params(self, rng):
        return {"s": np.ones(self.input_dim)}

    def forward(self, x, training):
        self.x = x
        return x * self.params["s"]

    def backward(self, dy, need_dx=True):
        self.calls += 1
        self.grads["s"][...] = (dy * self.x).sum(axis=0) * (np.nan if self.calls >= self.bad else 1)
        return dy * self.params["s"]


def _nan_after_trainer(bad):
    model = nn.Sequential([nn.Dense(8, activation="relu"), NaNAfter(bad), nn.Dense(2)], input_dim=2, seed=0)
    return nn.Trainer(model, optimizer=nn.Adam(lr=0.01))


@pytest.mark.parametrize("sync_every", [None, 1, 3])
def test_a_non_finite_step_is_skipped_on_the_device_and_training_can_go_on(sync_every):
    """Step 3 (epoch 2, step 1) has a NaN gradient: it and every later step of the epoch are skipped on
    the device, the read raises naming it, and the weights, optimizer state and step count are those after
    step 2, so a caller that catches the error and fixes the cause continues exactly as if step 3 never ran."""
    X, y = _moons(32)
    good, bad = _nan_after_trainer(np.inf), _nan_after_trainer(3)
    good.fit(X, y, epochs=1, batch_size=16, verbose=0)
    with pytest.raises(nn.NonFiniteError, match=r"epoch 2, step 1: the gradient of layer 'nanafter_0' became nan"):
        bad.fit(X, y, epochs=2, batch_size=16, verbose=0, sync_every=sync_every)
    assert bad.optimizer.t == good.optimizer.t == 2 and bad.epoch == 1
    np.testing.assert_array_equal(bad.model.params, good.model.params)
    for name, buf in good.optimizer.state.items():
        np.testing.assert_array_equal(bad.optimizer.state[name], buf)
    bad.model.layers[1].bad = np.inf
    np.testing.assert_array_equal(bad.fit(X, y, epochs=1, batch_size=16, verbose=0)["loss"],
                                  good.fit(X, y, epochs=1, batch_size=16, verbose=0)["loss"])
    np.testing.assert_array_equal(bad.model.params, good.model.params)


def test_sync_every_must_be_a_positive_integer():
    X, y = _moons()
    for value in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="sync_every must be a positive integer or None"):
            nn.Trainer(_model()).fit(X, y, verbose=0, sync_every=value)


@pytest.mark.cuda
@pytest.mark.parametrize("sync_every, verbose, reads", [(None, 0, 1), (3, 0, 3), (1, 0, 8), (None, 1, None)])
def test_an_epoch_copies_device_data_to_the_host_only_when_it_reads_the_metrics(monkeypatch, capsys, sync_every,
                                                                               verbose, reads):
    """On the cuda backend (Numba device arrays, where CuPy runs too: their copies can be counted; the
    simulator in CI) one epoch of 8 steps copies to the host only to read the metrics: at the epoch's end,
    and every ``sync_every`` steps before it, or with a progress bar at most once per refresh interval of
    the bar (0.1 s)."""
    pytest.importorskip("numba.cuda")
    monkeypatch.setattr(nn._device, "_cupy", lambda: None)
    X, y = _moons(32)
    with kernels.use_backend("cuda"):
        trainer = nn.Trainer(nn.Sequential([nn.Dense(4, activation="tanh"), nn.Dense(2)], seed=0),
                             optimizer=nn.SGD(lr=0.1, momentum=0.9), clip_norm=1.0)
        trainer.fit(X, y, epochs=1, batch_size=4, verbose=0)  # compiles; builds the model on the device
        backend, array_type = kernels._dispatch.module("cuda"), type(trainer.model.params)
        reads_made, copies = [], []
        to_host, copy_to_host = backend.to_host, array_type.copy_to_host
        monkeypatch.setattr(backend, "to_host", lambda a: reads_made.append(a.shape) or to_host(a))
        monkeypatch.setattr(array_type, "copy_to_host",
                            lambda self, *a, **k: copies.append(self.shape) or copy_to_host(self, *a, **k))
        start = time.perf_counter()
        history = trainer.fit(X, y, epochs=1, batch_size=4, verbose=verbose, sync_every=sync_every)
        elapsed = time.perf_counter() - start
    if reads is None:  # with the bar: at most one read per refresh interval, plus the epoch's end
        assert 1 <= len(copies) <= elapsed / 0.1 + 1
    else:
        assert len(copies) == reads
    assert len(reads_made) == len(copies)  # every copy is a read of the metrics buffer
    assert set(copies) == {(kernels.metrics_size(2),)}
    assert np.isfinite(history["loss"][0]) and 0 <= history["accuracy"][0] <= 1


@pytest.mark.parametrize("compiled", [False, True])
def test_a_reused_optimizer_trains_the_new_model_with_a_fresh_state(compiled):
    """An optimizer bound to another model (or to buffers the model replaced by building again) is rebound to
    the trainer's model with a fresh state: the first model stays as it was, the second trains exactly as
    with a new optimizer (the compiled epoch included: its state has the new model's size)."""
    with kernels.use_backend("numba"):  # the compiled epoch runs only there
        X, y = _moons()
        opt = nn.Adam(lr=0.05)
        first = nn.Sequential([nn.Dense(2)], seed=0)
        nn.Trainer(first, optimizer=opt).fit(X, y, epochs=1, verbose=0)
        kept = first.params.copy()
        second, fresh = _model(seed=1), _model(seed=1)
        nn.Trainer(second, optimizer=opt, compiled=compiled).fit(X, y, epochs=2, verbose=0)
        nn.Trainer(fresh, optimizer=nn.Adam(lr=0.05), compiled=compiled).fit(X, y, epochs=2, verbose=0)
        np.testing.assert_array_equal(first.params, kept)
        np.testing.assert_array_equal(second.params, fresh.params)
        assert opt.params is second.params and {v.size for v in opt.state.values()} == {second.params.size}
        second.build(2)  # new buffers: the optimizer follows them, from a fresh state
        trainer = nn.Trainer(second, optimizer=opt, compiled=compiled)
        trainer.fit(X, y, epochs=1, verbose=0)
        assert opt.params is second.params and opt.t == trainer.optimizer.t == -(-len(X) // 32)


def test_a_restored_optimizer_keeps_its_state_even_when_it_was_bound_to_another_model(tmp_path):
    X, y = _moons()
    saved = nn.Trainer(_model(), optimizer=nn.Adam(lr=0.01))
    saved.fit(X, y, epochs=1, verbose=0)
    saved.save(tmp_path / "ckpt.npz")
    opt = nn.Adam(lr=0.01)
    nn.Trainer(nn.Sequential([nn.Dense(2)], seed=0), optimizer=opt).fit(X, y, epochs=1, verbose=0)
    resumed = nn.Trainer(_model(seed=5, input_dim=2), optimizer=opt).restore(tmp_path / "ckpt.npz")
    np.testing.assert_array_equal(resumed.fit(X, y, epochs=1, verbose=0)["loss"],
                                  saved.fit(X, y, epochs=1, verbose=0)["loss"])
    np.testing.assert_array_equal(resumed.model.params, saved.model.params)


def test_callbacks_end_training_also_when_it_raises():
    """A NaN gradient in epoch 4 stops fit with NonFiniteError; EarlyStopping still puts back the best
    epoch's weights (its on_train_end runs in a finally)."""
    X, y = _moons(100)
    model = nn.Sequential([nn.Dense(16, activation="relu"), NaNAfter(40), nn.Dense(2)], seed=0)
    trainer, recorder = nn.Trainer(model, optimizer=nn.Adam(lr=0.01)), Recorder()
    stopper = nn.EarlyStopping(patience=100)
    with pytest.raises(nn.NonFiniteError, match="epoch 4, step 10"):
        trainer.fit(X, y, epochs=20, batch_size=10, validation_data=_val_flipped(), callbacks=[recorder, stopper],
                    verbose=0)
    assert trainer.epoch == 3 and stopper.best_epoch < 3
    np.testing.assert_array_equal(model.params, recorder.weights[stopper.best_epoch - 1])


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "8"])
def test_evaluate_and_predict_check_batch_size(batch_size):
    X, y = _moons()
    trainer = nn.Trainer(_model(input_dim=2))
    with pytest.raises(ValueError, match=r"^batch_size must be a positive integer or None"):
        trainer.evaluate(X, y, batch_size=batch_size)
    with pytest.raises(ValueError, match=r"^batch_size must be a positive integer or None"):
        trainer.predict(X, batch_size=batch_size)
    np.testing.assert_allclose(trainer.predict(X, batch_size=None), trainer.predict(X, batch_size=7), rtol=1e-5)
    assert trainer.evaluate(X, y, batch_size=None)["loss"] == pytest.approx(trainer.evaluate(X, y)["loss"], rel=1e-6)


def test_inputs_beyond_the_model_dtype_are_refused_before_training():
    """1e39 is finite in float64 but inf in the model's float32: checked after the cast."""
    X, y = _moons()
    X = X.astype(np.float64)
    X[5, 0] = 1e39
    trainer = nn.Trainer(_model())
    message = r"^X has 1e\+39 at index \(5, 0\), beyond the range of the model's dtype float32"
    for call in (lambda: trainer.fit(X, y, verbose=0), lambda: trainer.evaluate(X, y), lambda: trainer.predict(X)):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match=r"^validation_data X has 1e\+39 at index \(5, 0\), beyond the range"):
        trainer.fit(X[:4], y[:4], validation_data=(X, y), verbose=0)
    assert trainer.optimizer.t == 0


@pytest.mark.parametrize("kwargs, name", [
    (dict(y=None), "y"), (dict(y=3), "y"), (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
    (dict(epochs=True), "epochs"), (dict(batch_size=True), "batch_size"), (dict(sync_every=np.True_), "sync_every"),
])
def test_bad_fit_arguments_raise_errors_naming_them(kwargs, name):
    X, y = _moons()
    trainer = nn.Trainer(_model())
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        trainer.fit(X, **{"y": y, "verbose": 0, **kwargs})
    assert trainer.optimizer.t == 0


def test_metrics_take_one_name_or_a_list():
    assert nn.Trainer(_model(), metrics="accuracy").metrics == ("accuracy",)
    assert nn.Trainer(_model(), metrics=["accuracy"]).metrics == ("accuracy",)
    with pytest.raises(ValueError, match=r"^metrics\b.*'f1'"):
        nn.Trainer(_model(), metrics="f1")
    with pytest.raises(ValueError, match=r"^metrics\b.*'accuracy' for loss mse"):
        nn.Trainer(_model(), loss="mse", metrics=("accuracy",))


def test_a_model_without_parameters_is_refused_by_fit():
    X = np.random.default_rng(0).standard_normal((20, 3))
    trainer = nn.Trainer(nn.Sequential([nn.Tanh()], seed=0), loss="mse")
    with pytest.raises(ValueError, match=r"^model has no parameters to train \(layers: tanh_0\)"):
        trainer.fit(X, X, verbose=0)
    np.testing.assert_allclose(trainer.predict(X), np.tanh(X), rtol=1e-6)  # evaluation still works


def test_scratch_buffers_stay_bounded_over_many_input_lengths():
    """evaluate on inputs of many lengths allocates a buffer per last-batch shape; the trainer's scratch is
    capped as a layer's buffers are, so it does not grow without bound."""
    X, y = _moons(300)
    trainer = nn.Trainer(_model(input_dim=2))
    for n in range(1, 200):
        trainer.evaluate(X[:n], y[:n])
    assert len(trainer._scratch) <= 65
    assert trainer.evaluate(X, y)["loss"] == pytest.approx(trainer.evaluate(X, y, batch_size=None)["loss"], rel=1e-6)
