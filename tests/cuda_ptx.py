"""Compile the cuda backend's kernels to PTX for real GPUs, on a machine without one.

The Numba CUDA simulator runs kernels as Python and never types or lowers them, so a kernel that a GPU
cannot compile passes every simulated test. This closes the gap in two kinds of process (numba.cuda reads
``NUMBA_ENABLE_CUDASIM`` once, at import):

- ``record`` (under the simulator): the launch point ``kernels.cuda._launch.launch`` is replaced by a
  recorder that runs nothing; the public kernel functions are called on small device arrays (the GPU's
  launch geometry; float32 and float64; every option that selects a kernel variant; strided inputs) and a
  small nn model trains on the cuda backend. Each launch keeps a recipe of its kernel (module-level
  functions by name, closures by their code and cell values) and its arguments' Numba types, typed as
  numba-cuda types device arrays and scalars at a launch.
- ``compile`` (without the simulator, one process per compute capability): rebuilds each kernel from its
  recipe and compiles it with ``numba.cuda.compile_ptx`` (Numba's typing and lowering, then NVVM: the
  NVRTC and NVVM wheels, no GPU or driver).

Compiling every recorded variant takes minutes (GEMM alone has 160, at ~2 s each), so each compute
capability compiles a covering subset of each kernel's variants (:func:`cover`): for cc 9.0 every
recorded pair of variant values (closure values and argument types) occurs in a compiled variant, for
cc 8.0 every value. ``python tests/cuda_ptx.py [--plan 9.0=all 8.0=pairs ...]`` prints a report (with
the variants whose PTX uses local memory); ``tests/test_cuda_compiles.py`` runs it.
"""

import argparse
import ast
import functools
import importlib
import itertools
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent  # the checkout whose kernels are checked
KERNEL_MODULES = ROOT / "kernels" / "cuda"
# (compute capability, how much of the recorded variants to compile: see COVERS): every pair of variant
# values for Hopper (H100/H200), every value for Ampere (A100)
PLAN = (("9.0", "pairs"), ("8.0", "values"))
UNAVAILABLE = 3  # exit status of ``compile`` when NVRTC or NVVM cannot be loaded

# ---- kernel recipes: described in the simulator's process, rebuilt in a compiling one -------------------


def describe(obj):
    """A picklable recipe that :func:`rebuild` turns back into ``obj`` in another process."""
    from numba.cuda.simulator.kernel import FakeCUDAKernel  # the simulator's cuda.jit(device=True)

    if isinstance(obj, FakeCUDAKernel):
        return ("device", describe(obj.fn))
    if isinstance(obj, types.FunctionType):
        if "<locals>" not in obj.__qualname__:
            return ("global", obj.__module__, obj.__qualname__)
        return ("closure", obj.__module__, obj.__qualname__, obj.__code__.co_firstlineno,
                tuple(describe(cell.cell_contents) for cell in obj.__closure__ or ()))
    pickle.dumps(obj)  # any other cell value travels as it is: fail here if it cannot
    return ("value", obj)


@functools.cache
def _code_objects(module):
    """{(name, first line): code object} of every function defined in ``module``'s source."""
    found, todo = {}, [compile(Path(module.__file__).read_text(), module.__file__, "exec", dont_inherit=True)]
    while todo:
        code = todo.pop()
        found[code.co_name, code.co_firstlineno] = code
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return found


_rebuilt = {}


def rebuild(recipe):
    """The object :func:`describe` described, built once per recipe (so device functions compile once)."""
    key = repr(recipe)
    if key not in _rebuilt:
        _rebuilt[key] = _rebuild(*recipe)
    return _rebuilt[key]


def _rebuild(kind, *parts):
    from numba import cuda
    from numba.cuda.dispatcher import CUDADispatcher

    from kernels.cuda._launch import Kernel

    if kind == "value":
        return parts[0]
    if kind == "device":
        fn = rebuild(parts[0])
        return fn if isinstance(fn, CUDADispatcher) else cuda.jit(device=True)(fn)
    module = importlib.import_module(parts[0])
    if kind == "global":
        obj = functools.reduce(getattr, parts[1].split("."), module)
        return obj.py_func if isinstance(obj, Kernel) else obj
    qualname, line, cells = parts[1:]
    code = _code_objects(module)[qualname.rsplit(".", 1)[-1], line]
    return types.FunctionType(code, module.__dict__, code.co_name, None,
                              tuple(types.CellType(rebuild(c)) for c in cells))


def kernel_name(recipe):
    """``module:qualname``: which kernel definition a recipe builds."""
    return f"{recipe[1]}:{recipe[2]}"


def found_kernels():
    """``module:qualname`` of every function decorated with ``@kernel`` in kernels/cuda/*.py."""
    names = set()

    def visit(node, module, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                qualname = prefix + child.name
                if isinstance(child, ast.FunctionDef) and any(
                        getattr(d, "id", getattr(d, "attr", None)) == "kernel" for d in child.decorator_list):
                    names.add(f"{module}:{qualname}")
                visit(child, module, qualname + (".<locals>." if isinstance(child, ast.FunctionDef) else "."))
            else:
                visit(child, module, prefix)

    for path in sorted(KERNEL_MODULES.glob("*.py")):
        visit(ast.parse(path.read_text()), f"kernels.cuda.{path.stem}", "")
    return names

# ---- record: every launch of the sweep, under the simulator --------------------------------------------


def argument_type(value):
    """The Numba type of a launch argument on a GPU: a device array as numba-cuda's
    ``DeviceNDArray._numba_type_`` types it (C or F layout when contiguous and not broadcast, else A),
    a scalar as ``numba.typeof``."""
    import numba

    if isinstance(value, np.generic) or not hasattr(value, "strides"):
        return numba.typeof(value)
    broadcast = 0 in value.strides and np.prod(value.shape) != 0
    flags = value.flags
    layout = ("C" if flags["C_CONTIGUOUS"] and not broadcast else
              "F" if flags["F_CONTIGUOUS"] and not broadcast else "A")
    return numba.types.Array(numba.from_dtype(value.dtype), len(value.shape), layout)


def record():
    """[(kernel recipe, argument types)] of the distinct launches of the sweep, in launch order."""
    import kernels
    from kernels.cuda import _launch

    launches = {}

    def recorder(kernel, griddim, blockdim, *args):
        recipe, signature = describe(kernel.py_func), tuple(argument_type(a) for a in args)
        launches.setdefault(repr((recipe, signature)), (recipe, signature))

    _launch.launch = recorder  # Kernel.__getitem__ looks the launch point up at every launch
    with _launch.use_geometry(_launch.GPU), kernels.use_backend("cuda"):
        for dtype in (np.float32, np.float64):
            _exercise(np.dtype(dtype))
        _train()
    return list(launches.values())


def _exercise(dtype):
    """Call every public kernel function with each option that selects a kernel variant."""
    from numba import cuda

    import kernels
    from kernels._api import ACTIVATIONS

    def dev(*shape, dt=dtype):
        return cuda.to_device(np.ones(shape, dt))

    x, dy, flat = dev(3, 5), dev(3, 5), dev(7)
    strided = [dev(5, 3).T, dev(3, 10)[:, ::2], dev(14)[::2], dev(2, 3, 5)[:, :, ::2]]  # F and A layouts
    for a in [x, *strided]:
        for name in ("relu", "leaky_relu", "sigmoid", "tanh"):
            getattr(kernels, name)(a)
            getattr(kernels, name + "_backward")(a, a)
        kernels.dropout(a, 0.5, seed=1, offset=3)
    wide = dev(2, 4097)  # more columns than a warp takes: a block per row
    for logits in (x, wide, x.T):
        y = kernels.softmax(logits)
        kernels.softmax_backward(y, y)
        for labels in (dev(logits.shape[0], dt=t) for t in (np.int64, np.int32, np.int8, np.uint8, np.uint64)):
            kernels.softmax_cross_entropy(logits, labels)
            kernels.count_correct(logits, labels, kernels.cuda.zeros(kernels.metrics_size(2), np.float64, x))
    for a in (x, x.T, flat):
        for loss in (kernels.mse, kernels.binary_cross_entropy, kernels.hinge):
            loss(a, a)
    for rows in (3, 300):  # one chunk of rows, and several
        kernels.bias_grad(dev(rows, 5))
    kernels.bias_grad(x.T)
    for activation in ACTIVATIONS:
        kernels.bias_act_backward(x, dy, activation)
        kernels.bias_act_backward(x.T, x.T, activation)
    _matmuls(dev)
    _optimizers(dev)
    _batchnorm(dev, x)
    _bookkeeping(dev, x)


def _matmuls(dev):
    import kernels
    from kernels._api import ACTIVATIONS

    for side in (4, 256):  # the GPU's small and large tiles (the simulator reports 4 SMs)
        for trans_a in (False, True):
            for trans_b in (False, True):
                a, b = dev(3, side) if trans_a else dev(side, 3), dev(side, 3) if trans_b else dev(3, side)
                for bias in (None, dev(side)):
                    for activation in (None, *ACTIVATIONS):
                        kernels.matmul(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias, activation=activation)
    for strided in (dev(3, 4).T, dev(4, 6)[:, ::2]):  # F and A layouts, for each operand
        kernels.matmul(strided, dev(3, 4), bias=dev(8)[::2], activation="relu")
        kernels.matmul(dev(4, 4), strided, activation="relu")


def _optimizers(dev):
    import kernels

    p, g, s1, s2 = dev(7), dev(7), dev(7), dev(7)
    for scale in (None, dev(1)):
        kernels.sgd_step(p, g, lr=0.1, scale=scale)
        kernels.sgd_step(p, g, lr=0.1, momentum=0.9, velocity=s1, nesterov=True, step=1, scale=scale)
        for decoupled in (False, True):
            kernels.adam_step(p, g, s1, s2, step=1, weight_decay=0.1, decoupled=decoupled, scale=scale)
        kernels.rmsprop_step(p, g, s1, scale=scale)
        kernels.rmsprop_step(p, g, s1, momentum=0.9, momentum_buffer=s2, scale=scale)
        kernels.adagrad_step(p, g, s1, scale=scale)
        kernels.adadelta_step(p, g, s1, s2, scale=scale)


def _batchnorm(dev, x):
    import kernels

    gamma, beta, running_mean, running_var = dev(5), dev(5), dev(5), dev(5)
    for a in (x, dev(5, 3).T):
        stats = kernels.batchnorm_stats(a)
        for parts in (None, stats, dev(2, 3, 5, dt=np.float64)):
            _, xhat, inv_std = kernels.batchnorm_forward(a, gamma, beta, running_mean, running_var, stats=parts)
        kernels.batchnorm_eval(a, gamma, beta, running_mean, running_var)
        sums = kernels.batchnorm_backward_sums(a, xhat)
        for parts in (None, sums, dev(2, 3, 5, dt=np.float64)):
            kernels.batchnorm_backward(a, xhat, gamma, inv_std, sums=parts)


def _bookkeeping(dev, x):
    import kernels

    metrics = kernels.cuda.zeros(kernels.metrics_size(2), np.float64, x)
    kernels.count_correct(x, x, metrics, threshold=0.5)
    for offsets in (dev(3, dt=t) for t in (np.int64, np.int32, np.int8, np.uint8, np.uint64)):
        norms = kernels.segment_norms(dev(7), offsets)
    for bias in (None, dev(5)):
        kernels.dense_grad_norm(x, x, bias)
    loss, _ = kernels.mse(x, x)
    for max_norm in (None, 1.0):
        kernels.check_step(loss, norms, metrics, dev(1), rows=3, max_norm=max_norm)


def _train():
    """A few steps of nn training on the cuda backend: the launches as nn makes them."""
    import nn

    rng = np.random.default_rng(0)
    X = rng.standard_normal((16, 4)).astype(np.float32)
    for loss, y in (("softmax_cross_entropy", rng.integers(0, 3, 16)), ("mse", rng.standard_normal((16, 3)))):
        model = nn.Sequential([nn.Dense(8, activation="relu"), nn.Dropout(0.2), nn.BatchNorm(), nn.Dense(3)],
                              seed=0)
        trainer = nn.Trainer(model, loss=loss, optimizer="adam", clip_norm=1.0)
        trainer.fit(X, y.astype(np.float32) if y.dtype.kind == "f" else y, epochs=1, batch_size=4,
                    validation_split=0.25, verbose=0)

# ---- compile: each recorded kernel variant, without the simulator ---------------------------------------


COVERS = {"values": 1, "pairs": 2, "all": None}  # how much of the recorded variants each cc compiles


def cover(launches, strength):
    """A subset of ``launches`` in which, for each kernel, every recorded value (strength 1) or pair of
    values (strength 2) of its features (closure cell values and argument types, by position) occurs at
    least once: greedy, the earliest launch on ties. Strength None: every launch."""
    if strength is None:
        return list(launches)

    def combinations(recipe, signature):
        cells = recipe[4] if recipe[0] == "closure" else ()
        features = sorted([(f"cell {i}", repr(c)) for i, c in enumerate(cells)] +
                          [(f"arg {i}", repr(t)) for i, t in enumerate(signature)])
        return set(itertools.combinations_with_replacement(features, strength))

    chosen, by_kernel = [], {}
    for launch in launches:
        by_kernel.setdefault(kernel_name(launch[0]), []).append(launch)
    for group in by_kernel.values():
        combos = [combinations(*launch) for launch in group]
        uncovered = set().union(*combos)
        while uncovered:
            best = max(range(len(group)), key=lambda i: len(combos[i] & uncovered))
            chosen.append(group[best])
            uncovered -= combos[best]
    return chosen


def _probe(cc):
    """None when NVRTC and NVVM load and compile a trivial kernel for ``cc``, else why not."""
    import numba
    from numba import cuda

    def probe(a):
        a[0] = 1

    try:
        cuda.compile_ptx(probe, (numba.float32[:],), cc=cc)
    except Exception as error:  # noqa: BLE001 - whatever fails on a trivial kernel is the toolchain
        return f"{type(error).__name__}: {error}".strip()
    return None


def compile_launches(launches, cc):
    """Compile each launch's kernel for ``cc``: [{kernel, variant, signature, error, float64, local}];
    ``error`` is None when it compiles, ``float64`` lists the float64 instructions of its PTX
    (:func:`float64_ops`), ``local`` counts its local-memory loads and stores (arrays NVVM kept out of
    registers: a report, not a failure)."""
    import numba.cuda.dispatcher
    from numba import cuda

    # Device functions compile for the current device's capability, which numba-cuda asks the driver
    # for: stand in a device of capability cc (one process per cc, as device functions cache by types).
    numba.cuda.dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    results = []
    for recipe, signature in launches:
        error = ptx = None
        try:
            ptx, _ = cuda.compile_ptx(rebuild(recipe), signature, cc=cc)
        except Exception as e:  # noqa: BLE001 - every failure is reported, with its kernel and types
            error = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(e).__name__}: {e}")  # without Numba's highlighting
        results.append({"kernel": kernel_name(recipe), "variant": _variant(recipe),
                        "signature": ", ".join(map(str, signature)), "error": error,
                        "float64": [] if ptx is None else float64_ops(ptx, signature),
                        "local": 0 if ptx is None else len(re.findall(r"\b(?:ld|st)\.local\b", ptx))})
    return results


def float64_ops(ptx, signature):
    """The distinct float64 instructions in the PTX of a kernel whose float arguments are all float32 ([]
    for other kernels): a float32 kernel promoted to float64 by a float64 constant or a mixed-type
    comparison, which the simulator cannot show and which costs 2x (H100) to 64x (consumer GPUs)."""
    import numba

    floats = {getattr(t, "dtype", t) for t in signature} & {numba.float32, numba.float64}
    if floats != {numba.float32}:
        return []
    return sorted(set(re.findall(r"^\s*([a-z][\w.]*\.f64)\b", ptx, re.MULTILINE)))


def _variant(recipe):
    """The closure values that select a kernel's variant, briefly (for reports)."""
    return ", ".join(map(_brief, recipe[4])) if recipe[0] == "closure" else ""


def _brief(recipe):
    kind, *parts = recipe
    if kind == "device":
        return _brief(parts[0])
    if kind == "closure":
        return f"{parts[1].rsplit('.', 1)[-1]}({_variant(recipe)})"
    return parts[1] if kind == "global" else repr(parts[0])

# ---- driver ---------------------------------------------------------------------------------------------


def _env(simulator):
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1" if simulator else "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _command(*args):
    return [sys.executable, "-W", "ignore", __file__, *map(str, args)]


def check(plan=PLAN):
    """Record the launches under the simulator, then compile them for each (compute capability, cover) of
    ``plan``, in parallel processes. Returns a report: ``unavailable`` (why NVRTC/NVVM cannot be loaded,
    else None), the kernel definitions ``found`` in kernels/cuda and ``launched`` by the sweep, the number
    of distinct launches ``recorded``, ``results`` per cc (see :func:`compile_launches`) and ``seconds``."""
    with tempfile.TemporaryDirectory() as tmp:
        launches, start = Path(tmp) / "launches.pickle", time.perf_counter()
        subprocess.run(_command("record", launches), env=_env(True), check=True, cwd=ROOT)
        recorded = time.perf_counter()
        jobs = {cc: subprocess.Popen(_command("compile", launches, cc, cover, Path(tmp) / f"{cc}.json"),
                                     env=_env(False), cwd=ROOT, stderr=subprocess.PIPE, text=True)
                for cc, cover in plan}
        errors, results = {cc: job.communicate()[1] for cc, job in jobs.items()}, {}
        for cc, job in jobs.items():
            stderr = errors[cc]
            if job.returncode == UNAVAILABLE:
                return {"unavailable": stderr.strip()}
            if job.returncode:
                raise RuntimeError(f"compiling for cc {cc} failed (exit {job.returncode}):\n{stderr}")
            results[cc] = json.loads((Path(tmp) / f"{cc}.json").read_text())
        recorded_launches = pickle.loads(launches.read_bytes())
    return {"unavailable": None, "found": sorted(found_kernels()),
            "launched": sorted({kernel_name(recipe) for recipe, _ in recorded_launches}),
            "recorded": len(recorded_launches), "results": results,
            "seconds": {"record": recorded - start, "compile": time.perf_counter() - recorded}}


def problems(report):
    """One line per kernel variant that failed to compile or does float64 arithmetic in a float32 kernel."""
    return [f"cc {cc}: {r['kernel']} [{r['variant']}] ({r['signature']}): "
            + (r["error"] or "float64 instructions in a float32 kernel: " + ", ".join(r["float64"]))
            for cc, results in report["results"].items() for r in results if r["error"] or r["float64"]]


def summary(report):
    if report["unavailable"]:
        return report["unavailable"]
    lines = [f"{len(report['found'])} kernels in kernels/cuda, {len(report['launched'])} launched by the sweep; "
             f"{report['recorded']} distinct launches recorded in {report['seconds']['record']:.1f} s"]
    lines += [f"cc {cc}: {len(results)} compiled in {report['seconds']['compile']:.1f} s (all cc in parallel), "
              f"{sum(bool(r['error']) for r in results)} failed, {sum(bool(r['float64']) for r in results)} "
              "float32 kernels with float64 instructions" for cc, results in report["results"].items()]
    lines += [f"cc {cc}: {r['local']} local-memory loads/stores in {r['kernel']} [{r['variant']}] ({r['signature']})"
              for cc, results in report["results"].items() for r in results if r["local"]]
    missing = sorted(set(report["found"]) - set(report["launched"]))
    return "\n".join(lines + [f"never launched: {name}" for name in missing] + problems(report))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("record", help="(under NUMBA_ENABLE_CUDASIM=1) pickle the sweep's launches").add_argument(
        "out", type=Path)
    com = sub.add_parser("compile", help="(without the simulator) compile pickled launches for one cc")
    com.add_argument("launches", type=Path)
    com.add_argument("cc", help="compute capability, e.g. 9.0")
    com.add_argument("cover", choices=COVERS)
    com.add_argument("out", type=Path, help="JSON results")
    parser.add_argument("--plan", nargs="+", default=[f"{cc}={cover}" for cc, cover in PLAN],
                        help="CC=COVER pairs (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "record":
        args.out.write_bytes(pickle.dumps(record()))
    elif args.command == "compile":
        cc = tuple(map(int, args.cc.split(".")))
        reason = _probe(cc)
        if reason is not None:
            print(f"NVRTC/NVVM cannot be loaded: {reason}", file=sys.stderr)
            sys.exit(UNAVAILABLE)
        launches = cover(pickle.loads(args.launches.read_bytes()), COVERS[args.cover])
        args.out.write_text(json.dumps(compile_launches(launches, cc)))
    else:
        report = check(tuple(tuple(item.split("=")) for item in args.plan))
        print(summary(report))
        sys.exit(1 if report["unavailable"] or problems(report) else 0)


if __name__ == "__main__":
    main()
