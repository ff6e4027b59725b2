"""Interrupting ``fit`` (Ctrl-C) inside or between steps leaves the weights of the last completed step,
never a half-applied update, and ``fit`` continues from there."""

import signal

import numpy as np
import pytest

import nn
from nn.layers import Layer


class InterruptAt(Layer):
    """A parameter-free layer that sends this process SIGINT in its ``when`` pass number ``at``."""

    def __init__(self, at=None, when="backward"):
        super().__init__()
        self.at, self.when, self.calls = at, when, 0

    def _tick(self, when):
        if when == self.when:
            self.calls += 1
            if self.calls == self.at:
                signal.raise_signal(signal.SIGINT)

    def forward(self, x, training):
        self._tick("forward")
        return x

    def backward(self, dy, need_dx=True):
        self._tick("backward")
        return dy


def _data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 3)).astype(np.float32)
    return X, (X[:, 0] * X[:, 1] > 0).astype(np.int64)


def _trainer(layer):
    model = nn.Sequential([nn.Dense(8, activation="relu"), nn.BatchNorm(), nn.Dropout(0.2), layer, nn.Dense(2)],
                          seed=0)
    return nn.Trainer(model, optimizer=nn.Adam(lr=0.01))


@pytest.mark.parametrize("when", ["forward", "backward"])
def test_interrupt_inside_a_step_finishes_that_step_then_stops(when):
    X, y = _data()
    before = signal.getsignal(signal.SIGINT)
    trainer = _trainer(InterruptAt(3, when))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(X, y, epochs=1, batch_size=10, shuffle=False, verbose=0)
    assert signal.getsignal(signal.SIGINT) is before
    # exactly three complete steps: the same weights and layer state as a run of three steps
    reference = _trainer(InterruptAt())
    reference.fit(X[:30], y[:30], epochs=1, batch_size=10, shuffle=False, verbose=0)
    assert trainer.optimizer.t == reference.optimizer.t == 3
    np.testing.assert_array_equal(trainer.model.params, reference.model.params)
    for key, value in reference.model.state().items():
        np.testing.assert_array_equal(trainer.model.state()[key], value)
    # and training goes on from there
    history = trainer.fit(X, y, epochs=2, batch_size=10, verbose=0)
    assert trainer.optimizer.t == 3 + 24 and trainer.epoch == 2
    assert history["loss"][-1] < history["loss"][0]


class InterruptAtEpochEnd(nn.Callback):
    def on_epoch_end(self, trainer, epoch, logs):
        if epoch == 1:
            signal.raise_signal(signal.SIGINT)


def test_interrupt_between_steps_stops_at_once_and_fit_continues():
    X, y = _data()
    trainer = _trainer(InterruptAt())
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(X, y, epochs=3, batch_size=40, verbose=0, callbacks=[InterruptAtEpochEnd()])
    assert trainer.epoch == 1 and trainer.optimizer.t == 3
    reference = _trainer(InterruptAt())
    reference.fit(X, y, epochs=1, batch_size=40, verbose=0)
    np.testing.assert_array_equal(trainer.model.params, reference.model.params)
    trainer.fit(X, y, epochs=1, batch_size=40, verbose=0)
    reference.fit(X, y, epochs=1, batch_size=40, verbose=0)
    np.testing.assert_array_equal(trainer.model.params, reference.model.params)
