"""The training trajectory pinned bit for bit per host backend and host.

``tests/data/nn_trajectory.json`` holds, per backend and per host (:func:`host`), losses, accuracies and a
SHA-256 of the final weights and layer state, recorded by running this file as a script
(``python -m tests.test_nn_trajectory``, which adds or replaces this host's entries). The first entries were
recorded on the nn of commit 93a901a, before the fast training step existed; the fast step must reproduce them
exactly (same kernels, same order of arithmetic). The gradient norms are computed by a different kernel now (one
fused pass instead of a BLAS dot per layer), so they are compared to 1e-5.

The host matters: the numpy backend's products are OpenBLAS's, whose kernel (Haswell, SkylakeX, ...) sets their
last bits, and the numba backend's sums are vectorised by LLVM for the host CPU (``reassoc``: the order of a
reduction follows the vector width, so a znver4's losses differ from a znver3's in the last bits while the
weights here agree). A host with no entries is compared to another host's to 1e-5, so the test still checks
the trajectory there; record it to pin it exactly.

One entry was re-recorded on purpose: numba / adam_bn_dropout, when BatchNorm became a kernel whose
numba version accumulates the column statistics in float64 in row order (NumPy's pairwise float32
sums before). The old and new losses agree to 1e-6 relative (checked when re-recording); the numpy
backend's BatchNorm kernel keeps the old arithmetic and its entries are unchanged.
"""

import hashlib
import json
import pathlib

import numpy as np
import pytest

import kernels
import nn

DATA = pathlib.Path(__file__).parent / "data" / "nn_trajectory.json"

CONFIGS = {
    "adam_bn_dropout": dict(layers=lambda: [nn.Dense(16, activation="relu"), nn.BatchNorm(), nn.Dropout(0.2),
                                            nn.Dense(12, activation="tanh"), nn.Dense(3)],
                            optimizer=lambda: nn.Adam(lr=0.01), batch_size=16),
    "sgd_momentum_activations": dict(layers=lambda: [nn.Dense(10), nn.LeakyReLU(0.1), nn.Dense(10, activation="sigmoid"),
                                                     nn.Tanh(), nn.Dense(3)],
                                     optimizer=lambda: nn.SGD(lr=0.1, momentum=0.9, nesterov=True), batch_size=7),
}


def _data():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((61, 5)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] * X[:, 2] > 0).astype(np.int64) + (X[:, 3] > 1)
    return X, y


def run(backend, config):
    spec = CONFIGS[config]
    X, y = _data()
    with kernels.use_backend(backend):
        model = nn.Sequential(spec["layers"](), seed=5)
        trainer = nn.Trainer(model, optimizer=spec["optimizer"]())
        history = trainer.fit(X, y, epochs=3, batch_size=spec["batch_size"], verbose=0)
    return trajectory(model, history)


def trajectory(model, history):
    """What is recorded of a run: losses (hex), accuracies, a SHA-256 of the weights and layer state, norms."""
    digest = hashlib.sha256(np.asarray(model.params).tobytes())
    for key, value in sorted(model.state().items()):
        digest.update(key.encode() + np.asarray(value).tobytes())
    return {"loss": [v.hex() for v in history["loss"]], "accuracy": history["accuracy"],
            "weights_sha256": digest.hexdigest(), "grad_norms": history.grad_norms}


def host(backend):
    """The key of this host's entries: OpenBLAS's kernel for numpy (else the BLAS library's name), LLVM's
    CPU name for numba."""
    if backend == "numba":
        return kernels.cpu_info()["cpu"]
    from kernels.cpu._cpuinfo import numpy_blas

    blas = numpy_blas(any_blas=True)
    return (blas.get("architecture") or blas["internal_api"]) if blas else "unknown"


def _losses(entry):
    return [float.fromhex(v) for v in entry["loss"]]


def _assert_rounding(got, expected):
    """The same trajectory to rounding: losses and gradient norms to 1e-5."""
    np.testing.assert_allclose(_losses(got), _losses(expected), rtol=1e-5)
    assert got["grad_norms"].keys() == expected["grad_norms"].keys()
    for name, norms in expected["grad_norms"].items():
        np.testing.assert_allclose(got["grad_norms"][name], norms, rtol=1e-5)


def assert_trajectory(got, backend, config):
    """``got`` (as :func:`run` returns it) is this host's recorded trajectory bit for bit, or where none is
    recorded here, another host's to rounding; the gradient norms to 1e-5 either way."""
    recorded, here = json.loads(DATA.read_text())[backend], host(backend)
    if here in recorded:
        expected = recorded[here][config]
        assert got["loss"] == expected["loss"]
        assert got["accuracy"] == expected["accuracy"]
        assert got["weights_sha256"] == expected["weights_sha256"]
    else:  # not pinned on this host: another host's trajectory, to rounding
        expected = next(iter(recorded.values()))[config]
        np.testing.assert_allclose(got["accuracy"], expected["accuracy"], atol=1.5 / len(_data()[1]))  # a sample
    _assert_rounding(got, expected)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_training_reproduces_the_recorded_trajectory_bit_for_bit(backend, config):
    assert_trajectory(run(backend, config), backend, config)


def test_a_host_with_no_record_is_held_to_another_hosts_trajectory(monkeypatch):
    """On a host with no entries (pretended here) the trajectory is still checked: to rounding, not loosely."""
    got = run("numba", "sgd_momentum_activations")
    monkeypatch.setitem(globals(), "host", lambda backend: "unrecorded")
    assert_trajectory(got, "numba", "sgd_momentum_activations")
    got["loss"][-1] = (_losses(got)[-1] * (1 + 1e-4)).hex()
    with pytest.raises(AssertionError):
        assert_trajectory(got, "numba", "sgd_momentum_activations")


def test_the_hosts_recorded_agree_to_rounding():
    """Every host's entries are the same trajectory: losses and gradient norms to 1e-5 across hosts."""
    data = json.loads(DATA.read_text())
    for backend, hosts in data.items():
        first, *others = hosts.values()
        for other in others:
            for config in CONFIGS:
                _assert_rounding(other[config], first[config])


if __name__ == "__main__":
    data = json.loads(DATA.read_text())
    for backend in ("numpy", "numba"):
        data[backend][host(backend)] = {config: run(backend, config) for config in sorted(CONFIGS)}
    DATA.write_text(json.dumps(data, indent=1) + "\n")
