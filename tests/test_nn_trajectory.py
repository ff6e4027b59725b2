"""The training trajectory pinned bit for bit per host backend.

``tests/data/nn_trajectory.json`` was recorded by running this file as a script
(``python -m tests.test_nn_trajectory``) on the nn of commit 93a901a, before the fast training step
existed: losses, accuracies and a SHA-256 of the final weights and layer state. The fast step must
reproduce them exactly (same kernels, same order of arithmetic). The gradient norms are computed by a
different kernel now (one fused pass instead of a BLAS dot per layer), so they are compared to 1e-5.

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
    digest = hashlib.sha256(np.asarray(model.params).tobytes())
    for key, value in sorted(model.state().items()):
        digest.update(key.encode() + np.asarray(value).tobytes())
    return {"loss": [v.hex() for v in history["loss"]], "accuracy": history["accuracy"],
            "weights_sha256": digest.hexdigest(), "grad_norms": history.grad_norms}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_training_reproduces_the_recorded_trajectory_bit_for_bit(backend, config):
    expected = json.loads(DATA.read_text())[backend][config]
    got = run(backend, config)
    assert got["loss"] == expected["loss"]
    assert got["accuracy"] == expected["accuracy"]
    assert got["weights_sha256"] == expected["weights_sha256"]
    assert got["grad_norms"].keys() == expected["grad_norms"].keys()
    for name, norms in expected["grad_norms"].items():
        np.testing.assert_allclose(got["grad_norms"][name], norms, rtol=1e-5)


if __name__ == "__main__":
    DATA.write_text(json.dumps({b: {c: run(b, c) for c in sorted(CONFIGS)} for b in ("numpy", "numba")}, indent=1)
                    + "\n")
