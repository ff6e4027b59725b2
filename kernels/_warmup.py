"""Warm-up: compile (or load from Numba's on-disk cache) the kernels a run needs before it starts.

A cold cache costs tens of seconds of compilation; :func:`warmup` says so on stderr when it happens
(silent when everything is cached), compiles only the kernels asked for, and spreads the work over the
CPU's cores: the kernels are split into one share per process, helper processes compile theirs into the
shared cache while this one compiles its own, then this process loads what they compiled. This process
starts with the longest job; a helper runs its share shortest first, so that by the time it reaches its
long jobs, what those share with this process's (the GEMM's packing routine) is in the cache.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np

from ._api import ACTIVATIONS
from ._dispatch import use_backend

# Compile cost of each job (CPU seconds on the idle 2-vCPU Zen 3 with a cold cache, float32, serial variants,
# rounded): only used to balance the shares between processes. matmul is the GEMM's register-tile body
# (compiled once per dtype), its thin wrappers for the three layouts (a @ b, a.T @ b, a @ b.T) and its
# multithreaded driver; "matmul narrow" its dot-product body (outputs of at most 16 columns), compiled apart;
# "training step" the compiled epoch's driver (~15) and its first-layer worker (~7).
COST = {"matmul": 6.6, "matmul narrow": 2.3, "softmax_cross_entropy": 1.8, "check_step": 0.9, "training step": 22.0}
COST["matmul small"] = 3.2  # the GEMM's small-M routes rows and dots (kernels.cpu._small)
DEFAULT_COST = 0.6


def _job_calls(name, dtype, activations=ACTIVATIONS, large=True):
    """The calls that compile kernel ``name`` for ``dtype``: small arrays in every layout nn uses, the
    ``activations`` the run uses where a kernel has one compiled function per activation, and when
    ``large`` arrays big enough for the multithreaded variants."""
    import kernels as k

    x = np.linspace(-2, 2, 96, dtype=dtype).reshape(8, 12)
    w = np.linspace(-1, 1, 144, dtype=dtype).reshape(12, 12)
    big = np.ones((128, 128), dtype)  # 2^22 flops: the GEMM's multithreaded driver (when threads > 1)
    rows = (x, np.ones((1 << 13, 16), dtype)) if large else (x,)  # 2^17 elements: the row kernels' threads
    p, g, s1, s2 = (np.zeros(1 << 16 if large else 64, dtype) for _ in range(4))  # the chunked drivers
    norms = (p[:64], np.zeros(1 << 19, dtype)) if large else (p,)  # 2^19 elements: segment_norms' threads
    wide = np.linspace(-1, 1, 12 * 24, dtype=dtype).reshape(12, 24)
    calls = {  # the GEMM's two routes compile apart: register tiles (N > 16 or A strided), dot products
        "matmul": lambda: (k.matmul(x, wide, bias=np.zeros(24, dtype), activation="relu"),
                           k.matmul(x, x, trans_a=True), k.matmul(x, wide.T, trans_b=True), k.matmul(big, big),
                           *[k.matmul(x, wide, activation=act) for act in activations if act in ("sigmoid", "tanh")]),
        "matmul narrow": lambda: (k.matmul(x, w, bias=np.zeros(12, dtype), activation="relu"),
                                  k.matmul(x, w, trans_b=True)),
        "softmax_cross_entropy": lambda: [k.softmax_cross_entropy(r, np.arange(len(r)) % 10) for r in rows],
        "mse": lambda: k.mse(x, x),
        "binary_cross_entropy": lambda: k.binary_cross_entropy(x, x),
        "hinge": lambda: k.hinge(x, np.sign(x) + (x == 0)),
        "bias_grad": lambda: [k.bias_grad(r) for r in rows],
        "dropout": lambda: (k.dropout(x, 0.5, 0), k.dropout(p, 0.5, 0)),
        "training step": lambda: _training_step(dtype, activations),
        "bias_act_backward": lambda: [k.bias_act_backward(r, r, act) for r in rows for act in activations],
        "segment_norms": lambda: [k.segment_norms(v, np.array([0, 32, 64])) for v in norms],
        "batchnorm": lambda: _batchnorm(k, x),
        "sgd_step": lambda: k.sgd_step(p, g, lr=0.1, momentum=0.9, velocity=s1, nesterov=True, weight_decay=0.1,
                                       step=1),
        "adam_step": lambda: (k.adam_step(p, g, s1, s2, step=1, weight_decay=0.1),
                              k.adam_step(p, g, s1, s2, step=1, weight_decay=0.1, decoupled=True)),
        "rmsprop_step": lambda: k.rmsprop_step(p, g, s1, momentum=0.9, momentum_buffer=s2),
        "adagrad_step": lambda: k.adagrad_step(p, g, s1),
        "adadelta_step": lambda: k.adadelta_step(p, g, s1, s2),
        "count_correct": lambda: (k.count_correct(x, np.arange(8) % 12, np.zeros(k.metrics_size(0))),
                                  k.count_correct(x, x, np.zeros(k.metrics_size(0)), threshold=0.5)),
        "check_step": lambda: k.check_step(x[0, 0], np.ones(2), np.zeros(k.metrics_size(2)), np.ones(1, dtype),
                                           rows=8),
        "optimizer scale": lambda: [step(np.full(1, 0.5, dtype)) for step in (
            lambda s: k.sgd_step(p, g, lr=0.1, momentum=0.9, velocity=s1, nesterov=True, weight_decay=0.1, step=1,
                                 scale=s),
            lambda s: k.adam_step(p, g, s1, s2, step=1, weight_decay=0.1, scale=s),
            lambda s: k.adam_step(p, g, s1, s2, step=1, weight_decay=0.1, decoupled=True, scale=s),
            lambda s: k.rmsprop_step(p, g, s1, momentum=0.9, momentum_buffer=s2, scale=s),
            lambda s: k.adagrad_step(p, g, s1, scale=s), lambda s: k.adadelta_step(p, g, s1, s2, scale=s))],
        # two of its routes: rows (M = 1), dots (dy @ W^T); not tiles (0.7 s), whose first call needs the GEMM's
        # body, which the "matmul" job compiles in parallel
        "matmul small": lambda: (k.matmul(x[:1], wide),
                                 k.matmul(np.ones((2, 64), dtype), np.ones((24, 64), dtype), trans_b=True)),
    }
    for act in ("relu", "leaky_relu"):  # backward from the input (or the saved output, as nn does)
        calls[act] = lambda act=act: getattr(k, act)(x)
        calls[act + "_backward"] = lambda act=act: getattr(k, act + "_backward")(x, x)
    for act in ("sigmoid", "tanh", "softmax"):  # backward from the output
        calls[act] = lambda act=act: getattr(k, act)(x)
        calls[act + "_backward"] = lambda act=act: getattr(k, act + "_backward")(getattr(k, act)(x), x)
    return calls[name]


def _training_step(dtype, activations):
    """nn's compiled epoch (``Trainer(compiled=True)``: its driver and the kernels it calls) on a tiny model."""
    import nn
    from kernels.cpu import step

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((8, 4)).astype(dtype), np.arange(8) % 2
    for act in activations:
        model = nn.Sequential([nn.Dense(3, activation=act), nn.Dense(2)], input_dim=4, dtype=dtype, seed=0)
        nn.Trainer(model, compiled=True).fit(X, y, batch_size=4, verbose=0)
    step.compile_worker(dtype)  # the step's worker on a second core (not run by these small models)


def _batchnorm(k, x):
    """Training forward and backward, then evaluation, on ``x``'s 12 columns."""
    gamma, beta, mean, var = (np.full(12, v, x.dtype) for v in (1, 0, 0, 1))
    _, xhat, inv_std = k.batchnorm_forward(x, gamma, beta, mean, var)
    k.batchnorm_backward(x, xhat, gamma, inv_std)
    k.batchnorm_eval(x, gamma, beta, mean, var)


KERNELS = ("matmul", "matmul narrow", "relu", "relu_backward", "leaky_relu", "leaky_relu_backward", "sigmoid",
           "sigmoid_backward", "tanh", "tanh_backward", "softmax", "softmax_backward", "softmax_cross_entropy",
           "mse", "binary_cross_entropy", "hinge", "bias_grad", "dropout", "bias_act_backward", "segment_norms",
           "batchnorm", "sgd_step", "adam_step", "rmsprop_step",
           "adagrad_step", "adadelta_step", "count_correct", "check_step", "optimizer scale",
           "training step", "matmul small")


def _watch(first=None):
    """A listener counting Numba compilations (cache loads fire no ``numba:compile`` event) in its
    ``compiles``; it calls ``first()`` at the first one. Installed with :func:`_watching`."""
    from numba.core import event

    class Watch(event.Listener):
        compiles = 0

        def on_start(self, ev):
            nonlocal first
            self.compiles += 1
            if first is not None:
                first, call = None, first
                call()

        def on_end(self, ev):
            pass

    return Watch()


def _watching(listener):
    from numba.core import event

    return event.install_listener("numba:compile", listener)


def _run(job, backend, activations, large):
    """Run one ``(name, dtype)`` job; returns (seconds, whether anything was compiled)."""
    watch = _watch()
    t0 = time.perf_counter()
    with _watching(watch), use_backend(backend):
        _job_calls(job[0], np.dtype(job[1]), activations, large)()
    return time.perf_counter() - t0, watch.compiles > 0


def _shares(jobs, processes):
    """Split ``jobs`` into ``processes`` lists of about equal estimated cost (longest first)."""
    shares, loads = [[] for _ in range(processes)], [0.0] * processes
    for job in sorted(jobs, key=lambda j: -COST.get(j[0], DEFAULT_COST)):
        i = loads.index(min(loads))
        shares[i].append(job)
        loads[i] += COST.get(job[0], DEFAULT_COST)
    return shares


def _parallel_min():
    from .cpu._parallel import PARALLEL_MIN

    return PARALLEL_MIN


def _cache_dir():
    from .cpu import _gemm

    return _gemm.gemm._cache._cache_path


def _selected(only):
    if only is None:
        return list(KERNELS)
    names = [only] if isinstance(only, str) else list(only)
    unknown = [n for n in names if n not in KERNELS]
    if unknown:
        raise ValueError(f"only must name kernels among {list(KERNELS)}, got {unknown}")
    return [n for n in KERNELS if n in names or (n == "matmul narrow" and "matmul" in names)]


def warmup(backend="numba", dtypes=("float32", "float64"), only=None, verbose=1, processes=None,
           activations=ACTIVATIONS, largest=None):
    """Call each kernel once on small arrays so that the first real call does not pay the compile.

    ``only``: kernel names (as in ``kernels.__all__``) to prepare, default all; ``dtypes``: the dtypes
    the run uses; ``activations``: those the run's fused kernels (``bias_act_backward``) use; ``largest``:
    the most elements one call of an elementwise or row kernel handles in the run (None: unknown); below
    ``kernels.cpu._parallel.PARALLEL_MIN`` only their serial variants are prepared. On the numba backend a cold cache is filled by ``processes`` processes (default: the CPUs this process may run on)
    and reported on stderr unless ``verbose=0``; a warm one loads in well under a second, silently.
    Returns the backend name.
    """
    if not isinstance(verbose, int):
        raise TypeError(f"verbose must be an int, got {type(verbose).__name__}")
    activations = [activations] if isinstance(activations, str) else list(activations)
    if not set(activations) <= set(ACTIVATIONS):
        raise ValueError(f"activations must be among {ACTIVATIONS}, got {activations}")
    if largest is not None and (isinstance(largest, bool) or not isinstance(largest, int) or largest < 0):
        raise ValueError(f"largest must be None or an int >= 0 (elements), got {largest!r}")
    jobs = [(name, np.dtype(dt).name) for dt in dtypes for name in _selected(only)]
    large = largest is None or largest >= _parallel_min()
    if backend != "numba":  # nothing compiles ahead on the reference; cuda compiles per launch shape
        for job in jobs:
            _run(job, backend, activations, large)
        return backend
    if processes is None:
        processes = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    mine, *theirs = _shares(jobs, max(1, min(processes, len(jobs))))
    helpers, start, mine_done = [], time.perf_counter(), []

    def cold():  # the first compilation: say so, and start helpers on the other shares while this one works
        if verbose:
            print(f"kernels: compiling numba kernels for {', '.join(sorted({j[1] for j in jobs}))} in "
                  f"{1 if mine_done else 1 + len([s for s in theirs if s])} process(es) (first run only, cached in "
                  f"{_cache_dir()})", file=sys.stderr, flush=True)
        if mine_done:
            return
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this kernels package, not another
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        helpers.extend(subprocess.Popen([sys.executable, "-c", _HELPER, json.dumps([share[::-1], activations, large])],
                                        stdout=subprocess.PIPE, text=True, env=env)
                       for share in theirs if share)  # shortest first: see the module's doc

    timings = []
    with _watching(_watch(cold)):
        for job in mine:
            timings.append((job, *_run(job, backend, activations, large)))
            _report(timings[-1], verbose)
        mine_done.append(True)
        for helper in helpers:
            out, _ = helper.communicate()
            for line in out.splitlines():  # a helper that failed leaves its jobs to the loop below
                job, seconds, compiled = json.loads(line)
                _report((tuple(job), seconds, compiled), verbose)
        for share in theirs:  # load what the helpers compiled (or compile here what they could not)
            for job in share:
                timings.append((job, *_run(job, backend, activations, large)))
                if not helpers:
                    _report(timings[-1], verbose)
    if verbose and (helpers or any(compiled for _, _, compiled in timings)):
        print(f"kernels: compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return backend


def _report(timing, verbose):
    (name, dtype), seconds, compiled = timing
    if verbose and compiled:
        print(f"kernels:   {name} {dtype}: {seconds:.1f} s", file=sys.stderr, flush=True)


def _helper(argument):
    """A helper process: compile one share (JSON: the list of jobs, the activations, large), print one JSON
    line per job."""
    share, activations, large = json.loads(argument)
    for job in share:
        print(json.dumps([job, *_run(tuple(job), "numba", activations, large)]), flush=True)


_HELPER = "import sys; from kernels._warmup import _helper; _helper(sys.argv[1])"
