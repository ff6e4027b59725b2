"""nn checkpoints: round trip, resume equals uninterrupted training, no pickle, atomic writes, and
clear errors (with the model untouched) for mismatched or truncated files."""

import os

import numpy as np
import pytest
from sklearn.datasets import make_moons

import nn
from nn import checkpoint


def _model(seed=0, width=16):
    return nn.Sequential([nn.Dense(width, activation="relu"), nn.BatchNorm(), nn.Dropout(0.2),
                          nn.Dense(8, activation="tanh"), nn.Dense(2)], seed=seed)


def _trainer(model):
    return nn.Trainer(model, optimizer=nn.AdamW(lr=0.01), schedule=nn.StepDecay(2, gamma=0.5))


def _data(n=100):
    return make_moons(n, noise=0.1, random_state=0)


def test_save_load_round_trip_gives_identical_predictions(nn_backend, tmp_path):
    X, y = _data(32 if nn_backend.simulated else 100)
    trainer = _trainer(_model())
    trainer.fit(X, y, epochs=2, batch_size=16, verbose=0)
    path = tmp_path / "model.npz"
    trainer.save(path)
    model, optimizer, meta = checkpoint.load(path)
    assert meta == {"epoch": 2}
    assert repr(optimizer) == repr(trainer.optimizer) and optimizer.t == trainer.optimizer.t
    for name, buf in trainer.optimizer.state.items():
        np.testing.assert_array_equal(nn_backend.get(optimizer.state[name]), nn_backend.get(buf))
    np.testing.assert_array_equal(nn.Trainer(model).predict(X), trainer.predict(X))
    np.testing.assert_array_equal(nn_backend.get(model.layers[1].running_var),
                                  nn_backend.get(trainer.model.layers[1].running_var))
    with np.load(path, allow_pickle=False) as f:  # plain arrays and JSON strings only
        assert {"architecture", "params", "optimizer", "meta"} <= set(f.files)


def test_resuming_from_a_checkpoint_equals_never_stopping(nn_backend, tmp_path):
    """Shuffling, dropout masks, BatchNorm statistics, optimizer state and the schedule all continue."""
    X, y = _data(40 if nn_backend.simulated else 100)
    straight = _trainer(_model())
    expected = straight.fit(X, y, epochs=4, batch_size=16, validation_split=0.2, verbose=0)

    first = _trainer(_model())
    history = first.fit(X, y, epochs=2, batch_size=16, validation_split=0.2, verbose=0)
    first.save(tmp_path / "ckpt.npz")
    resumed = _trainer(nn.Sequential.from_config(first.model.config()))
    resumed.model.xp.copyto(resumed.model.params, 0)  # the restore must bring every weight back
    resumed.restore(tmp_path / "ckpt.npz")
    rest = resumed.fit(X, y, epochs=2, batch_size=16, validation_split=0.2, verbose=0)

    np.testing.assert_array_equal(nn_backend.get(resumed.model.params), nn_backend.get(straight.model.params))
    assert rest.epochs == [3, 4]
    for key in expected.history:
        assert history[key] + rest[key] == expected[key]


def test_restore_into_an_unbuilt_model_builds_it(tmp_path):
    X, y = _data()
    trainer = _trainer(_model())
    trainer.fit(X, y, epochs=1, verbose=0)
    trainer.save(tmp_path / "m.npz")
    fresh = _trainer(_model(seed=5))
    fresh.restore(tmp_path / "m.npz")
    np.testing.assert_array_equal(fresh.model.params, trainer.model.params)
    assert fresh.epoch == 1 and fresh.optimizer.t == trainer.optimizer.t


def _assert_untouched(trainer, params, t):
    np.testing.assert_array_equal(trainer.model.params, params)
    assert trainer.optimizer.t == t


def test_loading_a_mismatched_checkpoint_raises_and_leaves_the_model_as_it_was(tmp_path):
    X, y = _data()
    saved = _trainer(_model(width=16))
    saved.fit(X, y, epochs=1, verbose=0)
    saved.save(tmp_path / "wide.npz")
    other = _trainer(_model(width=12))
    other.fit(X, y, epochs=1, verbose=0)
    params, t = other.model.params.copy(), other.optimizer.t
    with pytest.raises(ValueError, match=r"dense_0.*\(2, 16\).*\(2, 12\)"):
        other.restore(tmp_path / "wide.npz")
    _assert_untouched(other, params, t)
    shorter = nn.Trainer(nn.Sequential([nn.Dense(2)], input_dim=2))
    with pytest.raises(ValueError, match="5 layers, this model has 1"):
        shorter.restore(tmp_path / "wide.npz")


def test_loading_a_truncated_or_foreign_file_raises_and_leaves_the_model_as_it_was(tmp_path):
    X, y = _data()
    trainer = _trainer(_model())
    trainer.fit(X, y, epochs=1, verbose=0)
    trainer.save(tmp_path / "m.npz")
    raw = (tmp_path / "m.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    params, t = trainer.model.params.copy(), trainer.optimizer.t
    with pytest.raises(ValueError, match="cut.npz is not a readable checkpoint"):
        trainer.restore(tmp_path / "cut.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not an nn checkpoint"):
        trainer.restore(tmp_path / "other.npz")
    _assert_untouched(trainer, params, t)
    with pytest.raises(FileNotFoundError):
        trainer.restore(tmp_path / "missing.npz")


def test_save_is_atomic(tmp_path, monkeypatch):
    X, y = _data()
    trainer = _trainer(_model())
    trainer.fit(X, y, epochs=1, verbose=0)
    path = tmp_path / "m.npz"
    trainer.save(path)
    good = path.read_bytes()
    trainer.fit(X, y, epochs=1, verbose=0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save(path)
    assert path.read_bytes() == good  # the old checkpoint survives a failed write
    assert os.listdir(tmp_path) == ["m.npz"]  # and no temporary file is left behind


def test_saving_an_unbuilt_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not built"):
        checkpoint.save(tmp_path / "m.npz", _model())


@pytest.mark.parametrize("seed", [None, 5])
def test_resuming_into_a_model_built_with_another_seed_equals_never_stopping(tmp_path, seed):
    """The restored model adopts the checkpoint's seed: shuffling and dropout masks go on as saved."""
    X, y = _data()
    straight = _trainer(_model())
    straight.fit(X, y, epochs=4, batch_size=16, verbose=0)
    first = _trainer(_model())
    first.fit(X, y, epochs=2, batch_size=16, verbose=0)
    first.save(tmp_path / "ckpt.npz")
    resumed = _trainer(_model(seed=seed))
    resumed.restore(tmp_path / "ckpt.npz")
    assert resumed.model.seed == 0
    resumed.fit(X, y, epochs=2, batch_size=16, verbose=0)
    np.testing.assert_array_equal(resumed.model.params, straight.model.params)


def _saved(tmp_path, layers, name="m.npz"):
    X, y = _data()
    trainer = nn.Trainer(nn.Sequential(layers, seed=0))
    trainer.fit(X, y, epochs=1, verbose=0)
    trainer.save(tmp_path / name)
    return trainer, tmp_path / name


def test_restoring_into_a_model_with_other_layer_settings_raises_naming_the_setting(tmp_path):
    _, path = _saved(tmp_path, [nn.Dense(8, activation="relu"), nn.Dropout(0.5), nn.Dense(2)])
    for layers, message in (([nn.Dense(8, activation="sigmoid"), nn.Dropout(0.1), nn.Dense(2)],
                             "layer dense_0: activation is 'relu' in the checkpoint, 'sigmoid' in the model"),
                            ([nn.Dense(8, activation="relu"), nn.Dropout(0.1), nn.Dense(2)],
                             "layer dropout_0: rate is 0.5 in the checkpoint, 0.1 in the model"),
                            ([nn.Dense(8, activation="relu"), nn.BatchNorm(), nn.Dense(2)],
                             "layer batchnorm_0: the checkpoint has a Dropout there, the model a BatchNorm")):
        other = nn.Trainer(nn.Sequential(layers, input_dim=2, seed=0))
        params = other.model.params.copy()
        with pytest.raises(ValueError, match=message):
            other.restore(path)
        np.testing.assert_array_equal(other.model.params, params)


class Scale(nn.Layer):
    """A custom layer: multiplies each feature by a learnt factor."""

    def build(self, input_dim, xp, dtype):
        super().build(input_dim, xp, dtype)
        self.param_shapes = {"s": (input_dim,)}

    def init_params(self, rng):
        return {"s": rng.uniform(0.5, 1.5, self.input_dim)}

    def forward(self, x, training):
        self.x = x
        return x * self.params["s"]

    def backward(self, dy, need_dx=True):
        self.grads["s"][...] = (dy * self.x).sum(0)
        return dy * self.params["s"]


def test_a_model_with_custom_layers_restores_into_a_built_model_and_load_explains(tmp_path):
    X, _ = _data()
    saved, path = _saved(tmp_path, [nn.Dense(4), Scale(), nn.Dense(2)])
    again = nn.Trainer(nn.Sequential([nn.Dense(4), Scale(), nn.Dense(2)], seed=3))
    again.restore(path)
    np.testing.assert_array_equal(again.predict(X), saved.predict(X))
    assert again.optimizer.t == saved.optimizer.t
    with pytest.raises(ValueError, match="layer dropout_0: the checkpoint has a Scale there, the model a Dropout"):
        nn.Trainer(nn.Sequential([nn.Dense(4), nn.Dropout(0.1), nn.Dense(2)], input_dim=2)).restore(path)
    with pytest.raises(ValueError, match="'Scale' is not one of nn's .*restore the weights into that model"):
        checkpoint.load(path)


def test_a_checkpoint_saved_before_the_first_fit_restores_and_trains_on(tmp_path):
    X, y = _data()
    trainer = _trainer(_model())
    trainer.model.build(2)
    trainer.save(tmp_path / "new.npz")
    straight = _trainer(_model())
    straight.fit(X, y, epochs=2, batch_size=16, verbose=0)
    resumed = _trainer(_model(seed=1))
    resumed.restore(tmp_path / "new.npz")
    resumed.fit(X, y, epochs=2, batch_size=16, verbose=0)
    np.testing.assert_array_equal(resumed.model.params, straight.model.params)
    model, optimizer, meta = checkpoint.load(tmp_path / "new.npz")
    assert meta == {"epoch": 0} and optimizer.t == 0
    assert all(not np.any(buf) for buf in optimizer.state.values()) and set(optimizer.state) == {"m", "v"}


def test_a_checkpoint_without_optimizer_state_gives_the_optimizer_a_fresh_state(tmp_path):
    """Weights saved without an optimizer restore next to a fresh optimizer state (zeros, t 0), not the
    moments and step count the trainer's optimizer had from its own run."""
    X, y = _data()
    source = _trainer(_model())
    source.fit(X, y, epochs=1, batch_size=16, verbose=0)
    checkpoint.save(tmp_path / "weights.npz", source.model)
    for restore in (lambda t: t.restore(tmp_path / "weights.npz"),
                    lambda t: checkpoint.restore(tmp_path / "weights.npz", t.model, t.optimizer)):
        trainer = _trainer(_model(seed=1))
        trainer.fit(X, y, epochs=1, batch_size=16, verbose=0)
        restore(trainer)
        opt = trainer.optimizer
        assert opt.t == 0 and opt.params is trainer.model.params and opt.grads is trainer.model.grads
        assert set(opt.state) == {"m", "v"} and all(not np.any(buf) for buf in opt.state.values())
        np.testing.assert_array_equal(trainer.model.params, source.model.params)
