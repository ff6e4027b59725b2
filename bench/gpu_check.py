"""The first thing to run on a machine with a GPU: ``python bench/gpu_check.py`` (a few minutes).

Checks, in order, each a row of one table printed at the end:

- versions: device, compute capability, SMs, driver, Python packages, numba-cuda's CUDA_ARRAY_INTERFACE_SYNC;
- the cuda tests on the hardware (``pytest -m cuda``, then nn's again with CuPy hidden, on Numba device
  arrays; ``--skip-tests`` leaves them out);
- registers, local memory and ``ld.local`` loads in the PTX of each GEMM variant (local memory in the main
  loop means the accumulators spilled: 5-10x slower);
- GEMM 4096^3 float32, NN / TN / NT, against cuBLAS through CuPy with TF32 off, timed with CUDA events;
- host microseconds per call for relu and a 64^2 matmul over 2000 back-to-back calls (CuPy arrays), and
  per step of a small training step, plain and replayed as a CUDA graph (``kernels.cuda.CapturedStep``);
- a hidden-synchronisation probe: ~100 ms of GEMMs queued, then the host time of one small call (a few
  microseconds unless something waits for the queue);
- GB/s of the fused elementwise, loss and optimizer kernels against a device-to-device copy;
- seconds per epoch of ``python -m nn.train`` with ``--backend cuda`` and ``--backend numba``;
- the training benchmark's models (``bench/bench_training.py``): nn on the cuda backend against the same
  model in PyTorch eager on the GPU (fused Adam/SGD), samples/s and microseconds per step, and the
  device-to-host copies nn made in the epoch (``kernels.cuda.launch_stats``).

Exits 1 when a test or a check fails, 0 otherwise; without a GPU it says so and exits 0.
"""

import argparse
import importlib.metadata
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("CUPY_TF32", "0")  # cuBLAS in full float32, as the kernels compute (read at CuPy's import)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEMM_SIDE = 4096


def no_gpu_reason():
    """Why no GPU can be checked here, or None. Imports numba.cuda (with the simulator off)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "NUMBA_ENABLE_CUDASIM=1: the Numba CUDA simulator is on"
    try:
        import warnings

        from numba import cuda

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not cuda.is_available():
                return "numba.cuda finds no CUDA device or driver"
    except Exception as error:  # noqa: BLE001 - any import or driver failure means no GPU here
        return f"numba.cuda failed: {error!r}"
    try:
        __import__("cupy")  # only whether it imports
    except ImportError:
        return "CuPy is not installed (pip install -e '.[cuda]'): the checks run on CuPy arrays"
    return None


class Table:
    def __init__(self):
        self.rows, self.failed = [], False

    def add(self, check, result, detail="", ok=True):
        self.rows.append((check, str(result), detail))
        self.failed |= not ok
        print(f"  {check}: {result} {detail}", flush=True)

    def section(self, name, fn, *args):
        print(f"[{name}]", flush=True)
        try:
            fn(self, *args)
        except Exception as error:  # noqa: BLE001 - a failed check is reported, and the next ones still run
            self.add(name, "ERROR", repr(error)[:200], ok=False)

    def print(self):
        width = max(len(r[0]) for r in self.rows)
        rwidth = max(len(r[1]) for r in self.rows)
        print("\n" + "=" * 100)
        for check, result, detail in self.rows:
            print(f"{check:{width}}  {result:>{rwidth}}  {detail}")


def _events_ms(fn, repeat):
    """Median milliseconds of ``fn()`` on CuPy's current stream, by CUDA events."""
    import cupy

    times = []
    for _ in range(repeat):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def versions(table):
    import cupy
    from numba import cuda
    from numba.cuda.core import config

    device = cuda.get_current_device()
    table.add("device", device.name.decode() if isinstance(device.name, bytes) else device.name,
              f"cc {device.compute_capability}, {device.MULTIPROCESSOR_COUNT} SMs")
    table.add("CUDA driver / runtime (CuPy)", f"{cupy.cuda.runtime.driverGetVersion()}",
              f"runtime {cupy.cuda.runtime.runtimeGetVersion()}")
    for package in ("numpy", "numba", "numba-cuda", "cupy-cuda12x", "cupy-cuda13x", "cupy"):
        try:
            table.add(f"package {package}", importlib.metadata.version(package))
        except importlib.metadata.PackageNotFoundError:
            pass
    table.add("CUDA_ARRAY_INTERFACE_SYNC", config.CUDA_ARRAY_INTERFACE_SYNC,
              "(the backend converts CuPy arrays itself with sync=False)")


def _pytest(table, label, paths, hide_cupy=False):
    """``pytest -m cuda`` on ``paths`` without the simulator, over every core when pytest-xdist is there;
    ``hide_cupy``: with ``import cupy`` failing, so that nn keeps its arrays in Numba device arrays."""
    import importlib.util
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    args = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *paths]
    if importlib.util.find_spec("xdist"):
        args += ["-n", str(min(16, os.cpu_count() or 1))]
    with tempfile.TemporaryDirectory() as hidden:
        if hide_cupy:
            os.makedirs(os.path.join(hidden, "cupy"))
            with open(os.path.join(hidden, "cupy", "__init__.py"), "w") as f:
                f.write('raise ImportError("CuPy hidden by bench/gpu_check.py")\n')
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [hidden, env.get("PYTHONPATH")]))
        t0 = time.perf_counter()
        result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    if result.returncode:
        print(result.stdout[-6000:], result.stderr[-3000:])
    table.add(label, "passed" if result.returncode == 0 else "FAILED",
              f"{summary} ({time.perf_counter() - t0:.0f} s)", ok=result.returncode == 0)


def tests(table):
    _pytest(table, "pytest -m cuda (CuPy arrays)", ["tests"])
    nn_tests = sorted(f"tests/{name}" for name in os.listdir(os.path.join(ROOT, "tests")) if name.startswith("test_nn"))
    _pytest(table, "pytest -m cuda, nn on Numba device arrays", nn_tests, hide_cupy=True)


def _variants():
    """(label, geometry tiles, trans_a, trans_b) for every GEMM tile shape and transpose path."""
    from kernels.cuda._launch import GPU

    return [(f"{name} {'T' if ta else 'N'}{'T' if tb else 'N'}", tiles, ta, tb)
            for name, tiles in (("128x128x8", GPU.large_tiles), ("64x64x16", GPU.small_tiles))
            for ta, tb in ((False, False), (True, False), (False, True))]


def gemm_registers(table):
    import cupy

    from kernels.cuda.matmul import _gemm_kernel

    a = cupy.ones((256, 256), np.float32)
    out = cupy.empty((256, 256), np.float32)
    for label, tiles, ta, tb in _variants():
        BM, BN, _, TM, TN = tiles
        kernel = _gemm_kernel(np.dtype(np.float32), tiles, ta, tb, True, "relu")
        kernel[(256 // BM, 256 // BN), (BN // TN, BM // TM)](a, a, a[0], np.float32(0), out)  # compiles
        compiled = kernel.compiled
        regs = list(compiled.get_regs_per_thread().values())[0]
        local = list(compiled.get_local_mem_per_thread().values())[0]
        ptx = list(compiled.inspect_asm().values())[0]
        loads = len(re.findall(r"\bld\.local", ptx))
        table.add(f"GEMM {label} f32 +bias+relu", f"{regs} regs", f"{local} B local memory, {loads} ld.local in PTX",
                  ok=True)


def gemm_speed(table):
    import cupy

    import kernels

    g = GEMM_SIDE
    rng = np.random.default_rng(0)
    a, b = (cupy.asarray(rng.standard_normal((g, g)).astype(np.float32)) for _ in range(2))
    out = cupy.empty((g, g), np.float32)
    flops = 2 * g**3
    cublas_ms = _events_ms(lambda: cupy.matmul(a, b, out=out), 5)
    table.add(f"cuBLAS (CuPy) {g}^3 f32", f"{flops / cublas_ms / 1e9:.1f} TFLOP/s", f"{cublas_ms:.2f} ms, TF32 off")
    for label, ta, tb in (("NN", False, False), ("TN", True, False), ("NT", False, True)):
        kernels.matmul(a, b, trans_a=ta, trans_b=tb, out=out)  # compile
        ms = _events_ms(lambda ta=ta, tb=tb: kernels.matmul(a, b, trans_a=ta, trans_b=tb, out=out), 5)
        table.add(f"kernels.matmul {g}^3 f32 {label}", f"{flops / ms / 1e9:.1f} TFLOP/s",
                  f"{ms:.2f} ms, {cublas_ms / ms:.0%} of cuBLAS")
    expected = cupy.matmul(a[:256], b[:, :256])
    got = kernels.matmul(a[:256], b[:, :256])
    error = float(cupy.max(cupy.abs(got - expected)))
    table.add("kernels.matmul vs cuBLAS, 256x4096x256", f"max |diff| {error:.2e}", ok=error < 1e-2)


def _host_us_per_call(fn, calls=2000):
    import cupy

    fn()
    cupy.cuda.get_current_stream().synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    cupy.cuda.get_current_stream().synchronize()
    return host * 1e6


def _training_step(cupy, batch=64, sizes=(784, 128, 64, 10)):
    """An MLP's step on CuPy arrays with long-lived buffers (so that it can be replayed as a graph)."""
    import kernels

    rng = np.random.default_rng(1)
    x = cupy.asarray(rng.standard_normal((batch, sizes[0])).astype(np.float32))
    labels = cupy.asarray(rng.integers(0, sizes[-1], batch))
    layers = [(cupy.asarray(rng.standard_normal((i, o)).astype(np.float32) * 0.05), cupy.zeros(o, np.float32))
              for i, o in zip(sizes[:-1], sizes[1:])]
    state = [[cupy.zeros_like(p) for _ in range(2)] for layer in layers for p in layer]

    def step():
        hs = [x]
        for i, (w, b) in enumerate(layers):
            hs.append(kernels.matmul(hs[-1], w, bias=b, activation=None if i == len(layers) - 1 else "relu"))
        loss, dy = kernels.softmax_cross_entropy(hs[-1], labels)
        grads = []
        for i in reversed(range(len(layers))):
            w, _ = layers[i]
            grads[:0] = [kernels.matmul(hs[i], dy, trans_a=True), kernels.bias_grad(dy)]
            if i:
                dy = kernels.relu_backward(hs[i], kernels.matmul(dy, w, trans_b=True))
        for p, g, (m, v) in zip([p for layer in layers for p in layer], grads, state):
            kernels.adam_step(p, g, m, v, step=1)
        return loss

    return step


def launch_cost(table):
    import cupy

    import kernels
    from kernels.cuda import CapturedStep, launch_stats

    x, out = cupy.ones(1000, np.float32), cupy.empty(1000, np.float32)
    a, c = cupy.ones((64, 64), np.float32), cupy.empty((64, 64), np.float32)
    table.add("host us per relu call (CuPy, 1000)", f"{_host_us_per_call(lambda: kernels.relu(x, out=out)):.1f}")
    table.add("host us per matmul call (CuPy, 64^2)", f"{_host_us_per_call(lambda: kernels.matmul(a, a, out=c)):.1f}")
    before = launch_stats["launches"]
    plain = _training_step(cupy)
    plain()
    launches = launch_stats["launches"] - before
    table.add("MLP step (784-128-64-10, batch 64), plain", f"{_host_us_per_call(plain, 200):.0f} us/step",
              f"{launches} launches per step")
    captured = CapturedStep(_training_step(cupy))
    for _ in range(3):
        loss = captured()
    reference_loss = float(plain())
    table.add("MLP step, CapturedStep", f"{_host_us_per_call(captured, 200):.0f} us/step",
              f"captured={captured.captured} {captured.fallback or ''}; loss {float(loss):.4f} (plain "
              f"{reference_loss:.4f})", ok=captured.captured)


def hidden_sync(table):
    import cupy

    import kernels

    g = 2048
    a = cupy.ones((g, g), np.float32)
    out = cupy.empty((g, g), np.float32)
    small_in, small_out = cupy.ones(1000, np.float32), cupy.empty(1000, np.float32)
    kernels.relu(small_in, out=small_out)
    one = _events_ms(lambda: kernels.matmul(a, a, out=out), 3)
    count = max(1, int(100 / max(one, 1e-3)))
    for _ in range(count):
        kernels.matmul(a, a, out=out)
    t0 = time.perf_counter()
    kernels.relu(small_in, out=small_out)
    host_ms = (time.perf_counter() - t0) * 1e3
    busy = not cupy.cuda.get_current_stream().done
    cupy.cuda.get_current_stream().synchronize()
    table.add("hidden-sync probe", f"{host_ms:.3f} ms host", f"one relu behind {count * one:.0f} ms of queued GEMMs "
              f"(queue still busy after it: {busy})", ok=host_ms < 10 and busy)


def bandwidth(table):
    import io

    from kernels.profile import profile

    rows = profile("cuda", "quick", only=["relu", "sigmoid", "softmax", "mse", "bias_grad", "adam", "sgd"],
                   file=io.StringIO())
    for r in rows:
        table.add(f"{r['kernel']} {r['shape']}", f"{r['gbs']:.0f} GB/s", f"{r['roof']:.0%} of device copy")


def epochs(table):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    for backend in ("cuda", "numba"):
        t0 = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "nn.train", "--backend", backend, "--epochs", "3",
                                 "--patience", "100", "--verbose", "0"], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=600)
        wall = time.perf_counter() - t0
        text = result.stdout
        rate, samples = re.search(r"samples/s: (\d+)", text), re.search(r"(\d+) training", text)
        per_epoch = (f"{int(samples.group(1)) / int(rate.group(1)):.2f} s/epoch" if rate and samples
                     else f"{wall / 3:.2f} s/epoch (wall, with start-up)")
        table.add(f"nn.train --backend {backend}", per_epoch if result.returncode == 0 else "FAILED",
                  f"3 epochs, {wall:.0f} s wall" if result.returncode == 0 else result.stderr[-300:],
                  ok=result.returncode == 0)


def _median_epoch_s(epoch, sync, repeat=3):
    epoch()  # compiles, allocates
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        epoch()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def training(table):
    import cupy

    import kernels
    import nn
    from kernels import _dispatch
    from bench.bench_training import CONFIGS, _data, _label
    from kernels.cuda import launch_stats

    torch = None
    try:
        import torch
    except ImportError:
        pass
    sync = cupy.cuda.get_current_stream().synchronize
    for config in CONFIGS:
        widths, act, batch, (opt, hyper), n = config
        X, y = _data(widths, n)
        with kernels.use_backend("cuda"):
            model = nn.Sequential([nn.Dense(w, activation=act) for w in widths[1:-1]] + [nn.Dense(widths[-1])],
                                  input_dim=widths[0], seed=0)
            trainer = nn.Trainer(model, optimizer=nn.Adam(**hyper) if opt == "adam" else nn.SGD(**hyper))

            def epoch():  # host data in, as fit takes it: copied to the device once per call
                trainer.fit(X, y, epochs=1, batch_size=batch, verbose=0)

            ours = _median_epoch_s(epoch, sync)
            backend, reads, launches = _dispatch.module("cuda"), [], launch_stats["launches"]
            to_host = backend.to_host
            backend.to_host = lambda a: reads.append(a.shape) or to_host(a)
            try:
                epoch()
            finally:
                backend.to_host = to_host
            launches = (launch_stats["launches"] - launches) / (n // batch)
        detail = (f"{n / ours / 1e3:.1f}k samples/s, {ours / (n // batch) * 1e6:.0f} us/step, "
                  f"{launches:.0f} launches/step, {len(reads)} D2H reads/epoch")
        if torch is not None and torch.cuda.is_available():
            torch.manual_seed(0)
            layers = []
            for a, b in zip(widths[:-1], widths[1:]):
                layers += [torch.nn.Linear(a, b), torch.nn.ReLU() if act == "relu" else torch.nn.Tanh()]
            tmodel = torch.nn.Sequential(*layers[:-1]).cuda()
            cls = torch.optim.Adam if opt == "adam" else torch.optim.SGD
            optimizer = cls(tmodel.parameters(), **hyper, fused=True)
            Xt, yt = torch.from_numpy(X).cuda(), torch.from_numpy(y).cuda()

            def torch_epoch():
                order = torch.randperm(n, device="cuda")
                for start in range(0, n, batch):
                    idx = order[start:start + batch]
                    optimizer.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(tmodel(Xt[idx]), yt[idx]).backward()
                    optimizer.step()

            theirs = _median_epoch_s(torch_epoch, torch.cuda.synchronize)
            detail += f"; torch eager {n / theirs / 1e3:.1f}k samples/s, {theirs / (n // batch) * 1e6:.0f} us/step"
            detail += f" ({theirs / ours:.2f}x ours)"
        table.add(f"cuda {_label(config)}", f"{ours * 1e3:.1f} ms/epoch", detail)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true", help="leave out pytest -m cuda")
    parser.add_argument("--only", help="run only these sections, comma-separated (e.g. versions,training)")
    args = parser.parse_args(argv)
    reason = no_gpu_reason()
    if reason:
        print(f"no GPU: {reason}. Nothing to check on this machine; run this script where a GPU is present "
              f"(the cuda kernels are tested here under the simulator: python -m pytest -m cuda).")
        return 0
    sys.path.insert(0, ROOT)
    table = Table()
    sections = [("versions", versions), ("tests", tests), ("GEMM registers", gemm_registers),
                ("GEMM speed", gemm_speed), ("launch cost", launch_cost), ("hidden sync", hidden_sync),
                ("bandwidth", bandwidth), ("epochs", epochs), ("training", training)]
    only = args.only.split(",") if args.only else [name for name, _ in sections]
    for name, fn in sections:
        if name in only and not (args.skip_tests and fn is tests):
            table.section(name, fn)
    table.print()
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
