"""The main job, ``python -m nn.train``, end to end on a few epochs, and its dataset loaders."""

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

from nn import checkpoint, data, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _accuracy(output):
    last = output.strip().splitlines()[-1]
    assert last.startswith("test accuracy: ")
    return float(last.split(": ")[1])


@pytest.mark.slow
def test_main_job_runs_end_to_end_as_a_module(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "nn.train", "--epochs", "3"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 3/3: loss" in proc.stdout and "val_accuracy" in proc.stdout
    assert "samples/s: " in proc.stdout
    assert "sample/s" in proc.stderr  # the progress bar
    assert _accuracy(proc.stdout) > 0.8


def test_main_with_plot_and_save(tmp_path, capsys):
    png, saved = tmp_path / "curves.png", tmp_path / "model.npz"
    metrics = train.main(["--backend", "numpy", "--epochs", "2", "--optimizer", "sgd", "--lr", "0.1",
                          "--plot", str(png), "--save", str(saved), "--verbose", "0"])
    out = capsys.readouterr().out
    assert _accuracy(out) == pytest.approx(metrics["accuracy"], abs=1e-4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, optimizer, meta = checkpoint.load(saved)
    assert meta == {"epoch": 2} and type(optimizer).__name__ == "SGD" and optimizer.lr == 0.1
    assert model.input_dim == 64 and model.output_dim == 10


def _digits_as_images():
    X, y = data.load_digits()
    return (X.reshape(-1, 8, 8) * 16).round().astype(np.uint8), y.astype(np.uint8)


def _write_idx(path, array):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_main_trains_on_mnist_format_idx_files(tmp_path, capsys):
    images, labels = _digits_as_images()
    for prefix, rows in (("train", slice(0, 1500)), ("t10k", slice(1500, None))):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images[rows])
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels[rows])
    (X, y), (X_test, y_test) = data.load(str(tmp_path))
    assert X.shape == (1500, 64) and X_test.shape == (297, 64) and X.max() == 1.0 and y.dtype == np.int64
    train.main(["--data", str(tmp_path), "--epochs", "5", "--verbose", "0", "--backend", "numpy"])
    out = capsys.readouterr().out
    assert "1350 training, 150 validation, 297 test samples" in out
    assert _accuracy(out) > 0.85


def test_main_trains_on_an_npz_with_x_and_y(tmp_path, capsys):
    images, labels = _digits_as_images()
    np.savez(tmp_path / "digits.npz", x=images, y=labels)
    train.main(["--data", str(tmp_path / "digits.npz"), "--epochs", "5", "--verbose", "0", "--backend", "numpy"])
    assert _accuracy(capsys.readouterr().out) > 0.85


def test_dataset_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load(str(tmp_path))
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="must hold arrays x and y"):
        data.load(str(tmp_path / "bad.npz"))
    _write_idx(tmp_path / "short.gz", np.zeros((4, 2), np.uint8))
    with gzip.open(tmp_path / "short.gz", "rb") as f:
        raw = f.read()
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(raw[:-1])
    with pytest.raises(ValueError, match="promises shape \\(4, 2\\)"):
        data.read_idx(tmp_path / "short.gz")


def test_digits_read_without_sklearn_match_its_loader(monkeypatch):
    """The bundled file read directly gives exactly what scikit-learn's loader gives (the fallback route)."""
    import importlib.util

    from sklearn.datasets import load_digits as sk_load_digits

    direct = data.load_digits()
    X, y = sk_load_digits(return_X_y=True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # the file not found: the loader
    fallback = data.load_digits()
    for got in (direct, fallback):
        assert got[0].dtype == np.float32 and got[1].dtype == np.int64
        assert np.array_equal(got[0], (X / 16).astype(np.float32)) and np.array_equal(got[1], y)


def test_every_split_is_scaled_by_the_train_splits_largest_value(tmp_path):
    """A pixel value is the same feature in the train and the test split, whatever each split's brightest pixel."""
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 251, (10, 4, 4)).astype(np.uint8)
    x_train[0, 0, 0] = 250
    x_test = np.minimum(x_train[:3], 200)
    np.savez(tmp_path / "m.npz", x_train=x_train, y_train=np.arange(10) % 3, x_test=x_test, y_test=np.arange(3))
    (X, _), (X_test, _) = data.load(str(tmp_path / "m.npz"))
    np.testing.assert_array_equal(X, (x_train.reshape(10, -1) / 250).astype(np.float32))
    np.testing.assert_array_equal(X_test, (x_test.reshape(3, -1) / 250).astype(np.float32))
    np.savez(tmp_path / "signed.npz", x=np.array([[3, -4], [1, 2]]), y=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"signed.npz:x holds negative integers \(minimum -4\)"):
        data.load(str(tmp_path / "signed.npz"))


@pytest.mark.parametrize("fraction, rows", [(0, 10), (1, 10), (1.5, 10), (-0.1, 10), (0.5, 1)])
def test_split_refuses_a_fraction_that_leaves_a_side_empty(fraction, rows):
    X, y = np.zeros((rows, 2), np.float32), np.zeros(rows, np.int64)
    with pytest.raises(ValueError, match=r"^fraction\b"):
        data.split(X, y, fraction, seed=0)


def test_split_keeps_a_row_on_each_side():
    X, y = np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10)
    (X_rest, y_rest), (X_part, y_part) = data.split(X, y, 0.99, seed=0)
    assert len(X_rest) == 1 and len(X_part) == 9 and sorted(np.concatenate([y_rest, y_part])) == list(range(10))
