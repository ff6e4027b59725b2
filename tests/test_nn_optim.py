"""nn optimizers, schedules and gradient clipping: convergence on problems a linear model cannot
solve, torch.optim trajectories, state round trips."""

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import make_moons

import nn
from helpers import reference
from nn import optim

XOR_X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], float)
XOR_Y = np.array([0, 1, 1, 0])

# (hyperparameters, epochs): each reaches a low loss on two moons at batch size 20.
CONVERGE = {"sgd": (dict(lr=0.1, momentum=0.9, nesterov=True), 60), "adam": (dict(lr=0.02), 60),
            "adamw": (dict(lr=0.02), 60), "rmsprop": (dict(lr=0.01), 60), "adagrad": (dict(lr=0.1), 60),
            "adadelta": ({}, 100)}


def _moons_model(seed=1, dtype="float32"):
    return nn.Sequential([nn.Dense(16, activation="tanh"), nn.Dense(16, activation="tanh"), nn.Dense(2)],
                         seed=seed, dtype=dtype)


@pytest.mark.parametrize("name", sorted(CONVERGE))
def test_every_optimizer_solves_two_moons(nn_backend, name):
    X, y = make_moons(200, noise=0.1, random_state=0)
    hyper, epochs = CONVERGE[name]
    if nn_backend.simulated:  # a few steps in the simulator, step for step with the reference backend
        def run():
            trainer = nn.Trainer(_moons_model(), optimizer=optim.get(name, **hyper))
            return trainer.fit(X[:40], y[:40], epochs=2, batch_size=20, verbose=0)["loss"]

        np.testing.assert_allclose(run(), reference(run), rtol=1e-5)
        return
    trainer = nn.Trainer(_moons_model(), optimizer=optim.get(name, **hyper))
    history = trainer.fit(X, y, epochs=epochs, batch_size=20, verbose=0)
    assert history["loss"][-1] < 0.1 < history["loss"][0]
    assert trainer.evaluate(X, y)["accuracy"] >= 0.97


@pytest.mark.parametrize("name", sorted(CONVERGE))
def test_every_optimizer_solves_xor(name):
    hyper = {"sgd": dict(lr=0.5, momentum=0.9), "adadelta": dict(lr=5.0)}.get(name, dict(lr=0.05))
    model = nn.Sequential([nn.Dense(8, activation="tanh"), nn.Dense(2)], seed=0)
    trainer = nn.Trainer(model, optimizer=optim.get(name, **hyper))
    history = trainer.fit(XOR_X, XOR_Y, epochs=300, batch_size=None, verbose=0)
    assert history["loss"][-1] < 0.05
    assert trainer.evaluate(XOR_X, XOR_Y)["accuracy"] == 1.0


# Hyperparameters that torch.optim spells the same way (beta1/beta2 stay at their shared defaults).
TORCH = [
    (optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), torch.optim.SGD),
    (optim.SGD, dict(lr=0.1, momentum=0.5, dampening=0.3), torch.optim.SGD),
    (optim.SGD, dict(lr=0.1), torch.optim.SGD),
    (optim.Adam, dict(lr=0.01, weight_decay=0.01), torch.optim.Adam),
    (optim.AdamW, dict(lr=0.01, weight_decay=0.1), torch.optim.AdamW),
    (optim.RMSProp, dict(lr=0.01, momentum=0.5, weight_decay=0.01), torch.optim.RMSprop),
    (optim.RMSProp, dict(lr=0.01), torch.optim.RMSprop),
    (optim.Adagrad, dict(lr=0.1, weight_decay=0.01), torch.optim.Adagrad),
    (optim.Adadelta, dict(lr=1.0, weight_decay=0.01), torch.optim.Adadelta),
]


@pytest.mark.parametrize("ours, hyper, theirs", TORCH, ids=lambda v: getattr(v, "__name__", None))
def test_training_follows_torch_optim(nn_backend, ours, hyper, theirs):
    """The same model, data and optimizer in torch: the whole trajectory agrees (float64)."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((12, 4)), rng.integers(0, 3, 12)
    model = nn.Sequential([nn.Dense(8, activation="tanh"), nn.Dense(3)], input_dim=4, dtype="float64", seed=2)
    ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    with torch.no_grad():
        for i, layer in zip((0, 2), model.layers):
            ref[i].weight.copy_(torch.from_numpy(nn_backend.get(layer.params["W"]).T.copy()))
            ref[i].bias.copy_(torch.from_numpy(nn_backend.get(layer.params["b"])))
    torch_opt = theirs(ref.parameters(), **hyper)
    losses, epochs = [], 3 if nn_backend.simulated else 8
    for _ in range(epochs):
        torch_opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ref(torch.from_numpy(X)), torch.from_numpy(y))
        loss.backward()
        torch_opt.step()
        losses.append(loss.item())
    trainer = nn.Trainer(model, optimizer=ours(**hyper))
    history = trainer.fit(X, y, epochs=epochs, batch_size=None, shuffle=False, verbose=0)
    np.testing.assert_allclose(history["loss"], losses, rtol=1e-10)
    for i, layer in zip((0, 2), model.layers):
        np.testing.assert_allclose(nn_backend.get(layer.params["W"]), ref[i].weight.detach().numpy().T, rtol=1e-9,
                                   atol=1e-12)


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_state_dict_round_trip_continues_identically(name):
    X, y = make_moons(64, noise=0.1, random_state=0)
    hyper = {"sgd": dict(momentum=0.9), "rmsprop": dict(momentum=0.5)}.get(name, {})
    runs = []
    for restart in (False, True):
        trainer = nn.Trainer(_moons_model(), optimizer=optim.get(name, **hyper))
        trainer.fit(X, y, epochs=2, batch_size=16, verbose=0)
        if restart:
            state = trainer.optimizer.state_dict()
            fresh = optim.get(name).bind(trainer.model.params, trainer.model.grads)
            fresh.load_state_dict(state)
            assert fresh.t == 8 and fresh.hyper == trainer.optimizer.hyper
            trainer.optimizer = fresh
        trainer.fit(X, y, epochs=2, batch_size=16, verbose=0)
        runs.append(trainer.model.params.copy())
    np.testing.assert_array_equal(runs[0], runs[1])


def test_load_state_dict_rejects_mismatches_and_changes_nothing():
    params, grads = np.zeros(10, np.float32), np.zeros(10, np.float32)
    adam = optim.Adam(lr=0.1).bind(params, grads)
    adam.step()
    before = adam.state_dict()
    bad = optim.Adam().bind(np.zeros(4, np.float32), np.zeros(4, np.float32)).state_dict()
    with pytest.raises(ValueError, match="shape"):
        adam.load_state_dict(bad)
    with pytest.raises(ValueError, match="SGD"):
        adam.load_state_dict(optim.SGD().bind(params, grads).state_dict())
    after = adam.state_dict()
    assert after["t"] == before["t"] == 1 and after["hyper"] == before["hyper"]
    np.testing.assert_array_equal(after["buffers"]["m"], before["buffers"]["m"])


@pytest.mark.parametrize("make, message", [
    (lambda: optim.SGD(lr=-1), "lr"), (lambda: optim.SGD(nesterov=True), "nesterov"),
    (lambda: optim.Adam(beta1=1.0), "beta1"), (lambda: optim.Adam(lr=float("nan")), "lr"),
    (lambda: optim.RMSProp(alpha=1.5), "alpha"), (lambda: optim.Adadelta(rho=2), "rho"),
    (lambda: optim.get("lbfgs"), "optimizer must be one of")])
def test_bad_hyperparameters_raise_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()
    with pytest.raises(TypeError, match="momentun"):
        optim.SGD(momentun=0.9)


def test_schedules():
    step, cosine = nn.StepDecay(step_size=3, gamma=0.5), nn.CosineDecay(total=10, min_lr=0.01)
    assert [step(1.0, t) for t in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    assert cosine(0.1, 0) == pytest.approx(0.1) and cosine(0.1, 10) == pytest.approx(0.01)
    assert cosine(0.1, 5) == pytest.approx(0.055) and cosine(0.1, 50) == pytest.approx(0.01)


@pytest.mark.parametrize("make, name", [
    (lambda: nn.StepDecay(1.5), "step_size"), (lambda: nn.StepDecay(True), "step_size"),
    (lambda: nn.StepDecay(0), "step_size"), (lambda: nn.StepDecay(2, gamma=0), "gamma"),
    (lambda: nn.StepDecay(2, gamma=1.5), "gamma"), (lambda: nn.StepDecay(2, gamma=math.nan), "gamma"),
    (lambda: nn.CosineDecay(2.5), "total"), (lambda: nn.CosineDecay(10, min_lr=-1), "min_lr"),
    (lambda: nn.CosineDecay(10, per="batch"), "per"), (lambda: nn.CosineDecay(10, per=["step"]), "per")])
def test_schedules_refuse_bad_settings_naming_them(make, name):
    """A fractional count is refused, not truncated (StepDecay(1.5) used to decay every epoch)."""
    with pytest.raises((ValueError, TypeError), match=rf"^{name}\b"):
        make()


def test_trainer_applies_schedules_per_epoch_and_per_step():
    X, y = make_moons(40, noise=0.1, random_state=0)
    trainer = nn.Trainer(_moons_model(), optimizer=nn.SGD(lr=0.4), schedule=nn.StepDecay(2, gamma=0.5))
    assert trainer.fit(X, y, epochs=5, batch_size=10, verbose=0)["lr"] == [0.4, 0.4, 0.2, 0.2, 0.1]
    trainer = nn.Trainer(_moons_model(), optimizer=nn.SGD(lr=0.4), schedule=nn.CosineDecay(8, per="step"))
    trainer.fit(X, y, epochs=1, batch_size=10, verbose=0)  # 4 steps: the last one ran at t = 3 of 8
    assert trainer.optimizer.lr == pytest.approx(0.2 * (1 + math.cos(math.pi * 3 / 8)))


def test_clip_grad_norm_scales_the_flat_buffer_once():
    grads = np.array([3.0, 4.0, 0.0], np.float32)
    assert optim.clip_grad_norm(grads, 10.0, 5.0) == 1.0
    np.testing.assert_array_equal(grads, [3, 4, 0])
    optim.clip_grad_norm(grads, 1.0, 5.0)
    np.testing.assert_allclose(np.linalg.norm(grads), 1.0, rtol=1e-5)
    assert grads.dtype == np.float32


def test_trainer_clips_the_global_gradient_norm():
    """Plain SGD with clipping moves the parameters by exactly lr * clip_norm when the gradient is larger."""
    X, y = make_moons(32, noise=0.1, random_state=0)
    model = nn.Sequential([nn.Dense(16, activation="relu", init="normal", init_std=3.0), nn.Dense(2)],
                          input_dim=2, seed=0)
    start = model.params.copy()
    trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.1), clip_norm=0.5)
    history = trainer.fit(X, y, epochs=1, batch_size=None, verbose=0)
    assert math.hypot(*(norms[0] for norms in history.grad_norms.values())) > 0.5
    assert np.linalg.norm(model.params - start) == pytest.approx(0.1 * 0.5, rel=1e-4)
