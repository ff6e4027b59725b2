"""Datasets for the main job: scikit-learn's handwritten digits (ships inside the package, no
download), or an MNIST-format dataset from disk (IDX files, optionally gzipped, or an ``.npz``).

Every loader returns ``(X, y)`` or a train/test pair of them with ``X`` as float32 rows and ``y`` as
int64 class ids. Integer pixels are divided by the train split's largest value, the test split's by the
same number (so a pixel value means the same feature in both): the train split lies in [0, 1].
"""

import gzip
import importlib.util
import os

import numpy as np

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _features(X, what, scale=None):
    """Images flattened to float32 rows, and the scale used: integer pixels are divided by ``scale``
    (None: by their largest value, so they lie in [0, 1]; pass the train split's for a test split)."""
    X = np.asarray(X)
    X = X.reshape(len(X), -1)
    if X.dtype.kind not in "iu" or not X.size:
        return X.astype(np.float32), scale
    if X.min() < 0:
        raise ValueError(f"{what} holds negative integers (minimum {X.min()}), but integer data is read as pixel "
                         "intensities from 0 up: store signed features as floats, scaled as they should be")
    scale = max(float(X.max()), 1.0) if scale is None else scale
    return (X / scale).astype(np.float32), scale


def _labels(y, what):
    y = np.asarray(y).reshape(-1)
    if y.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer class ids, got dtype {y.dtype}")
    return y.astype(np.int64)


def load_digits():
    """The 8x8 handwritten digits bundled with scikit-learn: 1797 samples, 64 features, 10 classes. Read
    from scikit-learn's data file as its loader reads it, without importing scikit-learn (~2 s); through its
    loader if the file is not where it has been."""
    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec else ""
    if os.path.exists(path):
        data = np.loadtxt(path, delimiter=",")
        X, y = data[:, :-1], data[:, -1]
    else:
        from sklearn.datasets import load_digits as sk_load_digits

        X, y = sk_load_digits(return_X_y=True)
    return (X / 16).astype(np.float32), y.astype(np.int64)


def read_idx(path):
    """One IDX file (the MNIST format; ``.gz`` allowed) as a NumPy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    body = raw[4 + 4 * ndim:]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(body) != expected:
        raise ValueError(f"{path}: the header promises shape {shape} ({expected} bytes) but {len(body)} bytes follow")
    return np.frombuffer(body, dtype).reshape(shape)


def _find(directory, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def load_mnist_dir(directory):
    """``train-images-idx3-ubyte``/``train-labels-idx1-ubyte`` (and the ``t10k-`` test pair when present)
    from ``directory``: returns ``((X_train, y_train), (X_test, y_test) or None)``."""
    splits, scale = [], None
    for prefix in ("train", "t10k"):
        images = _find(directory, f"{prefix}-images-idx3-ubyte")
        labels = _find(directory, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            X, y = read_idx(images), _labels(read_idx(labels), labels)
            if len(X) != len(y):
                raise ValueError(f"{images} has {len(X)} images but {labels} has {len(y)} labels")
            X, scale = _features(X, images, scale)
            splits.append((X, y))
        elif prefix == "train":
            raise FileNotFoundError(f"{directory} has no train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]")
        else:
            splits.append(None)
    return splits[0], splits[1]


def load_npz(path):
    """An ``.npz`` with ``x``/``y`` arrays, or ``x_train``/``y_train`` (+ ``x_test``/``y_test``) as Keras's
    mnist.npz has: returns ``((X_train, y_train), (X_test, y_test) or None)``."""
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
        if {"x", "y"} <= keys:
            pairs = [("x", "y"), None]
        elif {"x_train", "y_train"} <= keys:
            pairs = [("x_train", "y_train"), ("x_test", "y_test") if {"x_test", "y_test"} <= keys else None]
        else:
            raise ValueError(f"{path} must hold arrays x and y (or x_train, y_train), found {sorted(keys)}")
        out, scale = [], None
        for pair in pairs:
            if pair is None:
                out.append(None)
                continue
            X, y = f[pair[0]], _labels(f[pair[1]], f"{path}:{pair[1]}")
            if len(X) != len(y):
                raise ValueError(f"{path}: {pair[0]} has {len(X)} rows but {pair[1]} has {len(y)}")
            X, scale = _features(X, f"{path}:{pair[0]}", scale)
            out.append((X, y))
    return out[0], out[1]


def load(path=None):
    """The digits (``path`` None), an MNIST IDX directory, or an ``.npz``: ``(train, test or None)``."""
    if path is None:
        return load_digits(), None
    if os.path.isdir(path):
        return load_mnist_dir(path)
    if str(path).endswith(".npz"):
        return load_npz(path)
    raise ValueError(f"--data must be a directory of MNIST IDX files or an .npz file, got {path}")


def split(X, y, fraction, seed):
    """Shuffle with ``seed`` and split off ``fraction`` of the rows: ``(X_rest, y_rest), (X_part, y_part)``,
    both with at least one row."""
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}; they must match")
    if not 0 < fraction < 1 or len(X) < 2:
        raise ValueError(f"fraction must be in (0, 1) of at least 2 rows, got {fraction!r} of {len(X)}")
    order = np.random.default_rng(seed).permutation(len(X))
    n_part = min(len(X) - 1, max(1, int(round(len(X) * fraction))))
    rest, part = order[n_part:], order[:n_part]
    return (X[rest], y[rest]), (X[part], y[part])
