"""Data-parallel training throughput: 1 rank x 2 threads against 2 ranks x 1 thread (and 1 x 1).

    flock /tmp/kernels-bench.lock python bench/bench_distributed.py     # the table (~10 minutes)
    flock /tmp/kernels-bench.lock python bench/bench_distributed.py --models 784-256-256-10 --repeats 5
    flock /tmp/kernels-bench.lock python bench/bench_distributed.py --models 64-128-10 --batchnorm

For the three benchmark MLPs (Adam, synthetic data, numba backend) it prints samples/s per layout, the
2-rank/1-rank ratio, the time spent in the gradient reduction during training (waiting for the slower
rank included) as a share of the step, the reduction alone (median of back-to-back calls on the same
buffer) and the measured single-rank step time. 2 ranks sum the gradients through shared memory (the
default on one machine); variant "mpi" through MPI's ``Allreduce`` instead, variant "overlap" with MPI's
allreduce overlapped with backward (each layer's gradient slice is reduced with ``Iallreduce`` as soon as
backward has written it, and waited for before the optimizer step). Epoch 1 (compilation, warm-up) is not
timed; a run's figure is the median of its timed epochs ("best epoch": the fastest one, the least
disturbed on a shared machine), and the table gives the median over ``--repeats`` rounds of all layouts,
with each round's 2-rank/1-rank ratio. "optimizer ms" is the optimizer step per training step, work every
rank repeats in full (the paper model below keeps it out of the part divided by N). "CPU % of wall" is
rank 0's process CPU time (all its threads) over its wall time, not divided by the thread count: up to
100% per thread, so 200% for 1x2; below threads x 100% the rank was descheduled (other processes on the
cores) or a thread waited, which is what makes the 2-rank figures swing. The overlap variant is a layout
of every table, not a flag. ``--batchnorm`` puts a BatchNorm after each
hidden layer and adds its allgathers' share of the step and one allgather against one barrier alone.
All layouts run the same global batches (the same samples, steps and epochs). ``pytest
bench/bench_distributed.py`` runs a short smoke version.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

CONFIGS = {"784-256-256-10": (128, 200), "784-1024-1024-10": (256, 40), "64-128-10": (32, 3000)}  # batch, steps
LAYOUTS = [(1, 2, ""), (1, 1, ""), (2, 1, ""), (2, 1, "mpi"), (2, 1, "overlap")]  # ranks, threads per rank, variant


def overlap_model(model, comm):
    """Make each layer's backward start a non-blocking allreduce of its gradient slice as soon as it has
    written it, and ``comm.reduce_gradients`` wait for them (instead of one blocking allreduce). Wraps the
    layers, not the model, so it holds whichever path of Sequential drives the backward pass."""
    from mpi4py import MPI

    requests = []
    for layer in model.layers:
        part = model.slices.get(layer.name)
        if part is None or part.stop == part.start:
            continue

        def backward(dy, need_dx=True, inner=layer.backward, part=part):
            dx = inner(dy, need_dx)
            requests.append(comm.comm.Iallreduce(MPI.IN_PLACE, model.grads[part]))
            MPI.Request.Testall(requests)  # let MPI progress what it can
            return dx

        layer.backward = backward

    def reduce_gradients(buffer):
        if not requests:
            raise RuntimeError("overlap: no gradient slice was reduced in this step")
        MPI.Request.Waitall(requests)
        requests.clear()
        comm.comm.Allreduce(MPI.IN_PLACE, buffer[model.grads.size:])  # the loss slot after them (reduce_step)

    comm.reduce_gradients = reduce_gradients


def worker(widths, batch, steps, epochs, variant, batchnorm=False):
    """Train and report (rank 0, as one JSON line) the timed epochs' median samples/s and allreduce time;
    with ``batchnorm``, a BatchNorm after each hidden layer, and the time in its allgathers."""
    import kernels
    import nn

    kernels.set_backend("numba")
    rng = np.random.default_rng(0)
    n = batch * steps
    X, y = rng.standard_normal((n, widths[0])).astype(np.float32), rng.integers(0, widths[-1], n)
    layers = []
    for width in widths[1:-1]:
        layers += [nn.Dense(width, activation="relu")] + ([nn.BatchNorm()] if batchnorm else [])
    model = nn.Sequential(layers + [nn.Dense(widths[-1])], input_dim=widths[0], seed=0)
    # the per-kernel step on every layout: the compiled epoch (nn._compiled) runs in one process only, and a
    # 1-rank run that took it would compare two different step implementations
    trainer = nn.Trainer(model, optimizer=nn.Adam(lr=1e-3), compiled=False)
    comm = trainer.comm
    if variant:
        comm.shared_memory = False
    reduce = comm.reduce_gradients  # the buffer's reduction (unwrapped), timed alone below
    if variant == "overlap":
        overlap_model(model, comm)
    spent = {"reduce": 0.0, "optimizer": 0.0, "gather": 0.0}

    def timed(fn, key):
        def call(*args):
            t0 = time.perf_counter()
            result = fn(*args)
            spent[key] += time.perf_counter() - t0
            return result
        return call

    comm.reduce_gradients = timed(comm.reduce_gradients, "reduce")
    comm.gather = timed(comm.gather, "gather")
    trainer.optimizer.step = timed(trainer.optimizer.step, "optimizer")
    epoch_times, reduce_times, optimizer_times, gather_times, cpu_times = [], [], [], [], []
    for _ in range(epochs + 1):
        spent.update(reduce=0.0, optimizer=0.0, gather=0.0)
        comm.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.fit(X, y, epochs=1, batch_size=batch, verbose=0)
        epoch_times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        reduce_times.append(spent["reduce"])
        optimizer_times.append(spent["optimizer"])
        gather_times.append(spent["gather"])
    alone = []
    if comm.size > 1:
        buffer = model.grads  # the trained model's buffer: in shared memory unless variant "mpi"/"overlap"
        for _ in range(30):
            comm.barrier()
            t0 = time.perf_counter()
            reduce(buffer)
            alone.append(time.perf_counter() - t0)
    # one BatchNorm allgather ((3, width) float64) and one barrier, back to back: a gather through shared
    # memory would still need the barrier, so their difference bounds what moving it there could save
    gather_alone, barrier_alone = [], []
    if comm.size > 1 and batchnorm:
        sums = np.zeros((3, widths[1]))
        for _ in range(200):
            t0 = time.perf_counter()
            comm.gather(sums)
            t1 = time.perf_counter()
            comm.barrier()
            gather_alone.append(t1 - t0)
            barrier_alone.append(time.perf_counter() - t1)
    if comm.is_root:
        import numba

        epoch = float(np.median(epoch_times[1:]))
        print(json.dumps({"samples_per_s": n / epoch, "best_samples_per_s": n / min(epoch_times[1:]),
                          "step_ms": 1e3 * epoch / steps,
                          "reduce_share": float(np.median(reduce_times[1:])) / epoch,
                          "optimizer_ms": 1e3 * float(np.median(optimizer_times[1:])) / steps,
                          "cpu_share": float(np.sum(cpu_times[1:]) / np.sum(epoch_times[1:])),
                          "allreduce_ms": 1e3 * float(np.median(alone)) if alone else 0.0,
                          "gather_share": float(np.median(gather_times[1:])) / epoch,
                          "gather_ms": 1e3 * float(np.median(gather_alone)) if gather_alone else 0.0,
                          "barrier_ms": 1e3 * float(np.median(barrier_alone)) if barrier_alone else 0.0,
                          "buffer_bytes": int(model.grads.nbytes), "threads": numba.get_num_threads()}))


def run_layout(ranks, threads, variant, config, smoke, batchnorm=False):
    """One layout's JSON line; several ranks get cores / ranks Numba threads by default (checked)."""
    batch, steps = CONFIGS[config]
    epochs = 1 if smoke else 7
    steps = 2 * ranks if smoke else steps
    command = [sys.executable, os.path.abspath(__file__), "--worker", config, str(batch), str(steps), str(epochs)]
    command += ["--variant", variant] if variant else []
    command += ["--batchnorm"] if batchnorm else []
    if ranks > 1:
        command = [shutil.which("mpiexec"), "-n", str(ranks)] + command
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NUMBA_NUM_THREADS", None)
    if ranks == 1:
        env["NUMBA_NUM_THREADS"] = str(threads)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=root)
    if result.returncode:
        raise RuntimeError(f"{ranks} ranks on {config} failed:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if threads <= len(os.sched_getaffinity(0)) // ranks:
        assert report["threads"] == threads, report
    return report


def step_model(step_s, nbytes, ranks, gbit, replicated_s=0.0):
    """Predicted step time at ``ranks`` ranks (one per machine) for a global batch that takes ``step_s`` on
    one, of which ``replicated_s`` (the optimizer step) every rank repeats in full: the rest / N, plus the
    replicated part, plus a ring allreduce's 2 (N - 1) / N x buffer bytes over a ``gbit`` Gbit/s link."""
    ring = 2 * (ranks - 1) / ranks * nbytes / (gbit * 1e9 / 8)
    return (step_s - replicated_s) / ranks + replicated_s + ring


def model_table(measured, ranks=(2, 4, 8, 16), links=(10, 100)):
    """Markdown: predicted step ms and speed-up over one rank, from each model's measured 1x2 step and
    optimizer time."""
    header = ["model", "buffer MB", "1 rank ms", "optimizer ms"] + [f"{n} ranks, {g} Gbit/s" for g in links
                                                                    for n in ranks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for config, r in measured.items():
        step, opt, nbytes = r["step_ms"] / 1e3, r["optimizer_ms"] / 1e3, r["buffer_bytes"]
        cells = [f"{1e3 * t:.2f} ms ({step / t:.1f}x)"
                 for t in (step_model(step, nbytes, n, g, opt) for g in links for n in ranks)]
        lines.append("| " + " | ".join([config, f"{nbytes / 1e6:.2f}", f"{1e3 * step:.2f}", f"{1e3 * opt:.2f}"]
                                       + cells) + " |")
    return "\n".join(lines)


def _median(values):
    return float(np.median(values))


def table(configs=CONFIGS, smoke=False, repeats=1, batchnorm=False):
    """Markdown: every layout of every configuration, each figure the median over ``repeats`` rounds of
    all layouts (run in turn, so each round's layouts see similar load; "vs 1x2" is the median of the
    rounds' ratios); and the 1x2 medians by configuration. With ``batchnorm``, two more columns: the time
    in BatchNorm's allgathers as a share of the step, and one allgather against one barrier alone."""
    rows, single = [], {}
    names = [f"{ranks}x{threads} {variant}".strip() for ranks, threads, variant in LAYOUTS]
    for config in configs:
        rounds = [[run_layout(ranks, threads, variant, config, smoke, batchnorm) for ranks, threads, variant in LAYOUTS]
                  for _ in range(repeats)]
        for i, name in enumerate(names):
            runs = [r[i] for r in rounds]
            med = {key: _median([r[key] for r in runs]) for key in runs[0] if key != "threads"}
            ratio = _median([r[i]["samples_per_s"] / r[0]["samples_per_s"] for r in rounds])
            if i == 0:
                single[config] = med
            row = [config, CONFIGS[config][0], name, f"{med['samples_per_s']:.0f}", f"{med['best_samples_per_s']:.0f}",
                   f"{ratio:.2f}", " ".join(f"{r['samples_per_s'] / r0[0]['samples_per_s']:.2f}"
                                            for r, r0 in zip(runs, rounds)),
                   f"{med['step_ms']:.3f}", f"{med['optimizer_ms']:.3f}", f"{100 * med['reduce_share']:.1f}",
                   f"{med['allreduce_ms']:.3f}", f"{100 * med['cpu_share']:.0f}", int(med["buffer_bytes"])]
            if batchnorm:
                row += [f"{100 * med['gather_share']:.1f}", f"{med['gather_ms']:.4f} / {med['barrier_ms']:.4f}"]
            rows.append(row)
    header = ["model", "batch", "ranks x threads", "samples/s", "best epoch", "vs 1x2", "vs 1x2 by round", "step ms",
              "optimizer ms", "allreduce % of step", "allreduce alone ms", "CPU % of wall (rank 0)", "buffer bytes"]
    header += ["BN allgather % of step", "BN allgather / barrier alone ms"] if batchnorm else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines), single


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec not found (pip install kernels-nn[mpi])")
def test_distributed_bench_smoke():
    """Every layout runs on the smallest configuration (a couple of steps); nothing is timed."""
    text, single = table(["64-128-10"], smoke=True, repeats=2)
    assert text.count("\n") == 1 + len(LAYOUTS)
    text, _ = table(["64-128-10"], smoke=True, batchnorm=True)
    assert text.count("\n") == 1 + len(LAYOUTS) and "BN allgather % of step" in text
    assert model_table(single).count("\n") == 2
    assert step_model(1.0, 0, 4, 10) == 0.25 and step_model(0.0, 1.25e9, 2, 10) == 1.0  # 1.25 GB/s = 10 Gbit/s
    assert step_model(1.0, 0, 4, 10, replicated_s=0.2) == 0.4


def main(argv=None):
    p = argparse.ArgumentParser(prog="python bench/bench_distributed.py", description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=4, metavar=("MODEL", "BATCH", "STEPS", "EPOCHS"), help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["mpi", "overlap"], default="", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3, help="rounds of all layouts; figures are medians (default 3)")
    p.add_argument("--batchnorm", action="store_true",
                   help="a BatchNorm after each hidden layer; adds the time in its allgathers to the table")
    p.add_argument("--models", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="default: all three")
    args = p.parse_args(argv)
    if args.worker:
        model, batch, steps, epochs = args.worker
        worker([int(w) for w in model.split("-")], int(batch), int(steps), int(epochs), args.variant, args.batchnorm)
    else:
        text, single = table(args.models, repeats=args.repeats, batchnorm=args.batchnorm)
        print(text + "\n\nPredicted step time at N ranks, one per machine ((step - optimizer) / N + optimizer + ring "
                     "allreduce):\n")
        print(model_table(single))


if __name__ == "__main__":
    main()
