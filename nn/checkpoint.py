"""Save and load models: architecture (JSON), weights, layer state and optimizer state in one ``.npz``.

No pickle anywhere (``np.load(allow_pickle=False)``): JSON strings and plain arrays only. Writes are
atomic (a temporary file in the same directory, fsynced, then ``os.replace``), so a crash never leaves
half a checkpoint under the real name. Loading validates every shape before it changes anything.
"""

import json
import os
import tempfile
import zipfile

import numpy as np

from . import optim
from ._device import to_host
from .layers import Sequential

FORMAT = "nn-checkpoint/1"


def save(path, model, optimizer=None, meta=None):
    """Write ``model`` (built), optionally ``optimizer``'s state and a JSON-able ``meta`` dict, to ``path``."""
    if not model.built:
        raise ValueError("the model is not built yet (no input_dim and no data seen): nothing to save")
    arrays = {"format": np.array(FORMAT), "architecture": np.array(model.config()),
              "params": to_host(model.params), "meta": np.array(json.dumps(meta or {}))}
    arrays.update({f"state/{k}": v for k, v in model.state().items()})
    if optimizer is not None:
        sd = optimizer.state_dict()
        arrays["optimizer"] = np.array(json.dumps({k: sd[k] for k in ("class", "hyper", "base_lr", "t")}))
        arrays.update({f"optimizer/{k}": v for k, v in sd["buffers"].items()})
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read(path):
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, AttributeError) as exc:
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): {exc}") from exc
    fmt = str(data.get("format", ""))
    if fmt != FORMAT:
        raise ValueError(f"{path} is not an nn checkpoint (format {fmt!r}, expected {FORMAT!r})")
    return data


def _optimizer_state(data):
    if "optimizer" not in data:
        return None
    sd = json.loads(str(data["optimizer"]))
    sd["buffers"] = {k[len("optimizer/"):]: v for k, v in data.items() if k.startswith("optimizer/")}
    return sd


def _check_matches(path, data, model):
    """Raise unless the checkpoint's layers have the model's types, settings and shapes, layer by layer.

    Each saved layer is rebuilt with the model's own layer class (so custom layers are checked too; their
    ``config`` must give their constructor arguments, as :meth:`Layer.config` asks)."""
    spec = json.loads(str(data["architecture"]))
    if len(spec["layers"]) != len(model.layers):
        raise ValueError(f"{path} holds a model with {len(spec['layers'])} layers, this model has {len(model.layers)}")
    dim = spec["input_dim"]
    for mine, (kind, args) in zip(model.layers, spec["layers"]):
        if type(mine).__name__ != kind:
            raise ValueError(f"{path} does not match the model at layer {mine.name}: the checkpoint has a {kind} "
                             f"there, the model a {type(mine).__name__}")
        theirs = type(mine)(**args)
        theirs.build(dim, np, model.dtype)
        dim = theirs.output_dim
        if mine.param_shapes != theirs.param_shapes:
            raise ValueError(f"{path} does not match the model at layer {mine.name}: the checkpoint has {theirs!r} "
                             f"with parameters {theirs.param_shapes}, the model {mine!r} with {mine.param_shapes}")
        ours = json.loads(json.dumps(mine.config()))  # as the checkpoint stores it: tuples become lists
        for key in sorted(set(args) | set(ours)):
            if args.get(key) != ours.get(key):
                raise ValueError(f"{path} does not match the model at layer {mine.name}: {key} is "
                                 f"{args.get(key)!r} in the checkpoint, {ours.get(key)!r} in the model")
    if data["params"].shape != model.params.shape or data["params"].dtype != model.dtype:
        raise ValueError(f"{path} has parameters {data['params'].shape} {data['params'].dtype}, the model "
                         f"{model.params.shape} {model.dtype}")
    wanted = {f"state/{k}": v for k, v in model.state().items()}
    for key, value in wanted.items():
        if key not in data or data[key].shape != value.shape:
            seen = data[key].shape if key in data else "nothing"
            raise ValueError(f"{path}: layer state {key[6:]} should have shape {value.shape}, found {seen}")


def restore(path, model, optimizer=None):
    """Load ``path`` into ``model`` (building it if needed) and ``optimizer``; returns the saved meta dict.

    The model adopts the checkpoint's seed (shuffling, dropout masks), so training resumes as the saved
    run would have gone on. Everything is read and checked first: a truncated file or any mismatch of
    layer types, settings or shapes raises ``ValueError`` and leaves the model and optimizer as they were.
    A checkpoint saved without optimizer state gives ``optimizer`` a fresh state (zeros, ``t`` 0) bound to
    ``model``: moments and a step count of another run would not fit the loaded weights.
    """
    return _restore(path, _read(path), model, optimizer)


def _restore(path, data, model, optimizer):
    spec = json.loads(str(data["architecture"]))
    if not model.built:
        model.build(spec["input_dim"])
    _check_matches(path, data, model)
    sd = _optimizer_state(data)
    if optimizer is not None and (sd is None or optimizer.params is None):
        optimizer.bind(model.params, model.grads)  # no saved state: a fresh one, not another run's
    if optimizer is not None and sd is not None:
        optimizer.load_state_dict(sd)  # validates before it changes anything
    model.reseed(spec["seed"])
    model.set_weights(data["params"], {k[len("state/"):]: v for k, v in data.items() if k.startswith("state/")})
    return json.loads(str(data["meta"]))


def load(path, backend=None):
    """Rebuild the saved model (and optimizer, or None) from ``path``: ``(model, optimizer, meta)``."""
    data = _read(path)
    model = Sequential.from_config(str(data["architecture"]), backend)
    sd = _optimizer_state(data)
    optimizer = None
    if sd is not None:
        optimizer = optim.get(sd["class"].lower(), **sd["hyper"]).bind(model.params, model.grads)
    return model, optimizer, _restore(path, data, model, optimizer)
