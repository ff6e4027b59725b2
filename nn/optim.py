"""Optimizers: each class validates its hyperparameters and holds its state as flat buffers shaped
like the model's flat parameter buffer; :meth:`Optimizer.step` is ONE fused kernel call over the
whole model (torch.optim semantics: the step counter starts at 1). Hyperparameters are validated when
set (constructor, ``lr`` setter, ``load_state_dict``), so the step calls the backend's kernel without
checks. A step can take a device ``scale`` (written by ``kernels.check_step``) that clips the gradient
and skips non-finite steps inside the same kernel call. Also gradient clipping by global norm on the host.
"""

import math

import numpy as np

from kernels import _dispatch

from ._device import namespace_of, to_host


def _check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check(name, value, low=0.0, high=math.inf, high_open=False):
    value = float(value)
    ok = math.isfinite(value) and value >= low and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}{')' if high_open else ']'}, "
                         f"got {value!r}")
    return value


class Optimizer:
    """Base class. Subclasses list their state ``buffers``, their ``defaults`` and ``_update``."""

    buffers = ()
    defaults = {}
    limits = {}  # hyperparameter -> (low, high, high_open)

    def __init__(self, **hyper):
        unknown = set(hyper) - set(self.defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown hyperparameters {sorted(unknown)}; "
                            f"it takes {sorted(self.defaults)}")
        self.hyper = {k: _check(k, hyper.get(k, v), *self.limits.get(k, ())) if isinstance(v, float)
                      else _check_flag(k, hyper.get(k, v)) for k, v in self.defaults.items()}
        self.base_lr = self.hyper["lr"]
        self.t = 0
        self.params = self.grads = None
        self.state = {}

    @property
    def lr(self):
        return self.hyper["lr"]

    @lr.setter
    def lr(self, value):
        self.hyper["lr"] = _check("lr", value)

    def bind(self, params, grads):
        """Attach to flat parameter and gradient buffers; state buffers start at zero."""
        xp = namespace_of(params)
        self.params, self.grads = params, grads
        self.state = {name: xp.zeros_like(params) for name in self.buffers}
        self.t = 0
        return self

    def step(self, k=None, scale=None):
        """One update of every parameter from the gradient buffer, in one kernel call of the backend
        module ``k`` (default: the one the bound buffers dispatch to). ``scale``: the optimizer kernels'
        1-element gradient scale on the device (0 skips the update there; the step counter ``t`` still
        advances: whoever skips it on the device rolls ``t`` back when it learns so, see the trainer)."""
        if self.params is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to parameters; call bind(params, grads)")
        if k is None:
            k = _dispatch.select(param=self.params)
        self._update(k, self.t + 1, self.params, self.grads, scale, **self.state)
        self.t += 1

    def _update(self, k, t, param, grad, scale, **state):
        """Call ``k``'s kernel for step number ``t`` (flat, C-contiguous buffers; ``scale`` or None)."""
        raise NotImplementedError

    def state_dict(self):
        """Hyperparameters, step count and host copies of the state buffers."""
        return {"class": type(self).__name__, "hyper": dict(self.hyper), "base_lr": self.base_lr, "t": self.t,
                "buffers": {k: to_host(v).copy() for k, v in self.state.items()}}

    def load_state_dict(self, sd):
        """Restore :meth:`state_dict` output (hyperparameters included); validates before changing anything.

        The state of an optimizer not yet bound (saved before the first step: no buffers, ``t`` 0) restores
        as a fresh one: every buffer zero."""
        if sd["class"] != type(self).__name__:
            raise ValueError(f"optimizer state is for {sd['class']}, not {type(self).__name__}")
        template = type(self)(**sd["hyper"])  # validates the hyperparameters; its buffers follow from them
        fresh = not sd["buffers"] and int(sd["t"]) == 0
        if not fresh and set(sd["buffers"]) != set(template.buffers):
            raise ValueError(f"optimizer state has buffers {sorted(sd['buffers'])}, "
                             f"expected {sorted(template.buffers)}")
        if self.params is not None:
            for k, v in sd["buffers"].items():
                if v.shape != self.params.shape:
                    raise ValueError(f"optimizer buffer {k} has shape {v.shape}, but the model's parameters "
                                     f"have shape {self.params.shape}")
        self.hyper, self.buffers = template.hyper, template.buffers
        self.base_lr, self.t = float(sd["base_lr"]), int(sd["t"])
        if self.params is not None:
            xp = namespace_of(self.params)
            self.state = ({k: xp.zeros_like(self.params) for k in self.buffers} if fresh else
                          {k: xp.array(v, dtype=self.params.dtype) for k, v in sd["buffers"].items()})

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.hyper.items())})"


class SGD(Optimizer):
    """SGD with optional momentum (Nesterov too), dampening and L2 weight decay (torch.optim.SGD)."""

    buffers = ("velocity",)
    defaults = {"lr": 0.01, "momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}
    limits = {"dampening": (0.0, 1.0)}

    def __init__(self, **hyper):
        super().__init__(**hyper)
        if self.hyper["nesterov"] and (self.hyper["momentum"] <= 0 or self.hyper["dampening"] != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening == 0")
        if self.hyper["momentum"] == 0:
            self.buffers = ()

    def _update(self, k, t, param, grad, scale, velocity=None):
        h = self.hyper
        k.sgd_step(param, grad, h["lr"], h["momentum"], velocity, h["dampening"], h["nesterov"], h["weight_decay"],
                   t, scale)


class Adam(Optimizer):
    """Adam with L2 weight decay added to the gradient (torch.optim.Adam)."""

    buffers = ("m", "v")
    defaults = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    limits = {"beta1": (0.0, 1.0, True), "beta2": (0.0, 1.0, True)}
    decoupled = False

    def _update(self, k, t, param, grad, scale, m, v):
        h = self.hyper
        k.adam_step(param, grad, m, v, t, h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"],
                    self.decoupled, scale)


class AdamW(Adam):
    """Adam with decoupled weight decay (torch.optim.AdamW; default weight_decay 0.01)."""

    defaults = {**Adam.defaults, "weight_decay": 1e-2}
    decoupled = True


class RMSProp(Optimizer):
    """RMSProp with optional momentum (torch.optim.RMSprop, not centred)."""

    buffers = ("square_avg", "momentum_buffer")
    defaults = {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0}
    limits = {"alpha": (0.0, 1.0)}

    def __init__(self, **hyper):
        super().__init__(**hyper)
        if self.hyper["momentum"] == 0:
            self.buffers = ("square_avg",)

    def _update(self, k, t, param, grad, scale, square_avg, momentum_buffer=None):
        h = self.hyper
        k.rmsprop_step(param, grad, square_avg, h["lr"], h["alpha"], h["eps"], h["weight_decay"], h["momentum"],
                       momentum_buffer, scale)


class Adagrad(Optimizer):
    """Adagrad (torch.optim.Adagrad without lr decay)."""

    buffers = ("sum_sq",)
    defaults = {"lr": 1e-2, "eps": 1e-10, "weight_decay": 0.0}

    def _update(self, k, t, param, grad, scale, sum_sq):
        h = self.hyper
        k.adagrad_step(param, grad, sum_sq, h["lr"], h["eps"], h["weight_decay"], scale)


class Adadelta(Optimizer):
    """Adadelta (torch.optim.Adadelta)."""

    buffers = ("square_avg", "acc_delta")
    defaults = {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0}
    limits = {"rho": (0.0, 1.0)}

    def _update(self, k, t, param, grad, scale, square_avg, acc_delta):
        h = self.hyper
        k.adadelta_step(param, grad, square_avg, acc_delta, h["lr"], h["rho"], h["eps"], h["weight_decay"], scale)


OPTIMIZERS = {cls.__name__.lower(): cls for cls in (SGD, Adam, AdamW, RMSProp, Adagrad, Adadelta)}


def get(optimizer, **hyper):
    """An optimizer from a name (sgd, adam, adamw, rmsprop, adagrad, adadelta) or an instance."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    key = str(optimizer).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)} or an Optimizer, got {optimizer!r}")
    return OPTIMIZERS[key](**hyper)


def clip_grad_norm(grads, max_norm, total_norm):
    """Scale the flat gradient buffer in place so its global L2 norm is at most ``max_norm``.

    ``total_norm`` is the buffer's norm, already computed by the caller (the trainer gets it from the
    per-layer norms it records). Returns the scale applied (1.0 when within the limit).
    """
    if total_norm <= max_norm:
        return 1.0
    scale = max_norm / (total_norm + 1e-6)
    grads *= np.dtype(grads.dtype).type(scale)
    return scale
