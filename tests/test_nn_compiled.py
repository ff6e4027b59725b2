"""The compiled epoch (nn._compiled, kernels.cpu.step) against the per-kernel step: bit for bit the same
losses, accuracies, gradient norms, weights, optimizer state and dropout counters; the same NonFiniteError
at the same step with the same weights; the fallbacks; Ctrl-C between calls."""

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
import nn
from kernels.cpu import _parallel, step
from kernels.cpu._gemm import PARALLEL_MIN_FLOPS
from nn import _compiled

from test_nn_trajectory import CONFIGS, _data, assert_trajectory, trajectory


def _fit(compiled, layers, optimizer, X, y, epochs=2, batch_size=7, dtype="float32", fits=1,
         loss="softmax_cross_entropy", **fit):
    model = nn.Sequential(layers(), seed=5, dtype=dtype)
    schedule, clip_norm = fit.pop("schedule", None), fit.pop("clip_norm", None)
    trainer = nn.Trainer(model, loss=loss, optimizer=optimizer(), compiled=compiled, schedule=schedule,
                         clip_norm=clip_norm)
    fit.setdefault("verbose", 0)
    return trainer, _fits(trainer, X, y, fits, epochs=epochs, batch_size=batch_size, **fit)


def _fits(trainer, X, y, fits=1, **fit):
    """The histories of ``fits`` fits, the last one the message of a NonFiniteError where one stopped them (a
    random model may diverge: both steps must then stop alike)."""
    histories = []
    try:
        for _ in range(fits):
            histories.append(trainer.fit(X, y, **fit))
    except nn.NonFiniteError as error:
        histories.append(str(error))
    return histories


def _outcome(trainer, histories):
    """Everything a run leaves behind, as exact values."""
    opt = trainer.optimizer
    return dict(history=[h if isinstance(h, str) else (h.history, h.grad_norms) for h in histories],
                params=trainer.model.params.tobytes(),
                state={k: v.tobytes() for k, v in opt.state.items()}, t=opt.t, lr=opt.lr,
                layer_state={k: v.tobytes() for k, v in trainer.model.state().items()})


def _assert_same(a, b):
    assert a["history"] == b["history"]
    assert a["params"] == b["params"]
    assert a["state"] == b["state"] and a["t"] == b["t"] and a["lr"] == b["lr"]
    assert a["layer_state"] == b["layer_state"]


@pytest.fixture
def calls(monkeypatch):
    """Counts the compiled driver's calls (to tell which path ran)."""
    count = [0]
    dynamic = _parallel.dynamic

    def spy(kernel, *args):
        count[0] += kernel is step.train_steps
        return dynamic(kernel, *args)

    monkeypatch.setattr(_parallel, "dynamic", spy)
    return count


def test_compiled_reproduces_the_recorded_trajectory_bit_for_bit(calls):
    spec = CONFIGS["sgd_momentum_activations"]
    X, y = _data()
    trainer, (history,) = _fit(True, spec["layers"], spec["optimizer"], X, y, epochs=3,
                               batch_size=spec["batch_size"])
    assert calls[0] == 3
    assert_trajectory(trajectory(trainer.model, history), "numba", "sgd_momentum_activations")
    _assert_same(_outcome(trainer, [history]), _outcome(*_fit(False, spec["layers"], spec["optimizer"], X, y,
                                                               epochs=3, batch_size=spec["batch_size"])))


ACTIVATIONS = st.sampled_from([None, "relu", "leaky_relu", "sigmoid", "tanh"])


@st.composite
def models(draw):
    """Layer factories: Dense layers (any activation, leaky slopes) with Activation and Dropout layers
    between them, ending in a Dense of 2-4 outputs."""
    specs = []
    for _ in range(draw(st.integers(0, 2))):
        specs.append(("dense", draw(st.integers(1, 12)), draw(ACTIVATIONS), draw(st.sampled_from([0.01, 0.2]))))
        extra = draw(st.sampled_from([None, "relu", "leaky_relu", "sigmoid", "tanh", "softmax", "dropout"]))
        if extra == "dropout":
            specs.append(("dropout", draw(st.sampled_from([0.0, 0.3, 0.7]))))
        elif extra:
            specs.append(("activation", extra, draw(st.sampled_from([0.01, 0.3]))))
    specs.append(("dense", draw(st.integers(2, 4)), None, 0.01))

    def layers():
        out = []
        for s in specs:
            if s[0] == "dense":
                out.append(nn.Dense(s[1], activation=s[2], alpha=s[3]))
            elif s[0] == "dropout":
                out.append(nn.Dropout(s[1]))
            else:
                out.append(nn.Activation(s[1], alpha=s[2]))
        return out

    return layers, specs


OPTIMIZERS = st.sampled_from([
    lambda: nn.SGD(lr=0.1),
    lambda: nn.SGD(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    lambda: nn.SGD(lr=0.05, momentum=0.8, nesterov=True),
    lambda: nn.Adam(lr=0.01),
    lambda: nn.Adam(lr=0.02, beta1=0.8, weight_decay=1e-2),
    lambda: nn.AdamW(lr=0.01),
    lambda: nn.RMSProp(lr=0.01),
    lambda: nn.RMSProp(lr=0.01, alpha=0.9, momentum=0.5, weight_decay=1e-3),
    lambda: nn.Adagrad(lr=0.05, weight_decay=1e-3),
    lambda: nn.Adadelta(rho=0.8, weight_decay=1e-3),
])
LOSSES = st.sampled_from(["softmax_cross_entropy", "mse", "binary_cross_entropy", "hinge"])


def _targets(loss, rng, n, outputs):
    """Targets of ``loss`` for a model with ``outputs`` outputs: class labels, real values, 0/1 or -1/+1."""
    if loss == "softmax_cross_entropy":
        return rng.integers(0, 2, n)
    if loss == "mse":
        return rng.standard_normal((n, outputs))
    values = rng.integers(0, 2, (n, outputs)).astype(float)
    return values if loss == "binary_cross_entropy" else 2 * values - 1
SCHEDULES = st.sampled_from([None, nn.StepDecay(2, 0.5), nn.CosineDecay(7, per="step")])


@settings(max_examples=40)
@given(model=models(), optimizer=OPTIMIZERS, loss=LOSSES, n=st.integers(1, 40), batch_size=st.integers(1, 16),
       dtype=st.sampled_from(["float32", "float64"]), shuffle=st.booleans(), schedule=SCHEDULES,
       clip_norm=st.sampled_from([None, 0.3]), seed=st.integers(0, 2**16))
def test_random_models_train_bit_for_bit_as_the_per_kernel_step(model, optimizer, loss, n, batch_size, dtype, shuffle,
                                                                schedule, clip_norm, seed):
    layers, specs = model
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 3)) * 2
    y = _targets(loss, rng, n, specs[-1][1])
    runs = [_outcome(*_fit(compiled, layers, optimizer, X, y, batch_size=batch_size, dtype=dtype, fits=2, loss=loss,
                           shuffle=shuffle, schedule=schedule, clip_norm=clip_norm)) for compiled in (True, False)]
    _assert_same(*runs)


def test_models_whose_per_kernel_step_is_multithreaded_match_too(calls):
    """Sizes where the per-kernel step runs every kernel's multithreaded branch (GEMMs, activations and
    their chunked column sums, dropout, gradient norms of 570k parameters, the optimizers' chunks): the
    compiled step calls the same kernels and matches bit for bit (a last partial batch included)."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((200, 300)).astype(np.float32), rng.integers(0, 10, 200)

    def layers():
        return [nn.Dense(1024, activation="tanh"), nn.Dropout(0.3), nn.Dense(256), nn.ReLU(), nn.Dense(10)]

    for optimizer in (lambda: nn.SGD(lr=0.01, momentum=0.9), lambda: nn.Adam(lr=1e-3)):
        runs = [_outcome(*_fit(compiled, layers, optimizer, X, y, batch_size=150)) for compiled in (True, False)]
        _assert_same(*runs)
    assert calls[0] == 4


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_small_batches_take_the_same_gemm_routes(calls, dtype):
    """Batches of 1 to 24 (a last partial batch too), where the products take the small-M routes (rows at
    1 and 2, dot tiles on W^T in place for dx up to 8, register tiles on W in place up to 32): the
    compiled step chooses them as kernels.matmul does and matches bit for bit."""
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((50, 300)), rng.integers(0, 10, 50)

    def layers():
        return [nn.Dense(96, activation="relu"), nn.Dense(80, activation="tanh"), nn.Dense(10)]

    for batch_size in (1, 2, 8, 24):
        runs = [_outcome(*_fit(compiled, layers, lambda: nn.SGD(lr=0.01, momentum=0.9), X, y, epochs=1,
                               batch_size=batch_size, dtype=dtype)) for compiled in (True, False)]
        _assert_same(*runs)
    assert calls[0] == 4


@pytest.mark.parametrize("scale, lr, activation, message", [
    (30, 1e4, "relu", "step 21: the gradient of layer 'dense_0' became nan"),
    (1, 100, "tanh", "step 13: the loss became nan"),
    (1000, 1e4, "relu", "step 4: the loss became nan .layer 'dense_1' has non-finite weights"),
])
def test_a_non_finite_step_raises_the_per_kernel_error_with_the_same_weights(calls, scale, lr, activation, message):
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((200, 6)).astype(np.float32) * scale, rng.integers(0, 3, 200)
    results = []
    for compiled in (True, False):
        model = nn.Sequential([nn.Dense(16, activation=activation), nn.Dense(16, activation="relu"), nn.Dense(3)],
                              seed=1)
        trainer = nn.Trainer(model, optimizer=nn.SGD(lr=lr, momentum=0.9), compiled=compiled)
        with pytest.raises(nn.NonFiniteError, match=message) as error:
            trainer.fit(X, y, epochs=5, batch_size=8, verbose=0)
        results.append((str(error.value), model.params.tobytes(), trainer.optimizer.state["velocity"].tobytes(),
                        trainer.optimizer.t, trainer.epoch))
    assert calls[0] == 1  # the compiled epoch stopped at the step and raised
    assert results[0] == results[1]  # message, weights, optimizer state and step count


def test_after_a_non_finite_step_training_goes_on_as_after_the_per_kernel_one(calls):
    """A compiled epoch stopped by a non-finite step (a row of 3e38 overflows the forward) leaves what the
    per-kernel step leaves (weights, optimizer state, step count, the per-step schedule's rate, dropout
    counters): training on from there, without that row, runs bit for bit alike."""
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((200, 6)).astype(np.float32), rng.integers(0, 3, 200)
    bad = X.copy()
    bad[21] = np.float32(3e38)
    runs = []
    for compiled in (True, False):
        model = nn.Sequential([nn.Dense(16, activation="relu"), nn.Dropout(0.25), nn.Dense(16, activation="relu"),
                               nn.Dense(3)], seed=1)
        trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.05, momentum=0.9), compiled=compiled,
                             schedule=nn.schedules.StepDecay(7, gamma=0.9, per="step"))
        before = _fits(trainer, X, y, epochs=1, batch_size=8, verbose=0)
        stopped = _outcome(trainer, before + _fits(trainer, bad, y, epochs=1, batch_size=8, verbose=0, shuffle=False))
        assert re.fullmatch("training stopped at epoch 2, step 3: the loss became nan.*", stopped["history"][-1])
        went_on = _fits(trainer, X, y, epochs=2, batch_size=8, verbose=0)
        assert not any(isinstance(h, str) for h in went_on)
        runs.append((stopped, _outcome(trainer, went_on)))
    assert calls[0] == 1 + 1 + 2  # every epoch compiled, the stopped one too
    _assert_same(*(stopped for stopped, _ in runs))
    _assert_same(*(went_on for _, went_on in runs))


class _FailingSchedule(nn.schedules.Schedule):
    """A per-step schedule whose rate turns invalid at step 13."""

    def __init__(self):
        super().__init__("step")

    def __call__(self, base_lr, t):
        return base_lr if t < 13 else -1.0


def test_a_schedule_that_turns_invalid_mid_epoch_raises_at_its_step(calls):
    """The compiled epoch checks the epoch's rates before its first step; an epoch with an invalid one runs
    per kernel, which raises at that step with the steps before it applied."""
    X, y = _data()
    results = []
    for compiled in (True, False):
        model = nn.Sequential([nn.Dense(8, activation="relu"), nn.Dense(3)], seed=0)
        trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.01, momentum=0.9), compiled=compiled,
                             schedule=_FailingSchedule())
        with pytest.raises(ValueError, match="lr") as error:
            trainer.fit(X, y, epochs=3, batch_size=8, verbose=0)
        results.append((str(error.value), _outcome(trainer, [])))
    assert calls[0] == 1  # the first epoch (steps 0-7); the second fails at step 13
    assert results[0][0] == results[1][0]
    _assert_same(results[0][1], results[1][1])
    assert results[0][1]["t"] == 13


class _CustomLoss(nn.losses.MSE):
    name = "custom_mse"


class _CustomAdam(nn.Adam):
    pass


def test_fallbacks_and_the_explicit_choice(calls):
    X, y = _data()
    small = [nn.Dense(8, activation="relu"), nn.Dense(3)]
    cases = {  # why the compiled step cannot run: the per-kernel step runs instead
        "BatchNorm": dict(layers=lambda: [nn.Dense(8), nn.BatchNorm(), nn.Dense(3)]),
        "custom_mse": dict(loss=_CustomLoss(), y=np.eye(3)[y]),
        "_CustomAdam": dict(optimizer=_CustomAdam()),
        "numba backend": dict(backend="numpy"),
    }
    for reason, case in cases.items():
        for compiled in (None, True):
            with kernels.use_backend(case.get("backend", "numba")):
                model = nn.Sequential(case.get("layers", lambda: list(small))(), seed=0)
                trainer = nn.Trainer(model, loss=case.get("loss", "softmax_cross_entropy"),
                                     optimizer=case.get("optimizer", "adam"), compiled=compiled)
                if compiled:
                    with pytest.raises(ValueError, match=f"compiled=True, but .*{reason}"):
                        trainer.fit(X, case.get("y", y), epochs=1, verbose=0)
                else:
                    trainer.fit(X, case.get("y", y), epochs=1, verbose=0)
    assert calls[0] == 0
    nn.Trainer(nn.Sequential([nn.Dense(3)], seed=0), compiled=False).fit(X, y, verbose=0)
    assert calls[0] == 0
    nn.Trainer(nn.Sequential([nn.Dense(3)], seed=0)).fit(X, y, verbose=0)  # automatic: small, so compiled
    assert calls[0] == 1
    wide = np.random.default_rng(0).standard_normal((8, 300))  # 1 step of 0.6 MB of weights: compiled all the same
    nn.Trainer(nn.Sequential([nn.Dense(512), nn.Dense(3)], seed=0)).fit(wide, y[:8], batch_size=8, verbose=0)
    assert calls[0] == 2
    with pytest.raises(ValueError, match="compiled must be None"):
        nn.Trainer(nn.Sequential([nn.Dense(3)]), compiled="yes")


def test_progress_bar_and_calls_of_a_few_steps(monkeypatch, calls, capsys):
    monkeypatch.setattr(_compiled, "CALL_SAMPLES", 20)
    X, y = _data()
    spec = CONFIGS["sgd_momentum_activations"]
    runs = [_outcome(*_fit(compiled, spec["layers"], spec["optimizer"], X, y, batch_size=6, verbose=1))
            for compiled in (True, False)]
    _assert_same(*runs)
    assert calls[0] == 2 * 4  # 11 steps per epoch, 3 per call
    assert "epoch 2/2" in capsys.readouterr().out


def test_ctrl_c_stops_after_the_current_call_and_fit_continues(monkeypatch, calls):
    monkeypatch.setattr(_compiled, "CALL_SAMPLES", 20)
    spy = _parallel.dynamic  # the calls fixture's

    def interrupted(kernel, *args):
        done = spy(kernel, *args)
        if calls[0] == 2:
            signal.raise_signal(signal.SIGINT)
        return done

    monkeypatch.setattr(_parallel, "dynamic", interrupted)
    X, y = _data()
    spec = CONFIGS["sgd_momentum_activations"]
    model = nn.Sequential(spec["layers"](), seed=5)
    trainer = nn.Trainer(model, optimizer=spec["optimizer"]())
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(X, y, epochs=1, batch_size=10, shuffle=False, verbose=0)
    assert trainer.optimizer.t == 4 and trainer.epoch == 0  # two calls of two steps
    reference, _ = _fit(False, spec["layers"], spec["optimizer"], X[:40], y[:40], epochs=1, batch_size=10,
                        shuffle=False)
    assert model.params.tobytes() == reference.model.params.tobytes()
    trainer.fit(X, y, epochs=1, batch_size=10, verbose=0)
    assert trainer.optimizer.t == 4 + 7 and trainer.epoch == 1


def test_the_automatic_choice_never_compiles_the_driver_cold(tmp_path):
    """With an empty cache, compiled=None trains per kernel (the driver's cold compile would cost more than
    a short run saves); once compiled (compiled=True), a new process's automatic choice loads and runs it."""
    code = """
import numpy as np, nn
from kernels.cpu import _parallel, step
ran = [0]
dynamic = _parallel.dynamic
def spy(kernel, *args):
    ran[0] += kernel is step.train_steps
    return dynamic(kernel, *args)
_parallel.dynamic = spy
X, y = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32), np.arange(16) % 2
for compiled in (None, {explicit}, None):
    model = nn.Sequential([nn.Dense(3, activation="relu"), nn.Dense(2)], input_dim=4, seed=0)
    nn.Trainer(model, compiled=compiled).fit(X, y, batch_size=4, verbose=0)
    print(ran[0], end=" ")
"""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    run = [sys.executable, "-c"]
    first = subprocess.run(run + [code.format(explicit=True)], env=env, capture_output=True, text=True, check=True)
    assert first.stdout.split() == ["0", "1", "2"]  # cold: per kernel; True compiles; then in-process: compiled
    second = subprocess.run(run + [code.format(explicit=False)], env=env, capture_output=True, text=True, check=True)
    assert second.stdout.split() == ["1", "1", "2"]  # the cached driver is loaded and chosen


@pytest.mark.parametrize("optimizer", [lambda: nn.SGD(lr=0.05), lambda: nn.SGD(lr=0.01, momentum=0.9, nesterov=True,
                                                                                 weight_decay=0.01),
                                       lambda: nn.Adam(lr=1e-3), lambda: nn.AdamW(lr=1e-3, weight_decay=0.1),
                                       lambda: nn.RMSProp(lr=1e-3, momentum=0.9), lambda: nn.Adagrad(lr=0.01),
                                       lambda: nn.Adadelta()])
@pytest.mark.parametrize("first", ["dense", "dropout"])
def test_batches_of_one_and_two_update_the_first_layer_with_its_product(calls, optimizer, first):
    """At a batch of one or two without clipping the compiled step computes the first parameter layer's
    dW (an outer product) and its update piece by piece (300 x 128: many pieces, the last partial; after dx
    when a dropout layer comes first), its norm from the factors: bit for bit the per-kernel step, norms
    and gradients left in layer.grads included; a clipped step takes the separate product and scaled update."""
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((9, 300)).astype(np.float32), rng.integers(0, 10, 9)

    def layers():
        head = [nn.Dropout(0.2)] if first == "dropout" else []
        return head + [nn.Dense(128, activation="relu"), nn.Dense(10)]

    assert 300 * 128 > 2 * _parallel.CHUNK > 2 * step.PIECE
    for batch_size, clip_norm in ((1, None), (2, None), (1, 0.5)):
        runs = [_fit(compiled, layers, optimizer, X, y, batch_size=batch_size, clip_norm=clip_norm)
                for compiled in (True, False)]
        _assert_same(*[_outcome(*run) for run in runs])
        assert runs[0][0].model.grads.tobytes() == runs[1][0].model.grads.tobytes()
    assert calls[0] == 3 * 2


@pytest.mark.parametrize("units, activation, dtype", [(120, None, "float32"), (128, "leaky_relu", "float64"),
                                                      (36, "relu", "float64"), (2056, "relu", "float32")])
def test_batches_of_one_and_two_fold_the_next_forward_product_into_the_update(calls, units, activation, dtype):
    """Where the first layer's forward product is folded into the previous step's update of W (a batch of
    one or two, not clipped, no activation, relu or leaky relu, whole vectors of outputs): rows of W cut by
    segment_norms' pieces (120 and 36 columns), rows longer than a piece (2056 columns, 822k gradients:
    the per-kernel norms in parallel), float64's 4-lane vectors, a last batch of one after batches of two;
    bit for bit the per-kernel step."""
    rng = np.random.default_rng(5)
    X, y = rng.standard_normal((7, 400)), rng.integers(0, 10, 7)

    def layers():
        return [nn.Dense(units, activation=activation), nn.Dense(10)]

    for batch_size in (1, 2):
        runs = [_fit(compiled, layers, lambda: nn.SGD(lr=0.01, momentum=0.9), X, y, batch_size=batch_size,
                     dtype=dtype) for compiled in (True, False)]
        _assert_same(*[_outcome(*run) for run in runs])
    assert calls[0] == 2 * 2


def test_batch_one_matches_with_a_first_layer_larger_than_the_cache(calls):
    """A first layer of 600k weights (2.4 MB: W and its pieces beyond L2) at a batch of one: bit for bit the
    per-kernel step."""
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((3, 800)).astype(np.float32), rng.integers(0, 10, 3)

    def layers():
        return [nn.Dense(750, activation="relu"), nn.Dense(10)]

    runs = [_fit(compiled, layers, lambda: nn.SGD(lr=0.01), X, y, epochs=1, batch_size=1) for compiled in (True, False)]
    assert runs[0][0].model.params.size >= 2 * 1 << 18
    _assert_same(*[_outcome(*run) for run in runs])
    assert calls[0] == 1


@pytest.fixture
def two_threads():
    """Numba's thread count at two for the test (nn gives the first layer a worker thread only then)."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two Numba threads")
    previous = numba.get_num_threads()
    numba.set_num_threads(2)
    yield
    numba.set_num_threads(previous)


class _Jobs(list):
    wait = False


@pytest.fixture
def jobs(monkeypatch):
    """The job words (``step.run``'s last argument) of every compiled call, in order; ``jobs.wait = True``: the
    driver of each later call with a worker waits for it to take its share, however late (``JOB_WAIT``)."""
    recorded, run = _Jobs(), step.run

    def spy(*args):
        recorded.append(args[-1])
        if recorded.wait and args[-1].size:
            args[-1][step.JOB_WAIT] = 1
        return run(*args)

    monkeypatch.setattr(step, "run", spy)
    return recorded


def _absent_worker(monkeypatch):
    """Make the worker absent from each call (its core busy elsewhere): it starts only once the driver, done,
    tells it to STOP (it returns at once from run's call that compiles it)."""
    worker = step.worker

    def absent(job, *args):
        while job[step.JOB_STATE] != step.STOP:
            time.sleep(0.001)
        return worker(job, *args)

    monkeypatch.setattr(step, "worker", absent)


@pytest.mark.parametrize("optimizer", [lambda: nn.SGD(lr=0.01, momentum=0.9), lambda: nn.Adam(lr=1e-3)])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_the_first_layer_pass_on_a_second_core_gives_the_one_core_bits(jobs, two_threads, optimizer, batch_size):
    """At a batch of one or two with two threads, a worker thread runs the first half of the first layer's
    pieces (W of 300 x 128, at least TWO_CORES_MIN) while the driver runs the second: bit for bit the run on
    one thread and the per-kernel step, the last batch odd, the worker's share taken by the worker every
    step (the driver told to wait for it)."""
    jobs.wait = True
    rng = np.random.default_rng(6)
    X, y = rng.standard_normal((63, 300)).astype(np.float32), rng.integers(0, 10, 63)

    def layers():
        return [nn.Dense(128, activation="relu"), nn.Dense(10)]

    assert 300 * 128 >= step.TWO_CORES_MIN
    outcomes = []
    for threads, compiled in ((2, True), (1, True), (2, False)):
        numba.set_num_threads(threads)
        outcomes.append(_outcome(*_fit(compiled, layers, optimizer, X, y, batch_size=batch_size)))
    _assert_same(outcomes[0], outcomes[1])
    _assert_same(outcomes[0], outcomes[2])
    assert [job.size for job in jobs] == [step.JOB_WORDS] * 2 + [0] * 2  # two epochs each
    for job in jobs[:2]:
        assert (job[step.JOB_STEPS], job[step.JOB_TAKEN]) == (-(-63 // batch_size), 0)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_with_clipping_the_steps_it_leaves_whole_take_the_first_layer_pass(monkeypatch, jobs, two_threads, batch_size):
    """At a batch of one or two the step is checked (every norm from its factors) before the first layer's
    backward pass: with a clipping norm between the steps' gradient norms, the steps it leaves whole take the
    fused pass on both cores (folding the next step's forward product), the clipped ones the separate product and
    the scaled update; bit for bit one thread and the per-kernel step."""
    jobs.wait = True
    rng = np.random.default_rng(11)
    X, y = rng.standard_normal((25, 300)).astype(np.float32), rng.integers(0, 10, 25)
    steps = 2 * -(-25 // batch_size)

    def layers():
        return [nn.Dense(128, activation="relu"), nn.Dense(10)]

    def per_kernel(clip_norm):
        """The per-kernel run, with each step's clipping scale and total gradient norm."""
        scales, totals, check = [], [], kernels.cpu.check_step

        def spy(loss, rows, norms, max_norm, metrics, scale):
            check(loss, rows, norms, max_norm, metrics, scale)
            scales.append(float(scale[0]))
            totals.append(math.sqrt(sum(float(v) ** 2 for v in norms)))

        with monkeypatch.context() as patch:
            patch.setattr(kernels.cpu, "check_step", spy)
            run = _fit(False, layers, lambda: nn.SGD(lr=0.01, momentum=0.9), X, y, batch_size=batch_size,
                       clip_norm=clip_norm)
        return run, scales, totals

    clip_norm = float(np.median(per_kernel(1e30)[2]))  # about half the steps clipped
    reference, scales, _ = per_kernel(clip_norm)
    whole = scales.count(1.0)
    assert len(scales) == steps and 0 < whole < steps
    outcomes = [_outcome(*reference)]
    for threads in (2, 1):
        numba.set_num_threads(threads)
        run = _fit(True, layers, lambda: nn.SGD(lr=0.01, momentum=0.9), X, y, batch_size=batch_size,
                   clip_norm=clip_norm)
        outcomes.append(_outcome(*run))
        assert run[0].model.grads.tobytes() == reference[0].model.grads.tobytes()
    _assert_same(outcomes[1], outcomes[0])
    _assert_same(outcomes[2], outcomes[0])
    assert [job.size for job in jobs] == [step.JOB_WORDS] * 2 + [0] * 2  # two epochs each
    assert sum(job[step.JOB_STEPS] for job in jobs[:2]) == whole and not any(job[step.JOB_TAKEN] for job in jobs[:2])


def test_the_driver_runs_the_share_of_a_worker_that_is_not_there(monkeypatch, jobs, two_threads):
    """A worker that never runs during the call (its core busy elsewhere): the driver runs its share itself,
    every step, rather than wait for it, with the same bits."""
    _absent_worker(monkeypatch)
    rng = np.random.default_rng(8)
    X, y = rng.standard_normal((15, 300)).astype(np.float32), rng.integers(0, 10, 15)

    def layers():
        return [nn.Dense(128, activation="relu"), nn.Dense(10)]

    runs = [_fit(compiled, layers, lambda: nn.Adam(lr=1e-3), X, y, batch_size=1, epochs=1)
            for compiled in (True, False)]
    _assert_same(*[_outcome(*run) for run in runs])
    assert [job.size for job in jobs] == [step.JOB_WORDS]
    assert (jobs[0][step.JOB_STEPS], jobs[0][step.JOB_TAKEN]) == (0, 15)  # every step's share run by the driver


def test_a_worker_only_where_it_pays():
    """A worker thread only at a batch of one or two (clipped or not), on two threads or more, for a first
    parameter layer (after a dropout layer too) of at least TWO_CORES_MIN weights."""
    layers = np.zeros((3, 11), np.int64)
    layers[:, step.KIND] = step.DROPOUT, step.DENSE, step.DENSE
    layers[1, step.IN_W], layers[1, step.OUT_W] = 256, step.TWO_CORES_MIN // 256
    assert step.job(layers, 1, 2).size == step.job(layers, 2, 16).size == step.JOB_WORDS
    for batch, threads in ((3, 2), (1, 1)):
        assert step.job(layers, batch, threads).size == 0
    layers[1, step.OUT_W] -= 1
    assert step.job(layers, 1, 2).size == 0
    # products: on exactly two threads, once a Dense layer's product reaches PARALLEL_MIN_FLOPS
    batch = -(-PARALLEL_MIN_FLOPS // (2 * 256 * layers[1, step.OUT_W]))
    words = step.job(layers, batch, 2)
    assert words.size == step.JOB_WORDS and (words[step.JOB_FIRST], words[step.JOB_SHARES]) == (0, 1)
    assert step.shared_products(layers, batch, 2) == 3  # x @ W, dW, dx (the table asks for dx)
    layers[1, step.DX_AT] = -1
    assert step.shared_products(layers, batch, 2) == 2
    for batch, threads in ((batch - 1, 2), (batch, 1), (batch, 3)):
        assert step.job(layers, batch, threads).size == 0
    # over the threshold in flops, but routed to the one-thread row kernels at a batch of one
    layers[1, step.IN_W], layers[1, step.OUT_W] = 1024, 1024
    words = step.job(layers, 1, 2)  # (a worker for the first layer's pass)
    assert step.shared_products(layers, 1, 2) == 0 and (words[step.JOB_FIRST], words[step.JOB_SHARES]) == (1, 0)


@pytest.mark.parametrize("activation, clip_norm", [("relu", None), ("tanh", 1e-3)])  # 1e-3: every update scaled
@pytest.mark.parametrize("late", [False, True])
def test_products_and_updates_shared_with_the_worker_give_the_thread_pool_bits(monkeypatch, jobs, two_threads,
                                                                               activation, clip_norm, late):
    """On two threads the worker shares each multithreaded product (x @ W1 and dW1 of the 300 x 256 layer at a
    batch of 32: 4.9 MFLOP each, over PARALLEL_MIN_FLOPS) and update (94K parameters, over PARALLEL_MIN; with
    clipping, scaled), chunk by chunk: bit for bit the per-kernel step (Numba's thread pool) and one thread,
    the last batch short, whether the worker joins each (the driver told to wait for it) or never runs
    meanwhile (the driver takes every chunk, waiting for no one)."""
    jobs.wait = not late
    if late:
        _absent_worker(monkeypatch)
    rng = np.random.default_rng(9)
    X, y = rng.standard_normal((75, 300)).astype(np.float32), rng.integers(0, 10, 75)

    def layers():
        return [nn.Dense(256, activation=activation), nn.Dense(64, activation=activation), nn.Dense(10)]

    outcomes = []
    for threads, compiled in ((2, True), (1, True), (2, False)):
        numba.set_num_threads(threads)
        outcomes.append(_outcome(*_fit(compiled, layers, lambda: nn.Adam(lr=1e-3), X, y, batch_size=32, epochs=1,
                                       clip_norm=clip_norm)))
    _assert_same(outcomes[0], outcomes[1])
    _assert_same(outcomes[0], outcomes[2])
    assert [job.size for job in jobs] == [step.JOB_WORDS, 0]
    job = jobs[0]
    assert (job[step.JOB_FIRST], job[step.JOB_SHARES]) == (0, 1)
    # x @ W1 and dW1 of the two full batches (the 256 x 64 layer's products: 1 MFLOP, one thread; the last batch
    # of 11 rows: 1.7 MFLOP), the update of every step
    assert (job[step.P_JOINED], job[step.U_JOINED]) == ((0, 0) if late else (2 * 2, 3))


@pytest.mark.parametrize("optimizer, dtype", [
    (lambda: nn.SGD(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3), "float32"),
    (lambda: nn.RMSProp(lr=1e-3, momentum=0.9), "float32"), (lambda: nn.Adagrad(lr=0.01), "float32"),
    (lambda: nn.Adadelta(), "float32"), (lambda: nn.AdamW(lr=1e-3), "float64")])
def test_every_optimizer_shared_with_the_worker_gives_the_thread_pool_bits(jobs, two_threads, optimizer, dtype):
    """The update's chunks, run by the body itself on each thread, are bit for bit those of the optimizer's chunked
    kernel under Numba's pool (the per-kernel step), for every optimizer and both dtypes."""
    jobs.wait = True
    rng = np.random.default_rng(10)
    X, y = rng.standard_normal((64, 300)), rng.integers(0, 10, 64)

    def layers():
        return [nn.Dense(256, activation="relu"), nn.Dense(10)]

    outcomes = [_outcome(*_fit(compiled, layers, optimizer, X, y, batch_size=32, epochs=1, dtype=dtype))
                for compiled in (True, False)]
    _assert_same(*outcomes)
    assert jobs[0][step.U_JOINED] == 2 and jobs[0][step.P_JOINED] == 2 * 2


def test_a_failing_worker_raises_its_error_and_its_thread_serves_the_next_call(monkeypatch, jobs, two_threads):
    """The worker's exception reaches the caller (the driver stops waiting for it); the pool's one thread
    is kept, idle, and runs the next call's worker."""
    worker = step.worker

    def failing(job, *args):
        if job[step.JOB_STATE] == step.STOP:  # run's call that compiles it
            return worker(job, *args)
        raise MemoryError("the worker's error")

    rng = np.random.default_rng(7)
    X, y = rng.standard_normal((5, 300)).astype(np.float32), rng.integers(0, 10, 5)

    def fit():
        return _fit(True, lambda: [nn.Dense(128, activation="relu"), nn.Dense(10)], lambda: nn.SGD(lr=0.01), X, y,
                    batch_size=1)

    jobs.wait = True  # else a worker that starts late may never be offered a share
    with monkeypatch.context() as patch:
        patch.setattr(step, "worker", failing)
        with pytest.raises(MemoryError, match="the worker's error"):
            fit()
    jobs.clear()
    fit()
    assert len(jobs) == 2 and all((job[step.JOB_STEPS], job[step.JOB_TAKEN]) == (5, 0) for job in jobs)
    assert 1 <= len([t for t in threading.enumerate() if t.name.startswith("kernels-step-worker")]) <= os.cpu_count()


def test_a_non_finite_step_at_batch_one_is_reported_with_the_weights_of_the_last_good_step(calls):
    """A non-finite step at a batch of one (checked before the first layer's product-and-update pass) leaves
    the weights of the last good step and raises the per-kernel step's error."""
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((40, 6)).astype(np.float32) * 30, rng.integers(0, 3, 40)
    results = []
    for compiled in (True, False):
        model = nn.Sequential([nn.Dense(16, activation="relu"), nn.Dense(3)], seed=1)
        trainer = nn.Trainer(model, optimizer=nn.SGD(lr=1e4), compiled=compiled)
        with pytest.raises(nn.NonFiniteError, match="became nan") as error:
            trainer.fit(X, y, epochs=5, batch_size=1, verbose=0)
        results.append((str(error.value), model.params.tobytes(), trainer.optimizer.t, trainer.epoch))
    assert calls[0] == 1
    assert results[0] == results[1]


def test_a_non_finite_step_at_batch_one_with_clipping_stops_before_the_first_layer_pass(calls):
    """With ``clip_norm``, a batch-one step whose forward overflows (a row of 3e38) stops at its check, before
    the first layer's pass: the weights of the last good step and the per-kernel step's error, whose advice is
    not to clip."""
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((40, 300)).astype(np.float32), rng.integers(0, 3, 40)
    X[17] = np.float32(3e38)
    results = []
    for compiled in (True, False):
        model = nn.Sequential([nn.Dense(128, activation="relu"), nn.Dense(3)], seed=1)
        trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.1, momentum=0.9), compiled=compiled, clip_norm=0.5)
        with pytest.raises(nn.NonFiniteError, match="step 18: the loss became nan.*learning rate or check the data$"
                           ) as error:
            trainer.fit(X, y, epochs=2, batch_size=1, verbose=0, shuffle=False)
        results.append((str(error.value), model.params.tobytes(), trainer.optimizer.t, trainer.epoch))
    assert calls[0] == 1
    assert results[0] == results[1]


def test_the_kernel_table_compiles_only_the_optimizer_and_loss_at_hand(monkeypatch):
    """The kernels of other optimizers and losses stay out of the table (their slots 0) until asked for."""
    assert len(step._entries(np.dtype(np.float32))) == step.SLOTS
    monkeypatch.setattr(step, "_tables", {})
    table = step.kernel_table(np.float32, step.RMSPROP_MOMENTUM, step.HINGE).copy()
    group = step.OPTIMIZER_K + 4 * step.optimizer_group(step.RMSPROP_MOMENTUM)
    wanted = set(range(step.OPTIMIZER_K)) | set(range(group, group + 4)) | {step.LOSS_K + step.HINGE,
                                                                             step.THRESHOLDS_K}
    assert {int(i) for i in np.flatnonzero(table)} == wanted
    again = step.kernel_table(np.float32, step.ADAMW, step.CROSS_ENTROPY)
    assert np.array_equal(again[table != 0], table[table != 0])  # the same table, grown
    adam = step.OPTIMIZER_K + 4 * step.optimizer_group(step.ADAM)
    assert np.all(again[adam:adam + 4] != 0) and again[step.LOSS_K + step.CROSS_ENTROPY] != 0
    assert again[step.COUNT_K] != 0 and again[step.LOSS_K + step.MSE] == 0


def test_the_loss_gradient_may_start_just_after_the_output():
    """softmax_cross_entropy once rounded differently when dlogits started just after the logits (LLVM's
    run-time overlap check sent its exp-and-sum loop to the scalar version, which sums in another order):
    a cold-cache run gave the per-kernel step such neighbours (Dense(4), batch 3), and the trainer kept
    its buffers 512 bytes apart. Its sum now has a loop of its own: every placement gives the same bits."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, labels = (rng.standard_normal((3, 4)) * 3).astype(np.float32), rng.integers(0, 4, 3)
        results = set()
        for gap in list(range(17)) + [128]:
            buf = np.zeros(24 + gap, np.float32)
            logits, dlogits = buf[:12].reshape(3, 4), buf[12 + gap:].reshape(3, 4)
            logits[:] = x
            results.add((kernels.softmax_cross_entropy(logits, labels, out=dlogits)[0].tobytes(), dlogits.tobytes()))
        assert len(results) == 1


def test_the_plan_is_rebuilt_when_what_it_holds_changes(calls):
    """The layer table, buffers and worker choice kept from epoch to epoch (``_compiled._plan``) follow
    what they depend on between fits: the batch size, clipping, a dropout rate, an activation; each
    sequence of fits gives the per-kernel step's bits."""
    rng = np.random.default_rng(11)
    X, y = rng.standard_normal((21, 300)).astype(np.float32), rng.integers(0, 4, 21)
    outcomes = []
    for compiled in (True, False):
        model = nn.Sequential([nn.Dense(128, activation="relu"), nn.Dropout(0.25), nn.Dense(4)], seed=3)
        trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.01, momentum=0.9), compiled=compiled)
        histories = []
        for change, batch in (("", 1), ("", 4), ("rate", 4), ("activation", 4), ("", 1), ("clip_norm", 1)):
            if change == "rate":  # one change from one fit to the next
                model.layers[1].rate = 0.5
            elif change == "activation":
                model.layers[2].activation = "tanh"
            elif change == "clip_norm":
                trainer.clip_norm = 0.5
            histories.append(trainer.fit(X, y, epochs=1, batch_size=batch, verbose=0))
        outcomes.append(_outcome(trainer, histories))
    assert calls[0] == 6
    _assert_same(*outcomes)


def test_ready_is_remembered_by_what_the_argument_types_depend_on():
    """``step.ready`` remembers a ready driver by the kinds of its arguments (typing them costs ~10 us each,
    every epoch): every property Numba's type depends on (dtype, rank, layout, writeability, an int's
    range) tells kinds apart; values do not."""
    from kernels.cpu import step

    X = np.zeros((4, 3), np.float32)
    kinds = [(X,), (X.astype(np.float64),), (np.asfortranarray(X),), (X[:, :2],), (1,), (2**63,), (1.0,), (True,)]
    keys = {step.kinds(args) for args in kinds}
    assert len(keys) == len(kinds)  # each kind its own key
    assert step.kinds((X + 1,)) == step.kinds((X,))  # values do not matter
    readonly = X.copy()
    readonly.flags.writeable = False
    assert step.kinds((readonly,)) != step.kinds((X,))


def test_the_driver_runs_what_the_per_kernel_step_runs_below_and_above_each_threshold():
    """The per-kernel step runs four kernels through ``_parallel.scheduled`` (the serial twin below the kernel's
    threading threshold); the driver's table holds both functions and ``step._scheduled`` picks the same one at
    the same threshold, so the compiled step never rests on a twin and its kernel agreeing bit for bit."""
    from kernels.cpu import activations, fused, losses

    table = step.kernel_table(np.float32, step.SGD, step.CROSS_ENTROPY)
    entries = step._entries(np.dtype(np.float32))
    cases = [(losses._cross_entropy_scheduled, step.LOSS_K + step.CROSS_ENTROPY, step.CROSS_ENTROPY_SERIAL_K,
              losses.PARALLEL_MIN),
             (losses.bias_grad_scheduled, step.BIAS_GRAD_K, step.BIAS_GRAD_SERIAL_K, losses.PARALLEL_MIN),
             (fused.segment_norms_scheduled, step.NORMS_K, step.NORMS_SERIAL_K, fused.NORMS_PARALLEL_MIN)]
    cases += [(fused._BIAS_ACT_BACKWARD_SCHEDULED[name], step.BIAS_ACT_K + i, step.BIAS_ACT_SERIAL_K + i,
               activations.PARALLEL_MIN) for i, name in enumerate(step._BIAS_ACT)]
    for wrapper, slot, twin, minimum in cases:
        assert (entries[slot][1], entries[twin][1], minimum) == (wrapper.kernel, wrapper.small, wrapper.minimum)
        assert table[slot] != 0 and table[twin] != 0 and table[slot] != table[twin]
        for size in (0, minimum - 1, minimum, minimum + 1):
            picked = step._scheduled.py_func(table, slot, twin, size, minimum)
            assert picked == table[twin if size < wrapper.minimum else slot]
