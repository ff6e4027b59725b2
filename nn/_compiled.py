"""The compiled epoch: a model's training steps in one compiled call (:mod:`kernels.cpu.step`).

``Trainer(..., compiled=None | True | False)`` chooses: ``False`` always runs the per-kernel step (a
Python loop over kernel calls); ``True`` runs the compiled one wherever the model is supported and raises
``ValueError`` saying why where it is not; ``None`` (the default) runs it where it is supported and
compiled already (in this process or Numba's on-disk cache: a cold compile of the
driver and its kernels takes minutes, more than a short run saves; ``True`` once, or
``kernels.warmup(only="training step")``, compiles it). Both make the same kernel calls with the same
arguments, so they give bit for bit the same results; the compiled one saves the per-step Python overhead
(~15 calls of a few us each) and, on two threads, a wake-up of Numba's thread pool per product it shares with
its worker.

Supported: the numba backend in one process; a Sequential of Dense (any activation), Activation and
Dropout layers; softmax cross-entropy, MSE, binary cross-entropy, hinge; SGD (with or without momentum,
Nesterov, weight decay), Adam, AdamW, RMSProp, Adagrad, Adadelta; learning-rate schedules per epoch or per
step; ``clip_norm``. Anything else runs the per-kernel
step (distributed training included).

An epoch runs as calls of at most CALL_SAMPLES samples; the progress bar advances and a Ctrl-C is taken
between calls (the weights then are those of the last completed call). A step whose loss or gradient is
NaN/Inf is never applied: the driver stops before its update and the trainer raises the per-kernel step's
NonFiniteError (the same message, weights, step count and rate).
"""

import contextlib
import importlib
import math

import numpy as np
from tqdm import tqdm

import kernels

from . import losses as losses_
from . import optim
from .layers import FACTORED_NORM_ROWS, Activation, Dense, Dropout

CALL_SAMPLES = 8192  # samples per compiled call: a few ms, short enough for the progress bar and Ctrl-C
_ACT_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4, "softmax": 5}
_LOSSES = {losses_.SoftmaxCrossEntropy: "CROSS_ENTROPY", losses_.MSE: "MSE", losses_.BinaryCrossEntropy:
           "BINARY_CROSS_ENTROPY", losses_.Hinge: "HINGE"}  # their codes in kernels.cpu.step
_OPTIMIZERS = (optim.SGD, optim.Adam, optim.AdamW, optim.RMSProp, optim.Adagrad, optim.Adadelta)


def check_option(compiled):
    """Validate ``Trainer(compiled=...)``."""
    if compiled not in (None, True, False):
        raise ValueError(f"compiled must be None (automatic), True or False, got {compiled!r}")
    return compiled


def unsupported(trainer):
    """Why the compiled epoch cannot run this trainer's model (None when it can)."""
    model, opt = trainer.model, trainer.optimizer
    if getattr(model.k, "name", None) != "numba":
        return f"it runs only on the numba backend, not {getattr(model.k, 'name', model.k)!r}"
    if trainer.comm.size > 1:
        return "distributed training runs the per-kernel step"
    bad = [f"{type(layer).__name__} ({layer.name})" for layer in model.layers
           if type(layer) not in (Dense, Activation, Dropout)]
    if bad:
        return f"it supports only Dense, Activation and Dropout layers, not {', '.join(bad)}"
    if not model.parameter_layers():
        return "the model has no parameters"
    if type(trainer.loss) not in _LOSSES:
        return f"it supports only the {', '.join(sorted(c.name for c in _LOSSES))} losses, not {trainer.loss.name}"
    if type(opt) not in _OPTIMIZERS:
        return (f"it supports only the {', '.join(c.__name__ for c in _OPTIMIZERS)} optimizers, "
                f"not {type(opt).__name__}")
    return None


def train_epoch(trainer, X, y, batch_size, shuffle, seed, last, verbose, guard):
    """``Trainer._train_epoch`` in compiled calls: the same ``(logs, norms)``, or None when the trainer
    must run the per-kernel step (not chosen, not supported, or a learning-rate schedule that fails in this
    epoch, whose error the per-kernel step raises at its step)."""
    model, opt = trainer.model, trainer.optimizer
    compiled = getattr(trainer, "compiled", None)
    if compiled is False:
        return None
    model.bind_kernels()
    why = unsupported(trainer)
    if why is not None and compiled:
        raise ValueError(f"compiled=True, but {why}; use compiled=None to choose automatically")
    if why is not None:
        return None
    from kernels.cpu import step
    from kernels.cpu._gemm import transcendental

    max_norm = math.inf if trainer.clip_norm is None else float(trainer.clip_norm)
    n, steps = len(X), math.ceil(len(X) / batch_size)
    if trainer.schedule is not None and trainer.schedule.per == "epoch":
        opt.lr = trainer.schedule(opt.base_lr, trainer.epoch)
    plan = _plan(trainer, batch_size)
    layers, alphas, dropouts, scratch, targets, segments, loss_kind, kind, empty_job, ready = plan
    hyper = _hyper_table(trainer, kind, steps)
    if hyper is None:
        return None
    hyper, lrs = hyper
    t0 = opt.t
    order = np.random.default_rng([seed, trainer.epoch]).permutation(n) if shuffle else np.arange(n)
    parameter_layers = model.parameter_layers()
    state1, state2 = ([opt.state[name] for name in opt.buffers] + [model.params[:0]] * 2)[:2]
    norms, scale = np.empty(len(parameter_layers)), np.empty(1, model.dtype)
    metrics = np.zeros(kernels.metrics_size(len(parameter_layers)))
    per_call = max(1, CALL_SAMPLES // batch_size)
    job = empty_job.copy()  # its counters and split start afresh each epoch
    table = None  # the kernels' addresses: compiled (or loaded) only once the driver is known to run
    progress = (tqdm(total=n, desc=f"epoch {trainer.epoch + 1}/{last}", unit="sample", leave=False) if verbose
                else contextlib.nullcontext())  # a disabled bar still costs ~14 us an epoch
    with progress as bar:
        for s0 in range(0, steps, per_call):
            s1 = min(steps, s0 + per_call)
            seeds = np.array([[(layer.seed_base + layer.calls) % 2**64 if layer else 0, threshold]
                              for layer, threshold in dropouts], np.uint64)
            settings = step.gemm_settings(importlib.import_module("kernels.cpu.matmul").TILING,  # tests replace it
                                          model.dtype)
            args = [X, y, order, s0, s1, batch_size, layers, alphas, seeds, model.params, model.grads, state1, state2,
                    segments, kind, hyper[s0:s1], max_norm, FACTORED_NORM_ROWS, loss_kind, bool(trainer.metrics),
                    segments, settings, scratch, targets, norms, metrics, scale, job]  # args[20]: the kernel table's
            if table is None:
                inputs = step.kinds((X, y))  # what else the driver's types depend on is the plan's
                if compiled is None and inputs not in ready and not step.ready(*args):  # never a cold compile
                    return None
                table = step.kernel_table(model.dtype, kind, loss_kind)
                for layer in model.layers:  # the GEMM epilogue's sigmoid/tanh, compiled here if at all
                    transcendental(model.dtype, getattr(layer, "activation", None))
            args[20] = table
            guard.in_step = True
            done = step.run(*args)
            ready.add(inputs)
            opt.t += done - s0
            for layer, _ in dropouts:
                if layer is not None:  # a bad step: every forward of the epoch, as the per-kernel step runs them
                    layer.calls += (done if done == s1 else steps) - s0
            if done < s1:  # a non-finite loss or gradient: stopped before its update
                guard.in_step = False
                values = kernels.unpack_metrics(metrics, len(parameter_layers))
                rows = order[done * batch_size:(done + 1) * batch_size]
                raise trainer._bad_step(values, t0, parameter_layers, lambda: trainer._batch("x", X, rows))
            if trainer.schedule is not None and trainer.schedule.per == "step":
                opt.lr = lrs[s1 - 1]
            guard.end_step()
            if verbose:
                bar.update(min(n, s1 * batch_size) - s0 * batch_size)
                seen = min(n, s1 * batch_size)
                bar.set_postfix(loss=f"{kernels.unpack_metrics(metrics, len(segments) - 1)['loss_sum'] / seen:.4f}",
                                refresh=False)
    values = kernels.unpack_metrics(metrics, len(parameter_layers))
    logs = {"loss": values["loss_sum"] / n}
    if trainer.metrics:
        logs["accuracy"] = float(values["correct"]) / n
    logs["lr"] = opt.lr
    return logs, {name: float(s / steps) for (name, _), s in zip(parameter_layers, values["norm_sums"])}


def _plan(trainer, batch):
    """The compiled epoch's arguments that depend only on the layers, the loss, the optimizer's kind,
    the thread count and the batch size: the layer table, alphas, (dropout layer, threshold)
    pairs, scratch and targets buffers, segments, loss and optimizer codes, the worker's job words, and the
    input kinds the driver is known to be ready for. Built when one of those changed, else reused."""
    from kernels.cpu import step
    from kernels.cpu._parallel import num_threads

    model = trainer.model
    kind = _optimizer_kind(trainer.optimizer)
    key = (batch, model.dtype, kind, type(trainer.loss), num_threads(),
           tuple((id(layer), layer.input_dim, layer.output_dim) + tuple(getattr(layer, a, None) for a in _LAYER_FIELDS)
                 for layer in model.layers))
    cached = trainer.__dict__.get("_compiled_plan")
    if cached is not None and cached[0] == key:
        return cached[1]
    layers, alphas, dropouts, size = _layer_table(model, batch)
    loss_kind = getattr(step, _LOSSES[type(trainer.loss)])
    if loss_kind == step.CROSS_ENTROPY:
        targets = _scratch(trainer, batch, np.int64)
    else:  # float targets shaped like the outputs
        targets = _scratch(trainer, batch * model.output_dim, model.dtype).reshape(batch, model.output_dim)
    parameter_layers = model.parameter_layers()
    segments = np.array([s.start for _, s in parameter_layers] + [parameter_layers[-1][1].stop], np.int64)
    plan = (layers, alphas, dropouts, _scratch(trainer, size, model.dtype), targets, segments, loss_kind, kind,
            step.job(layers, batch, num_threads()), set())
    trainer.__dict__["_compiled_plan"] = key, plan
    return plan


_LAYER_FIELDS = ("activation", "alpha", "kind", "rate", "units")  # what _layer_table reads of a layer


def _layer_table(model, batch):
    """The driver's layer table, each layer's float argument, each layer's (dropout layer or None, keep
    threshold), and the scratch size: input, outputs, dz and dx buffers for ``batch`` rows, each on its
    own cache lines."""
    from kernels.cpu import step
    from kernels.reference.dropout import keep_threshold

    size, line = 0, 64 // model.dtype.itemsize

    def take(width):
        nonlocal size
        start = -(-size // line) * line
        size = start + batch * width
        return start

    table = np.full((len(model.layers), 11), -1, np.int64)
    alphas = np.zeros(len(model.layers))
    dropouts = [(None, 0)] * len(model.layers)
    at = take(model.input_dim)
    for i, layer in enumerate(model.layers):
        row = table[i]
        row[step.IN_W], row[step.OUT_W], row[step.X_AT] = layer.input_dim, layer.output_dim, at
        if isinstance(layer, Dense):
            row[step.KIND], row[step.ACT], alphas[i] = step.DENSE, _ACT_CODES[layer.activation], layer.alpha
            sl = model.slices[layer.name]
            row[step.W_AT], row[step.B_AT] = sl.start, sl.start + layer.input_dim * layer.units
            if layer.activation is not None:
                row[step.DZ_AT] = take(layer.units)
        elif isinstance(layer, Activation):
            row[step.KIND], row[step.ACT], alphas[i] = step.ACTIVATION, _ACT_CODES[layer.kind], layer.alpha
        else:
            row[step.KIND] = step.DROPOUT
            if layer.rate > 0:
                alphas[i] = 1 / (1 - layer.rate)
                dropouts[i] = (layer, keep_threshold(layer.rate))
        identity = isinstance(layer, Dropout) and layer.rate == 0
        at = row[step.Y_AT] = at if identity else take(layer.output_dim)
    dy = take(model.output_dim)
    for i in range(len(model.layers) - 1, -1, -1):
        layer, row = model.layers[i], table[i]
        row[step.DY_AT] = dy
        if isinstance(layer, Dropout) and layer.rate == 0:
            row[step.DX_AT] = dy
        elif i > 0:
            row[step.DX_AT] = take(layer.input_dim)
        dy = row[step.DX_AT]
    return table, alphas, dropouts, size


def _scratch(trainer, size, dtype):
    """A buffer of the compiled step kept on the trainer (reallocated when the size or dtype changes),
    starting on a cache line."""
    buffers = trainer.__dict__.setdefault("_compiled_buffers", {})
    key = (np.dtype(dtype), size)
    if key not in buffers:
        if len(buffers) > 8:
            buffers.clear()
        line = 64 // key[0].itemsize
        raw = np.empty(size + line, dtype)
        start = (-raw.ctypes.data // key[0].itemsize) % line
        buffers[key] = raw[start:start + size]
    return buffers[key]


def _optimizer_kind(opt):
    from kernels.cpu import step

    if isinstance(opt, optim.SGD):
        return step.SGD_MOMENTUM if opt.hyper["momentum"] else step.SGD
    if isinstance(opt, optim.Adam):
        return step.ADAMW if opt.decoupled else step.ADAM
    if isinstance(opt, optim.RMSProp):
        return step.RMSPROP_MOMENTUM if opt.hyper["momentum"] else step.RMSPROP
    return step.ADAGRAD if isinstance(opt, optim.Adagrad) else step.ADADELTA


def _hyper_table(trainer, kind, count):
    """Rows for the next ``count`` steps: what ``kernels.cpu.optim``'s wrappers compute in float64 before
    casting to the parameters' dtype (elementwise NumPy float64 operations round as Python's do; the
    powers are Python's), and each step's learning rate (from a per-step schedule, checked as ``opt.lr``
    checks it; ``opt.lr`` is left as it was). None when the schedule gives an invalid rate."""
    from kernels.cpu import step

    opt, schedule = trainer.optimizer, trainer.schedule
    h, steps = opt.hyper, range(opt.t + 1, opt.t + count + 1)
    rates = np.full(count, opt.lr)
    if schedule is not None and schedule.per == "step":
        before = opt.lr
        try:
            for i, t in enumerate(steps):
                opt.lr = schedule(opt.base_lr, t - 1)
                rates[i] = opt.lr
        except ValueError:
            return None
        finally:
            opt.lr = before
    lr = rates  # column 0 (Adam's below is a new array: rates stays as returned)
    table = np.zeros((count, 8))
    if kind in (step.SGD, step.SGD_MOMENTUM):
        table[:, 1:5] = (h["momentum"], 1 - h["dampening"], h["weight_decay"], h["nesterov"])
        table[:1, 5] = opt.t == 0  # the first step of the run: torch starts the velocity at the gradient
    elif kind in (step.ADAM, step.ADAMW):
        table[:] = (0, h["weight_decay"], 1 - h["beta1"], h["beta2"], 1 - h["beta2"], 0, 0, h["eps"])
        b1, b2 = h["beta1"], h["beta2"]
        table[:, 5] = lr / (1 - np.array([b1 ** t for t in steps]))
        table[:, 6] = np.sqrt(1 - np.array([b2 ** t for t in steps]))
        lr = 1 - lr * h["weight_decay"]
    elif kind in (step.RMSPROP, step.RMSPROP_MOMENTUM):
        table[:, 1:6] = (h["alpha"], 1 - h["alpha"], h["eps"], h["weight_decay"], h["momentum"])
    elif kind == step.ADAGRAD:
        table[:, 1:3] = (h["eps"], h["weight_decay"])
    else:
        table[:, 1:5] = (h["rho"], 1 - h["rho"], h["eps"], h["weight_decay"])
    table[:, 0] = lr
    return table, rates
