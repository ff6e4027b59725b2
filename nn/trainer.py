"""The trainer: ``fit`` (full-batch, mini-batch or stochastic gradient descent), ``evaluate``, ``predict``.

Every input is validated before any training; batches are moved to the model's device once; each step
is forward, fused loss (and the correct count), backward into the flat gradient buffer (distributed:
summed over ranks with the loss, so that every rank decides alike whether to skip the step), per-layer
gradient norms (one kernel pass over that buffer), the step's bookkeeping (``check_step``: the loss and
norms summed into a device metrics buffer, NaN/Inf detected, the clipping scale computed), then ONE fused
optimizer call that clips, or skips a non-finite step, on the device. Nothing is read back to the host
inside a step: the metrics are read at the epoch's end and at the progress bar's pace. The step calls
the backend module's kernels (resolved once per ``fit``) on buffers reused from step to step. A
KeyboardInterrupt that arrives during a step is held until the step has finished, so an interrupted
``fit`` leaves the weights of the last completed step and can simply be called again.
"""

import math
import signal
import threading
import time

import numpy as np
from tqdm import tqdm

import kernels
from kernels import _checks as check

from . import _compiled, checkpoint
from . import distributed as distributed_
from . import losses as losses_
from . import optim
from ._device import to_host
from .health import GradientHealth, NonFiniteError
from .layers import FACTORED_NORM_ROWS, BatchNorm, Dense, Sequential
from .losses import check_finite


class History:
    """Per-epoch results: ``history[key]`` lists ``loss``, metrics, ``val_*`` and ``lr``;
    ``grad_norms[layer]`` lists each parameter layer's mean gradient norm per epoch."""

    def __init__(self):
        self.epochs = []
        self.history = {}
        self.grad_norms = {}

    def append(self, epoch, logs, grad_norms):
        self.epochs.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)
        for key, value in grad_norms.items():
            self.grad_norms.setdefault(key, []).append(value)

    def __getitem__(self, key):
        return self.history[key]

    def __repr__(self):
        return f"History(epochs={len(self.epochs)}, keys={sorted(self.history)})"


class _StepGuard:
    """Hold SIGINT while a training step runs and raise KeyboardInterrupt when it ends (in the main
    thread; elsewhere Python delivers no signals). Outside a step an interrupt raises at once."""

    def __init__(self):
        self.in_step = self.pending = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if not self.in_step:
            raise KeyboardInterrupt
        self.pending = True

    def end_step(self):
        self.in_step = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


class _SyncClock:
    """When the training loop reads the device metrics (besides the epoch's end): every ``every`` steps
    when given, else at the progress bar's refresh interval when there is a bar, else never."""

    def __init__(self, every, bar):
        self.every = every
        self.interval = bar.mininterval if every is None and not bar.disable else None
        self.last = time.perf_counter()

    def due(self, step):
        if self.every is not None:
            return (step + 1) % self.every == 0
        if self.interval is None or time.perf_counter() - self.last < self.interval:
            return False
        self.last = time.perf_counter()
        return True


def _batch_size(batch_size, n):
    """``batch_size`` checked, as rows per step over ``n`` rows (None: all of them)."""
    return check.count("batch_size", batch_size, 1, none=True) or n


class Trainer:
    """Trains a :class:`~nn.layers.Sequential` model.

    ``loss``: a name from :mod:`nn.losses` or a Loss; ``optimizer``: a name from :mod:`nn.optim` or an
    Optimizer; ``metrics``: ``("accuracy",)`` by default for classification losses; ``clip_norm``: clip
    the global gradient norm to this; ``schedule``: a learning-rate schedule from :mod:`nn.schedules`;
    ``health``: a :class:`~nn.health.GradientHealth` (warning thresholds); ``distributed``: data-parallel
    training, see :func:`nn.distributed.get` (``"auto"``: over MPI when launched by mpiexec/srun on
    several ranks; ``"off"``; or a communicator); ``compiled``: run an epoch's steps in compiled calls,
    bitwise the same (None: where supported and compiled already; True; False), see :mod:`nn._compiled`.

    The optimizer follows the trainer's model: one bound to other parameters (it trained another model,
    or the model was built again) is rebound to this model's when the trainer first uses it, with a fresh
    state, as a new torch optimizer would be; its state is kept while it stays bound to this model (a
    checkpoint restored with :meth:`restore` included).
    """

    def __init__(self, model, loss="softmax_cross_entropy", optimizer="adam", metrics=None, clip_norm=None,
                 schedule=None, health=None, distributed="auto", compiled=None):
        if not isinstance(model, Sequential):
            raise TypeError(f"model must be a Sequential, got {type(model).__name__}")
        self.model = model
        self.loss = losses_.get(loss)
        self.optimizer = optim.get(optimizer)
        if metrics is None:
            metrics = ("accuracy",) if self.loss.classification else ()
        metrics = (metrics,) if isinstance(metrics, str) else metrics  # one metric by its name
        for metric in metrics:
            if metric != "accuracy" or not self.loss.classification:
                raise ValueError(f"metrics: unsupported metric {metric!r} for loss {self.loss.name}; "
                                 "accuracy is available for classification losses")
        self.metrics = tuple(metrics)
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
        self.clip_norm = clip_norm
        self.schedule = schedule
        self.health = health or GradientHealth()
        self.epoch = 0
        self.stop_training = False
        self._scratch = {}
        self.comm = distributed_.get(distributed)
        self.compiled = _compiled.check_option(compiled)

    # ---- data ----------------------------------------------------------------------------------------

    def _prepare(self, X, y=None, what="X", y_what="y", targets=True):
        """Validate host inputs (shape, lengths, feature count, finiteness, targets unless ``targets`` is
        False); build the model if needed; return X in the model's dtype and the targets as the loss wants."""
        X = np.asarray(X)
        if X.dtype.kind not in "biuf":
            raise TypeError(f"{what} must be numeric, got dtype {X.dtype}")
        if X.ndim != 2:
            raise ValueError(f"{what} must be 2-D (samples, features), got shape {X.shape}")
        if X.shape[0] == 0:
            raise ValueError(f"{what} is empty (shape {X.shape}): there is nothing to train or evaluate on")
        if targets and np.ndim(y) == 0:
            raise ValueError(f"{y_what} must be an array of targets, one per sample of {what}, got {y!r}")
        if targets and len(y) != X.shape[0]:
            raise ValueError(f"{what} has {X.shape[0]} samples but {y_what} has {len(y)}; they must match")
        model = self.model
        if not model.built:
            model.build(X.shape[1])
        elif X.shape[1] != model.input_dim:
            raise ValueError(f"{what} has {X.shape[1]} features, but the first layer ({model.layers[0].name}) "
                             f"expects {model.input_dim}")
        X = self._in_model_dtype(X, what)
        self._bind_optimizer()
        return X if not targets else (X, np.ascontiguousarray(
            self.loss.prepare_targets(y, model.output_dim, model.dtype, y_what)))

    def _in_model_dtype(self, X, what):
        """``X`` as a C-contiguous array of the model's dtype, checked after the cast: NaN/Inf are refused,
        and so are values beyond that dtype's range (1e39 becomes inf in float32)."""
        dtype = self.model.dtype
        with np.errstate(over="ignore"):
            cast = np.ascontiguousarray(X, dtype)
        if not np.isfinite(cast).all():
            check_finite(X, what)  # NaN/Inf as given
            where = tuple(int(i) for i in np.argwhere(~np.isfinite(cast))[0])
            raise ValueError(f"{what} has {X[where]} at index {where}, beyond the range of the model's dtype {dtype} "
                             f"(largest {np.finfo(dtype).max:.3g}); rescale the data or use a float64 model")
        return cast

    def _bind_optimizer(self):
        """Bind the optimizer to the model's buffers (a fresh state) unless it is bound to them already."""
        if self.optimizer.params is not self.model.params:
            self.optimizer.bind(self.model.params, self.model.grads)

    def _validation(self, X, y, validation_data, validation_split):
        if validation_data is not None and validation_split:
            raise ValueError("give validation_data or validation_split, not both")
        if validation_data is not None:
            if len(validation_data) != 2:
                raise ValueError("validation_data must be a pair (X_val, y_val)")
            return X, y, self._prepare(*validation_data, what="validation_data X", y_what="validation_data y")
        if not validation_split:
            return X, y, None
        if not 0 < validation_split < 1:
            raise ValueError(f"validation_split must be in (0, 1), got {validation_split}")
        n_val = int(len(X) * validation_split)
        if n_val < 1 or n_val == len(X):
            raise ValueError(f"validation_split={validation_split} of {len(X)} samples leaves "
                             f"{n_val} for validation and {len(X) - n_val} for training; both need at least one")
        return X[:-n_val], y[:-n_val], (X[-n_val:], y[-n_val:])

    # ---- training ------------------------------------------------------------------------------------

    def fit(self, X, y, epochs=1, batch_size=32, validation_data=None, validation_split=0.0, shuffle=True,
            seed=None, callbacks=(), verbose=1, sync_every=None):
        """Train for ``epochs`` more epochs; returns a :class:`History`.

        ``batch_size``: rows per step (None: the whole dataset, i.e. full-batch gradient descent; 1:
        stochastic). ``validation_split`` holds out the last fraction of the rows (before shuffling).
        ``seed`` (default: the model's) fixes the shuffling: epoch ``e`` uses the permutation drawn from
        (seed, e), so resuming from a checkpoint continues the same sequence. ``verbose=0`` is silent.

        Losses, accuracy counts and gradient norms accumulate where the model lives; the host reads them
        (one device-to-host copy) at the epoch's end and, with ``verbose``, when the progress bar refreshes
        (``sync_every=N``: every N steps instead). A step whose loss or gradient is NaN/Inf is skipped on
        the device, and so is every later step of the epoch; the next read raises :class:`NonFiniteError`
        naming the step and the layer, with the weights (and the optimizer's state and step count) of the
        last applied step. Non-trainable layer state (BatchNorm's running averages, Dropout's counter)
        keeps the forward passes of the skipped steps.
        """
        X, y = self._prepare(X, y)
        if not self.model.parameter_layers():
            raise ValueError(f"model has no parameters to train (layers: "
                             f"{', '.join(layer.name for layer in self.model.layers)}); add a Dense layer")
        X, y, val = self._validation(X, y, validation_data, validation_split)
        epochs = check.count("epochs", epochs, 0)
        batch_size = _batch_size(batch_size, len(X))
        if epochs and any(isinstance(layer, BatchNorm) for layer in self.model.layers) and (
                min(batch_size, len(X)) < 2 or len(X) % batch_size == 1):
            raise ValueError(f"batch_size={batch_size} leaves a training step of 1 row (of {len(X)} rows): "
                             "BatchNorm needs at least 2 (a batch variance), as torch's does; choose one that "
                             "leaves none or 2 or more")
        sync_every = check.count("sync_every", sync_every, 1, none=True)
        seed = check.count("seed", seed, 0, none=True)
        self.comm.setup(self.model, len(X), min(batch_size, len(X)), self.optimizer,  # distributed: rank 0's state
                        epochs=epochs, shuffle=bool(shuffle), seed=seed)  # ranks must agree on these
        seed = self.model.seed if seed is None else seed  # after setup: rank 0's model seed on every rank
        verbose = verbose if self.comm.is_root else 0  # distributed: rank 0 prints
        history = History()
        self.stop_training = False
        self.health.reset()
        for cb in callbacks:
            cb.on_train_begin(self)
        last = self.epoch + epochs
        try:
            with _StepGuard() as guard:
                for _ in range(epochs):
                    start = time.perf_counter()
                    logs, norms = self._train_epoch(X, y, min(batch_size, len(X)), shuffle, seed, last, verbose, guard,
                                                    sync_every)
                    if val is not None:
                        logs.update({f"val_{k}": v for k, v in self._evaluate(*val).items()})
                    self.epoch += 1
                    history.append(self.epoch, logs, norms)
                    if verbose:
                        tqdm.write(f"epoch {self.epoch}/{last}: " + "  ".join(
                            f"{k} {v:.4g}" if k == "lr" else f"{k} {v:.4f}" for k, v in logs.items())
                            + f"  ({time.perf_counter() - start:.2f}s)")
                    self.health.check(norms, self.epoch, self.clip_norm)
                    for cb in callbacks:
                        cb.on_epoch_end(self, self.epoch, logs)
                    if self.stop_training:
                        break
        finally:  # also when training raises (NonFiniteError, an interrupt): EarlyStopping restores its best
            for cb in callbacks:
                cb.on_train_end(self)
        return history

    def _buffer(self, key, shape, dtype):
        """A scratch array on the model's device, allocated once per (key, shape, dtype); capped as
        :meth:`Layer.buffer <nn.layers.Layer.buffer>` caps its own, so many last-batch shapes (evaluate or
        predict on inputs of many lengths) do not grow it without bound."""
        buf = self._scratch.get((key, shape, dtype))
        if buf is None:
            if len(self._scratch) > 64:  # many batch shapes seen: start over, as a layer does
                self._scratch.clear()
            buf = self._scratch[key, shape, dtype] = self.model.xp.empty(shape, dtype)
        return buf

    def _batch(self, key, A, idx):
        """Rows ``idx`` (a slice or an index array) of the host array ``A`` on the model's device;
        on the host, gathered into a reused buffer (a slice is a view: no copy at all)."""
        if self.model.xp is not np:
            return self.model.xp.asarray(A[idx])
        if isinstance(idx, slice):
            return A[idx]
        return np.take(A, idx, axis=0, out=self._buffer(key, (len(idx),) + A.shape[1:], A.dtype))

    def _train_epoch(self, X, y, batch_size, shuffle, seed, last, verbose, guard, sync_every=None):
        result = _compiled.train_epoch(self, X, y, batch_size, shuffle, seed, last, verbose, guard)
        if result is not None:  # the whole epoch ran compiled
            return result
        model, opt = self.model, self.optimizer
        model.bind_kernels()
        k, n = model.k, len(X)
        order = np.random.default_rng([seed, self.epoch]).permutation(n) if shuffle else None
        layers = model.parameter_layers()
        offsets = self._segment_offsets(layers)
        factored = self._factored(layers)
        norms = self._buffer("norms", (len(layers),), np.float64)
        scale = self._buffer("scale", (1,), model.dtype)
        metrics = model.xp.zeros(kernels.metrics_size(len(layers)), np.float64)
        max_norm = math.inf if self.clip_norm is None else self.clip_norm
        steps, t0 = math.ceil(n / batch_size), opt.t
        if self.schedule is not None and self.schedule.per == "epoch":
            opt.lr = self.schedule(opt.base_lr, self.epoch)
        seen = 0

        def rows_of(step):
            rows = slice(step * batch_size, (step + 1) * batch_size)
            rows = self.comm.share(rows, n)  # distributed: this rank's rows of the global batch
            return rows if order is None else order[rows]

        def read():
            """The one device-to-host copy: the metrics so far; raises if a step was not applied."""
            values = kernels.unpack_metrics(to_host(metrics), len(layers))
            if values["bad_step"]:
                raise self._bad_step(values, t0, layers, lambda: self._batch("x", X, rows_of(values["bad_step"] - 1)))
            return values

        # NaN/Inf are caught on the device (check_step) and reported at the next read with an error naming
        # the layer; NumPy's floating-point warnings on the way there would only be noise.
        with tqdm(total=n, desc=f"epoch {self.epoch + 1}/{last}", unit="sample", leave=False,
                  disable=not verbose) as bar, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            sync = _SyncClock(sync_every, bar)
            for step in range(steps):
                idx = rows_of(step)
                xb, yb = self._batch("x", X, idx), self._batch("y", y, idx)
                if self.schedule is not None and self.schedule.per == "step":
                    opt.lr = self.schedule(opt.base_lr, opt.t)
                guard.in_step = True
                out = model.run_forward(xb, training=True)
                dout = self._buffer("dout", out.shape, out.dtype)
                loss = self.loss.compute(k, out, yb, dout)
                if self.metrics:
                    self.loss.count_correct(k, out, yb, metrics)
                model.run_backward(self.comm.weigh(dout))  # distributed: weighted for the global batch
                loss = self.comm.reduce_step(model.grads, loss)  # distributed: sums and the global loss, one call
                by_factors = factored is not None and len(xb) <= FACTORED_NORM_ROWS
                if not by_factors or len(factored) < len(layers):  # BatchNorm's norms come from its gradient
                    k.segment_norms(model.grads, offsets, norms)
                if by_factors:
                    for i, layer in factored:
                        layer.grad_norm(norms[i:i + 1])
                k.check_step(loss, len(xb), norms, max_norm, metrics, scale)  # scale 0: skip, on the device
                opt.step(k, scale)
                guard.end_step()
                seen += len(xb)
                if verbose:
                    bar.update(len(xb))
                if step + 1 < steps and sync.due(step):
                    bar.set_postfix(loss=f"{read()['loss_sum'] / seen:.4f}", refresh=False)
            values = read()
        total_loss, correct = self.comm.sum(values["loss_sum"], values["correct"])  # distributed: over ranks
        logs = {"loss": total_loss / n}
        if self.metrics:
            logs["accuracy"] = float(correct) / n
        logs["lr"] = opt.lr
        return logs, {name: float(s / steps) for (name, _), s in zip(layers, values["norm_sums"])}

    def _where(self, step):
        return f"training stopped at epoch {self.epoch + 1}, step {step + 1}: "

    def _factored(self, layers):
        """The Dense layers among the parameter ``layers``, with their places: their gradient norms come from
        their factors at steps of at most FACTORED_NORM_ROWS rows (as the compiled step takes them); None in
        distributed training, whose norms are those of the summed gradients."""
        if self.comm.size > 1:
            return None
        by_name = {layer.name: layer for layer in self.model.layers}
        return [(i, by_name[name]) for i, (name, _) in enumerate(layers) if type(by_name[name]) is Dense]

    def _segment_offsets(self, layers):
        """Where each parameter layer's gradient starts in the flat buffer, and where the last ends
        (the layers' slices are adjacent), on the model's device."""
        bounds = [sl.start for _, sl in layers] + [layers[-1][1].stop if layers else 0]
        return self.model.xp.asarray(np.array(bounds, np.int64))

    def _bad_step(self, values, t0, layers, batch):
        """:meth:`_non_finite`'s error, the optimizer's step count (``t0`` at the epoch's start) and per-step
        rate set back to the step that was not applied: the skipped steps did not count."""
        opt = self.optimizer
        opt.t = t0 + values["bad_step"] - 1
        if self.schedule is not None and self.schedule.per == "step":
            opt.lr = self.schedule(opt.base_lr, opt.t)
        return self._non_finite(values, layers, batch)

    def _non_finite(self, values, layers, batch):
        """The error for the first step that was not applied (``values``: the metrics read from the
        device): its loss, else its gradient norms, say what went wrong; ``batch()`` gives that step's
        inputs for the diagnosis of a non-finite loss."""
        where = self._where(values["bad_step"] - 1)
        loss = values["bad_loss"]
        if not math.isfinite(loss):
            return NonFiniteError(where + f"the loss became {loss}{self._culprit(batch())}. The weights were not "
                                  f"updated; {self._advice(data=True)}")
        kinds = {name: "nan" if math.isnan(norm) else "inf" for (name, _), norm in zip(layers, values["bad_norms"])
                 if not math.isfinite(norm)}
        top = list(kinds)[-1]
        return NonFiniteError(where + f"the gradient of layer {top!r} became {kinds[top]} (non-finite gradients in: "
                              f"{', '.join(kinds)}). The weights were not updated; {self._advice()}")

    def _advice(self, data=False):
        """What to try after a non-finite step: clipping only where it is not on already (it acts on the
        gradient once computed, so it cannot keep that from overflowing)."""
        tries = ["lower the learning rate"]
        if self.clip_norm is None:
            tries.append("clip gradients (clip_norm=...)")
        if data:
            tries.append("check the data")
        return tries[0] if len(tries) == 1 else ", ".join(tries[:-1]) + " or " + tries[-1]

    def _culprit(self, xb):
        """Where a non-finite loss comes from: a layer with non-finite weights, else the first layer
        whose (evaluation-mode) output is non-finite. Runs only on the failure path (host copies)."""
        model = self.model
        for layer in model.layers:
            for name, p in layer.params.items():
                if not np.isfinite(to_host(p)).all():
                    return f" (layer {layer.name!r} has non-finite weights {name})"
        x = xb
        for layer in model.layers:
            x = layer.forward(x, training=False)
            if not np.isfinite(to_host(x)).all():
                return f" (the output of layer {layer.name!r} is the first that is non-finite)"
        return (f" (the last layer {model.layers[-1].name!r} outputs values up to {np.abs(to_host(x)).max():.3g}: "
                f"the loss overflowed {model.dtype})")

    # ---- evaluation ----------------------------------------------------------------------------------

    def evaluate(self, X, y, batch_size=256):
        """Mean loss (and metrics) over ``X``, ``y`` in evaluation mode: ``{"loss": ..., "accuracy": ...}``;
        ``batch_size``: rows per forward pass (None: all)."""
        X, y = self._prepare(X, y)
        return self._evaluate(X, y, _batch_size(batch_size, len(X)))

    def _evaluate(self, X, y, batch_size=256):
        model, n = self.model, len(X)
        model.bind_kernels()
        part = self.comm.shard(n)  # distributed: this rank's rows, the sums reduced below
        X, y = X[part], y[part]
        metrics = model.xp.zeros(kernels.metrics_size(0), np.float64)  # no norms: the loss and correct count
        no_norms, scale = self._buffer("no norms", (0,), np.float64), self._buffer("scale", (1,), model.dtype)
        for start in range(0, len(X), batch_size):
            rows = slice(start, start + batch_size)
            xb, yb = self._batch("x", X, rows), self._batch("y", y, rows)
            out = model.run_forward(xb, training=False)
            loss = self.loss.compute(model.k, out, yb, self._buffer("dout", out.shape, out.dtype))
            model.k.check_step(loss, len(xb), no_norms, math.inf, metrics, scale)
            if self.metrics:
                self.loss.count_correct(model.k, out, yb, metrics)
        values = kernels.unpack_metrics(to_host(metrics), 0)
        total = values["bad_loss"] * n if values["bad_step"] else values["loss_sum"]  # non-finite: reported as is
        total, correct = self.comm.sum(total, values["correct"])  # distributed: over ranks
        logs = {"loss": total / n}
        if self.metrics:
            logs["accuracy"] = float(correct) / n
        return logs

    def predict(self, X, batch_size=256):
        """The model's outputs for ``X`` (evaluation mode), as a host NumPy array; ``batch_size``: rows per
        forward pass (None: all)."""
        X, model = self._prepare(X, targets=False), self.model
        batch_size = _batch_size(batch_size, len(X))
        model.bind_kernels()
        out = np.empty((len(X), model.output_dim), model.dtype)
        for i in range(0, len(X), batch_size):
            out[i:i + batch_size] = to_host(model.run_forward(self._batch("x", X, slice(i, i + batch_size)),
                                                              training=False))
        return out

    # ---- checkpoints ---------------------------------------------------------------------------------

    def save(self, path):
        """Architecture, weights, layer state, optimizer state and epoch count in one ``.npz``, atomically."""
        if self.comm.is_root:  # distributed: rank 0 writes, the others wait until it is on disk
            checkpoint.save(path, self.model, self.optimizer, {"epoch": self.epoch})
        self.comm.barrier()

    def restore(self, path):
        """Load a checkpoint saved by :meth:`save` into this trainer's model and optimizer, to resume.

        Shapes are checked first: on a mismatch or an unreadable file the model stays as it was. A checkpoint
        saved without optimizer state leaves the optimizer a fresh state (zeros, ``t`` 0), not the one it had.
        """
        if self.model.built:
            self._bind_optimizer()  # the restored state is this model's, kept by the next fit
        meta = checkpoint.restore(path, self.model, self.optimizer)
        self.epoch = int(meta.get("epoch", 0))
        return self
