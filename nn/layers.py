"""Layers and the Sequential model.

A layer declares its parameter shapes in ``build``; :class:`Sequential` allocates ONE flat parameter
buffer and ONE flat gradient buffer and hands every layer views into them, so an optimizer step is a
single fused kernel call for the whole model. The built-in layers call the backend module's kernels
directly (``layer.k``, resolved once by the model: the unchecked functions behind the public
``kernels`` API, whose arguments the model validated once) and write activations and gradients into
buffers allocated once per batch shape (:meth:`Layer.buffer`), their parameter gradients straight into
their gradient views.
"""

import json
import math

import numpy as np

import kernels
from kernels import _checks as check
from kernels import _dispatch

from ._device import namespace, to_host
from .distributed import Communicator

INITS = ("he", "xavier", "glorot", "normal", "zeros")


class Layer:
    """Base class. Subclasses set ``param_shapes`` in ``build`` and implement forward/backward."""

    k = None  # the backend module whose kernels the layer calls, set by Sequential
    counters = ()  # keys of ``state`` that count random draws (not weights: early stopping keeps them)
    comm = Communicator()  # distributed: the trainer's communicator (Dropout and BatchNorm use it)

    def __init__(self):
        self.name = None
        self.param_shapes = {}
        self.params = {}
        self.grads = {}
        self.xp = np
        self.input_dim = self.output_dim = None
        self._buffers = {}

    def build(self, input_dim, xp, dtype):
        """Fix the input width; set ``param_shapes`` and ``output_dim`` (parameter-free by default)."""
        self.input_dim, self.output_dim, self.xp, self.dtype = input_dim, input_dim, xp, np.dtype(dtype)

    def init_params(self, rng):
        """Initial values of the parameters, as host arrays keyed like ``param_shapes``."""
        return {}

    def buffer(self, key, shape):
        """A scratch array of ``shape`` for ``key`` (``y``, ``dx``...), allocated on the first call for
        that shape and reused after: a training step allocates nothing once its shapes were seen."""
        buf = self._buffers.get((key, shape))
        if buf is None:
            if len(self._buffers) > 64:  # many batch shapes seen (predict on ragged inputs): start over
                self._buffers.clear()
            buf = self._buffers[key, shape] = self.xp.empty(shape, self.dtype)
        return buf

    def forward(self, x, training):
        raise NotImplementedError

    def backward(self, dy, need_dx=True):
        """Write parameter gradients into ``self.grads`` and return dL/dx (None when not needed)."""
        raise NotImplementedError

    def state(self):
        """Non-trainable state (running statistics, RNG counters) as host arrays; saved in checkpoints."""
        return {}

    def load_state(self, state):
        """Set the state returned by :meth:`state`; keys in ``counters`` may be missing (then they stay)."""

    def reset_state(self):
        """Set the state to what a newly built layer has (``reset_parameters`` calls it)."""

    def config(self):
        """Constructor arguments, JSON-serialisable: ``type(self)(**self.config())`` rebuilds the layer."""
        return {}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


# ---- activations ----------------------------------------------------------------------------------

class Activation(Layer):
    """An elementwise (or, for softmax, row-wise) activation: ``relu``, ``leaky_relu``, ``sigmoid``,
    ``tanh`` or ``softmax``. ReLU and LeakyReLU differentiate from their input, the others from their
    output, as the kernels' ``*_backward`` functions expect."""

    KINDS = ("relu", "leaky_relu", "sigmoid", "tanh", "softmax")
    FROM_INPUT = ("relu", "leaky_relu")

    def __init__(self, kind, alpha=0.01):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"activation must be one of {self.KINDS}, got {kind!r}")
        self.kind, self.alpha = kind, _check_alpha(alpha)
        self._saved = None

    def forward(self, x, training):
        y = self.buffer("y", x.shape)
        if self.kind == "softmax":
            self.k.softmax(x, y)
        else:
            getattr(self.k, self.kind)(x.reshape(-1), *self._extra(), y.reshape(-1))
        self._saved = x if self.kind in self.FROM_INPUT else y
        return y

    def backward(self, dy, need_dx=True):
        dx = self.buffer("dx", dy.shape)
        if self.kind == "softmax":
            self.k.softmax_backward(self._saved, dy, dx)
        else:
            getattr(self.k, self.kind + "_backward")(self._saved.reshape(-1), dy.reshape(-1), *self._extra(),
                                                     dx.reshape(-1))
        return dx

    def _extra(self):
        return (self.alpha,) if self.kind == "leaky_relu" else ()

    def config(self):
        return {"kind": self.kind, "alpha": self.alpha} if self.kind == "leaky_relu" else {"kind": self.kind}


def _check_alpha(alpha):
    alpha = float(alpha)
    if not 0 <= alpha < 1:
        raise ValueError(f"leaky_relu alpha must be in [0, 1), got {alpha}")
    return alpha


def ReLU():
    """max(x, 0)."""
    return Activation("relu")


def LeakyReLU(alpha=0.01):
    """x for x > 0, else alpha * x."""
    return Activation("leaky_relu", alpha)


def Sigmoid():
    """1 / (1 + exp(-x))."""
    return Activation("sigmoid")


def Tanh():
    """Hyperbolic tangent."""
    return Activation("tanh")


def Softmax():
    """Softmax over each row (for probabilities; train classifiers on logits with the fused loss)."""
    return Activation("softmax")


# ---- Dense ----------------------------------------------------------------------------------------

# At steps of at most this many rows a Dense layer's gradient is an outer product (or a sum of two), whose
# norm its factors give in O(K + N) (``Dense.grad_norm``): the trainer and the compiled step take it there
FACTORED_NORM_ROWS = 2

class Dense(Layer):
    """``y = activation(x @ W + b)``, forward in one fused matmul call (bias and activation in its epilogue).

    ``init`` picks the weight initialisation: ``he`` (normal, std sqrt(2 / fan_in), the default for
    relu and leaky_relu), ``xavier``/``glorot`` (normal, std sqrt(2 / (fan_in + fan_out)), the default
    otherwise), ``normal`` (std ``init_std``) or ``zeros`` (which keeps all hidden units identical
    forever: every unit gets the same gradient, so nothing breaks the symmetry). Biases start at zero.
    """

    ACTIVATIONS = (None, "relu", "leaky_relu", "sigmoid", "tanh")

    def __init__(self, units, activation=None, init=None, alpha=0.01, init_std=0.01):
        super().__init__()
        if not isinstance(units, (int, np.integer)) or isinstance(units, bool) or units < 1:
            raise ValueError(f"units must be a positive integer, got {units!r}")
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"Dense activation must be one of {self.ACTIVATIONS}, got {activation!r}")
        if init is None:
            init = "he" if activation in ("relu", "leaky_relu") else "xavier"
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.units, self.activation, self.init = int(units), activation, init
        self.alpha, self.init_std = _check_alpha(alpha), float(init_std)
        self._x = self._y = self._dz = None

    def build(self, input_dim, xp, dtype):
        super().build(input_dim, xp, dtype)
        self.output_dim = self.units
        self.param_shapes = {"W": (input_dim, self.units), "b": (self.units,)}

    def init_params(self, rng):
        fan_in, fan_out = self.param_shapes["W"]
        std = {"he": math.sqrt(2 / fan_in), "xavier": math.sqrt(2 / (fan_in + fan_out)),
               "glorot": math.sqrt(2 / (fan_in + fan_out)), "normal": self.init_std, "zeros": 0.0}[self.init]
        return {"W": rng.standard_normal((fan_in, fan_out)) * std, "b": np.zeros(fan_out)}

    def forward(self, x, training):
        y = self.buffer("y", (x.shape[0], self.units))
        self.k.matmul(x, self.params["W"], False, False, self.params["b"], self.activation, self.alpha, y)
        self._x, self._y = x, y
        return y

    def backward(self, dy, need_dx=True):
        # relu/leaky_relu (alpha >= 0) are positive exactly where their input is, so the saved output
        # stands in for the pre-activation and the forward pass stores nothing extra.
        if self.activation is None:
            self.k.bias_grad(dy, self.grads["b"])
        else:  # dy * activation'(y) and its column sums in one pass
            dz = self.buffer("dz", dy.shape)
            self.k.bias_act_backward(self._y, dy, self.activation, self.alpha, dz, self.grads["b"])
            dy = dz
        self._dz = dy
        self.k.matmul(self._x, dy, True, False, None, None, self.alpha, self.grads["W"])
        if not need_dx:
            return None
        dx = self.buffer("dx", self._x.shape)
        self.k.matmul(dy, self.params["W"], False, True, None, None, self.alpha, dx)
        return dx

    def grad_norm(self, out):
        """``out[0]`` = the norm of the last :meth:`backward`'s gradient (W and b) from its factors (the
        backend's ``dense_grad_norm``): what the trainer takes at steps of at most FACTORED_NORM_ROWS rows."""
        self.k.dense_grad_norm(self._x, self._dz, self.grads["b"], out)

    def config(self):
        return {"units": self.units, "activation": self.activation, "init": self.init, "alpha": self.alpha,
                "init_std": self.init_std}


# ---- Dropout --------------------------------------------------------------------------------------

class Dropout(Layer):
    """Inverted dropout, only in training: zero each value with probability ``rate``, scale the rest
    by 1 / (1 - rate); identity in evaluation. The mask's seed is derived from the model's seed, the
    layer's position and a call counter (saved in checkpoints), so training is reproducible and a
    resumed run draws the same masks; the backward pass reapplies the same mask to ``dy``."""

    counters = ("calls",)

    def __init__(self, rate):
        super().__init__()
        rate = float(rate)
        if not 0 <= rate < 1:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.seed_base = 0  # set from the model's seed and the layer's position by Sequential.reseed
        self.calls = 0
        self._seed = None

    def forward(self, x, training):
        if not training or self.rate == 0:
            self._seed = None
            return x
        self._seed = (self.seed_base + self.calls) % 2**64
        self.calls += 1
        self._offset = self.comm.offset * math.prod(x.shape[1:])  # distributed: global sample index
        y = self.buffer("y", x.shape)
        self.k.dropout(x.reshape(-1), self.rate, self._seed, self._offset, y.reshape(-1))
        return y

    def backward(self, dy, need_dx=True):
        if self._seed is None:
            return dy
        dx = self.buffer("dx", dy.shape)
        self.k.dropout(dy.reshape(-1), self.rate, self._seed, self._offset, dx.reshape(-1))
        return dx

    def state(self):
        return {"calls": np.array(self.calls, np.int64)}

    def load_state(self, state):
        self.calls = int(state["calls"])

    def reset_state(self):
        self.calls = 0

    def config(self):
        return {"rate": self.rate}


# ---- BatchNorm ------------------------------------------------------------------------------------

class BatchNorm(Layer):
    """Batch normalisation of dense features: ``gamma * (x - mean) / sqrt(var + eps) + beta``.

    Training normalises with the batch's mean and (biased) variance and updates running estimates
    (``running = (1 - momentum) * running + momentum * batch``, unbiased variance, as torch does);
    evaluation normalises with the running estimates. ``gamma`` and ``beta`` are learnt. On several
    ranks the batch is the global one: each pass reduces this rank's rows to a few numbers per column
    (a kernel), the ranks exchange them (one small collective) and the next kernel uses every rank's.
    """

    def __init__(self, momentum=0.1, eps=1e-5):
        super().__init__()
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.momentum, self.eps = float(momentum), float(eps)
        self._cache = None

    def build(self, input_dim, xp, dtype):
        super().build(input_dim, xp, dtype)
        self.param_shapes = {"gamma": (input_dim,), "beta": (input_dim,)}
        self.running_mean = xp.empty(input_dim, dtype)
        self.running_var = xp.empty(input_dim, dtype)
        self.reset_state()
        self.sums = xp.empty((3, input_dim), np.float64)  # this rank's batch statistics, then backward sums

    def init_params(self, rng):
        return {"gamma": np.ones(self.input_dim), "beta": np.zeros(self.input_dim)}

    def forward(self, x, training):
        y = self.buffer("y", x.shape)
        gamma, beta = self.params["gamma"], self.params["beta"]
        if training:
            xhat, inv_std = self.buffer("xhat", x.shape), self.buffer("inv_std", (x.shape[1],))
            self.k.batchnorm_stats(x, self.sums)
            parts = self.comm.gather(self.sums)  # distributed: every rank's statistics of the global batch
            self.k.batchnorm_forward(x, gamma, beta, self.running_mean, self.running_var, parts, self.momentum,
                                     self.eps, y, xhat, inv_std)
            self._cache = (xhat, inv_std)
        else:
            self.k.batchnorm_eval(x, gamma, beta, self.running_mean, self.running_var, self.eps, y)
            self._cache = None
        return y

    def backward(self, dy, need_dx=True):
        if self._cache is None:
            raise RuntimeError(f"{self.name}: backward needs a forward pass in training mode first")
        xhat, inv_std = self._cache
        self.k.batchnorm_backward_sums(dy, xhat, self.sums, self.grads["gamma"], self.grads["beta"])
        if not need_dx:
            return None
        parts = self.comm.gather(self.sums)  # distributed: every rank's sums over the global batch
        dx = self.buffer("dx", dy.shape)
        self.k.batchnorm_backward(dy, xhat, self.params["gamma"], inv_std, parts, dx)
        return dx

    def state(self):
        return {"running_mean": to_host(self.running_mean), "running_var": to_host(self.running_var)}

    def load_state(self, state):
        self.xp.copyto(self.running_mean, self.xp.asarray(state["running_mean"], self.dtype))
        self.xp.copyto(self.running_var, self.xp.asarray(state["running_var"], self.dtype))

    def reset_state(self):
        self.xp.copyto(self.running_mean, 0)
        self.xp.copyto(self.running_var, 1)

    def config(self):
        return {"momentum": self.momentum, "eps": self.eps}


LAYERS = {cls.__name__: cls for cls in (Dense, Activation, Dropout, BatchNorm)}
_BUILTIN = frozenset(LAYERS.values())  # layers whose outputs are C-contiguous buffers


# ---- Sequential -----------------------------------------------------------------------------------

class Sequential:
    """A stack of layers with one flat parameter buffer and one flat gradient buffer.

    Built from ``input_dim`` when given, else lazily on the first batch (or by ``fit``). ``dtype`` is
    float32 by default (float64 for gradient checks); ``seed`` fixes the initial weights and the
    dropout masks. Arrays live on the kernels' current backend (NumPy on the CPU; for cuda, CuPy arrays
    where CuPy runs, else Numba device arrays: see ``nn/_device.py``).
    """

    def __init__(self, layers, input_dim=None, dtype="float32", seed=None):
        self.layers = list(layers)
        for layer in self.layers:
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential takes Layer instances, got {type(layer).__name__}")
        if not self.layers:
            raise ValueError("Sequential needs at least one layer")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self.seed = int(np.random.SeedSequence().entropy % 2**63) if seed is None else check.seed(seed)
        counts = {}
        for layer in self.layers:
            kind = getattr(layer, "kind", type(layer).__name__.lower())
            layer.name = f"{kind}_{counts.get(kind, 0)}"
            counts[kind] = counts.get(kind, 0) + 1
        self.input_dim = None
        self.params = self.grads = None
        self.xp = np
        self.k = None  # the backend module, resolved by bind_kernels
        if input_dim is not None:
            self.build(input_dim)

    @property
    def built(self):
        return self.params is not None

    @property
    def output_dim(self):
        return self.layers[-1].output_dim

    def build(self, input_dim, backend=None):
        """Allocate the flat buffers on ``backend``'s device (default: the current one), initialise."""
        if not isinstance(input_dim, (int, np.integer)) or input_dim < 1:
            raise ValueError(f"input_dim must be a positive integer, got {input_dim!r}")
        self.xp = xp = namespace(backend)
        self.input_dim = dim = int(input_dim)
        layout, offset = [], 0
        for layer in self.layers:
            layer.build(dim, xp, self.dtype)
            dim = layer.output_dim
            for name, shape in layer.param_shapes.items():
                size = math.prod(shape)
                layout.append((layer, name, shape, offset, offset + size))
                offset += size
        self.params = xp.zeros(offset, self.dtype)
        self.grads = xp.zeros(offset, self.dtype)
        self.slices = {}
        for layer, name, shape, start, stop in layout:
            layer.params[name] = self.params[start:stop].reshape(shape)
            layer.grads[name] = self.grads[start:stop].reshape(shape)
            old = self.slices.get(layer.name, slice(start, start))
            self.slices[layer.name] = slice(old.start, stop)
        self.reset_parameters()
        return self

    def reset_parameters(self):
        """Initialise every parameter from the model's seed (the same seed gives the same weights) and
        reset the layers' state (BatchNorm running statistics, Dropout counters), as in a new model."""
        for i, layer in enumerate(self.layers):
            for name, value in layer.init_params(np.random.default_rng([self.seed, i])).items():
                self.xp.copyto(layer.params[name], self.xp.asarray(value.astype(self.dtype)))
            layer.reset_state()
        self.reseed(self.seed)

    def reseed(self, seed):
        """Adopt ``seed`` for the dropout masks and the trainer's shuffling, keeping the weights (a restored
        checkpoint's seed: the resumed run then draws what the saved one would have drawn)."""
        self.seed = int(seed)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Dropout):
                layer.seed_base = int(np.random.SeedSequence([self.seed, i]).generate_state(1, np.uint64)[0])

    def forward(self, x, training=False):
        """The model's output for a batch ``x`` of shape (n, input_dim) on the model's device (a new array)."""
        if not self.built:
            self.build(x.shape[1])
        self.check_batch(x)
        self.bind_kernels()
        return self.xp.array(self.run_forward(self.k.ascontiguous(x), training))

    __call__ = forward

    def check_batch(self, x, what="x"):
        """Raise unless ``x`` is a 2-D array of the model's dtype and width on the model's device."""
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{what} must be an array, got {type(x).__name__}")
        if len(x.shape) != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"{what} must have shape (n, {self.input_dim}), got {tuple(x.shape)}")
        if np.dtype(x.dtype) != self.dtype:
            raise TypeError(f"{what} must have the model's dtype {self.dtype}, got {x.dtype}")
        if kernels.is_device_array(x) != kernels.is_device_array(self.params):
            raise TypeError(f"{what} must be on the model's device ("
                            f"{'a CUDA array' if kernels.is_device_array(self.params) else 'a NumPy array'})")

    def bind_kernels(self):
        """Resolve the backend module once (for host models: the current host backend) and hand it to
        every layer; the step then calls its kernels without dispatch or re-validation."""
        k = _dispatch.select(params=self.params)
        if k is not self.k:
            self.k = k
            for layer in self.layers:
                layer.k = k

    def run_forward(self, x, training):
        """Forward through the layers on a validated, C-contiguous batch; returns the last layer's
        output buffer (overwritten by the next call of the same shape)."""
        for layer in self.layers:
            x = layer.forward(x, training)
            if type(layer) not in _BUILTIN:  # a user's layer may return any layout
                x = self.k.ascontiguous(x)
        return x

    def backward(self, dy):
        """Backpropagate dL/d(output), filling the flat gradient buffer; the input's gradient is skipped."""
        self.bind_kernels()
        self.run_backward(self.k.ascontiguous(dy))

    def run_backward(self, dy):
        """Backward through the layers from a C-contiguous ``dy`` after :meth:`run_forward`."""
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            dy = layer.backward(dy, need_dx=i > 0)
            if dy is not None and type(layer) not in _BUILTIN:
                dy = self.k.ascontiguous(dy)

    def parameter_layers(self):
        """Names of the layers that own parameters, bottom to top, with their slices of the flat buffers."""
        return [(name, s) for name, s in self.slices.items() if s.stop > s.start]

    def state(self, counters=True):
        """Every layer's non-trainable state as ``{"<layer>.<key>": host array}``; without the RNG
        ``counters`` (Dropout's) when ``counters`` is False."""
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.state().items()
                if counters or k not in layer.counters}

    def load_state(self, state):
        """Set :meth:`state` output; the RNG counters it lacks keep their values."""
        for layer in self.layers:
            keys = [k for k in layer.state() if k not in layer.counters or f"{layer.name}.{k}" in state]
            if keys:
                layer.load_state({k: state[f"{layer.name}.{k}"] for k in keys})

    def get_weights(self):
        """A host copy of the flat parameters and the layer state that belongs with them (BatchNorm
        statistics), for early stopping: restoring them leaves the Dropout counters running, so the
        next epochs draw new masks instead of replaying the ones already used."""
        return to_host(self.params).copy(), {k: v.copy() for k, v in self.state(counters=False).items()}

    def set_weights(self, params, state):
        """Set the flat parameters and :meth:`state` output (from :meth:`get_weights` or a checkpoint)."""
        self.xp.copyto(self.params, self.xp.asarray(params, self.dtype))
        self.load_state(state)

    def config(self):
        """The architecture as a JSON string: layer types and arguments, input width, dtype, seed."""
        return json.dumps({"input_dim": self.input_dim, "dtype": self.dtype.name, "seed": self.seed,
                           "layers": [[type(layer).__name__, layer.config()] for layer in self.layers]})

    @classmethod
    def from_config(cls, text, backend=None):
        """Rebuild (unbuilt when ``input_dim`` is None) the model :meth:`config` describes."""
        spec = json.loads(text)
        for name, _ in spec["layers"]:
            if name not in LAYERS:
                raise ValueError(f"layer type {name!r} is not one of nn's {sorted(LAYERS)}: a custom layer cannot be "
                                 "rebuilt from a config; build the model with it and restore the weights into that "
                                 "model (checkpoint.restore or Trainer.restore)")
        model = cls([LAYERS[name](**args) for name, args in spec["layers"]], dtype=spec["dtype"],
                    seed=spec["seed"])
        if spec["input_dim"] is not None:
            model.build(spec["input_dim"], backend)
        return model
