"""Data-parallel training (nn.distributed): the same run on 1, 2 or 3 ranks gives the same model up to float
rounding, identical bit for bit on every rank; a failing rank ends the job; checkpoints move between rank
counts. The MPI runs launch this file under ``mpiexec`` (``python tests/test_distributed.py JOB OUT``)."""

import errno
import math
import os
import shutil
import subprocess
import sys
import threading
import time

import numba
import numpy as np
import pytest

import kernels
import nn
from nn import distributed
from nn import _device
from nn._device import namespace_of, to_host
from nn.distributed import Communicator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install kernels-nn[mpi])")
EPOCHS, BATCH = 4, 32


# ---- the jobs (run in every rank) ----------------------------------------------------------------------

def dataset():
    """180 training rows (batches of 32 shared 10/11/11 by 3 ranks, the last one of 20 shared 6/7/7) and
    23 validation rows."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((203, 12)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] ** 2 > 1).astype(np.int64) + (X[:, 2] > 0.5)
    return X, y


def make_trainer(kind, distributed_="auto"):
    layers = [nn.Dense(24, activation="relu")]
    if kind == "dropout_batchnorm":
        layers += [nn.BatchNorm(), nn.Dropout(0.3), nn.Dense(16, activation="tanh"), nn.BatchNorm()]
    if kind == "wide":
        layers = [nn.Dense(4096, activation="relu")]  # a 256 KiB gradient buffer
    model = nn.Sequential(layers + [nn.Dense(3)], seed=7)
    return nn.Trainer(model, optimizer=nn.Adam(lr=3e-3), schedule=nn.StepDecay(2, gamma=0.5),
                      distributed=distributed_)


def train(kind, epochs, trainer=None, distributed_="auto"):
    """``epochs`` epochs with validation and early stopping; returns the trainer and its history."""
    X, y = dataset()
    trainer = trainer or make_trainer(kind, distributed_)
    history = trainer.fit(X[:180], y[:180], epochs=epochs, batch_size=BATCH,
                          validation_data=(X[180:], y[180:]), seed=3, verbose=0,
                          callbacks=[nn.EarlyStopping(patience=10)])
    return trainer, history


class Boom(nn.Layer):
    """Identity that raises on rank 1 at its 5th training call (mid-epoch), noting the time in ``path``."""

    def __init__(self, path):
        super().__init__()
        self.path, self.calls = path, 0

    def forward(self, x, training):
        self.calls += training
        if self.comm.rank == 1 and self.calls == 5:
            with open(self.path, "w") as f:
                f.write(repr(time.time()))
            raise RuntimeError("boom on purpose")
        return x

    def backward(self, dy, need_dx=True):
        return dy


class LateReader:
    """A communicator whose Barrier returns late on rank 1 (0-2 ms at random): rank 0 runs ahead into
    the next sums while rank 1 still has to read this one's slots."""

    def __init__(self, comm):
        self.comm, self.rng = comm, np.random.default_rng(comm.Get_rank())

    def __getattr__(self, name):
        return getattr(self.comm, name)

    def Barrier(self):
        self.comm.Barrier()
        if self.comm.Get_rank() == 1:
            time.sleep(self.rng.uniform(0, 2e-3))


def shared_sums(out):
    """Buffers (three sizes and dtypes) summed in shared memory, one rank late out of each barrier: each
    sum must equal the buffers' sum in rank order, and MPI's Allreduce where that is exact."""
    comm = distributed.MPICommunicator()
    assert comm.shared_memory and comm.size > 1
    for n, dtype in [(1, np.float32), (1001, np.float32), (257, np.float64)]:
        summer = distributed._SharedSum(comm.comm, comm.MPI, n, dtype)
        summer.comm = LateReader(comm.comm)
        for call in range(40):
            parts = [np.random.default_rng([call, n, r]).standard_normal(n).astype(dtype) for r in range(comm.size)]
            summer.buffer[...] = parts[comm.rank]
            summer()
            expected = parts[0].copy()
            for part in parts[1:]:
                expected += part
            assert summer.buffer.tobytes() == expected.tobytes(), (n, dtype, call)
            mpi = np.arange(n, dtype=dtype) * (comm.rank + 1)  # integers: every order sums them exactly
            summer.buffer[...] = mpi
            comm.comm.Allreduce(comm.MPI.IN_PLACE, mpi)
            summer()
            assert summer.buffer.tobytes() == mpi.tobytes()
    buffer = np.full(5, comm.rank + 1.0, np.float32)  # not a shared buffer: MPI's Allreduce
    comm.reduce_gradients(buffer)
    np.testing.assert_array_equal(buffer, comm.size * (comm.size + 1) / 2)
    np.save(os.path.join(out, f"rank{comm.rank}.npy"), comm.size)


def refuse(*args):
    raise OSError(errno.ENOSPC, "No space left on device (simulated)")


def reserve_in_rank_order(reserve):
    """``distributed._reserve`` where rank 0 first fills the directory (a small tmpfs in the test) up to
    1.5 buffers' room, then the ranks reserve in turn: rank 1's reservation really fails."""
    def wrapper(directory, nbytes):
        comm, result, error = distributed.get(), None, None
        if comm.rank == 0:
            stat = os.statvfs(directory)
            with open(os.path.join(directory, "filler"), "wb") as f:
                os.posix_fallocate(f.fileno(), 0, stat.f_bavail * stat.f_frsize - 3 * nbytes // 2)
        for rank in range(comm.size):
            comm.barrier()
            if rank == comm.rank:
                try:
                    result = reserve(directory, nbytes)
                except OSError as exc:
                    error = exc
        comm.barrier()
        if error is not None:
            raise error
        return result
    return wrapper


def job(name, out):
    """What every rank runs; writes ``rank<r>.npz`` (weights, layer state, history) into ``out``."""
    kernels.set_backend("numba")
    trainer = None
    if name == "shared_sums":
        return shared_sums(out)
    if name.endswith("_mpi"):  # the gradients through MPI's Allreduce instead of shared memory
        name, distributed.get().shared_memory = name[:-4], False
    if name.endswith(("_fail_reserve", "_fail_attach")):  # setting up shared memory fails on rank 1 alone
        name, stage = name.rsplit("_fail_", 1)
        if distributed.get().rank == 1 and stage == "reserve":
            os.posix_fallocate = refuse  # as a full /dev/shm does
        elif distributed.get().rank == 1:
            distributed._attach = refuse
    if name.endswith("_small_shm"):  # room for 1.5 of the ranks' gradient buffers: rank 0 takes one
        name, distributed._reserve = name.removesuffix("_small_shm"), reserve_in_rank_order(distributed._reserve)
    if name == "boom":
        model = nn.Sequential([nn.Dense(8, activation="relu"), Boom(os.path.join(out, "raised")), nn.Dense(3)],
                              seed=1)
        X, y = dataset()
        nn.Trainer(model).fit(np.tile(X, (50, 1)), np.tile(y, 50), epochs=100, batch_size=4, verbose=0)
    if name.startswith("save_"):  # half the epochs, then a checkpoint
        trainer, _ = train(name[5:], EPOCHS // 2)
        trainer.save(os.path.join(out, "checkpoint.npz"))
        return
    trainer, history = train(name, EPOCHS)
    rank = trainer.comm.rank
    np.savez(os.path.join(out, f"rank{rank}.npz"), params=to_host(trainer.model.params),
             **{f"state/{k}": v for k, v in trainer.model.state().items()},
             **{f"history/{k}": np.array(v) for k, v in history.history.items()}, size=trainer.comm.size,
             threads=numba.get_num_threads(), optimizer_bound=trainer.optimizer.grads is trainer.model.grads,
             shared=id(trainer.comm._with_slot(trainer.model.grads)) in trainer.comm._shared)


def mpirun(ranks, name, out, timeout=600):  # a fresh clone compiles the kernels first (cached after)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, os.path.abspath(__file__), name, str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_ranks(ranks, name, out):
    result = mpirun(ranks, name, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_ranks(ranks, out)


def load_ranks(ranks, out):
    return [dict(np.load(os.path.join(out, f"rank{r}.npz"))) for r in range(ranks)]


def assert_same_bits(results, expected):
    for r, e in zip(results, expected, strict=True):
        assert r.keys() == e.keys()
        for key in e:
            assert r[key].tobytes() == e[key].tobytes(), key


def single(name):
    """The same job in this process, on one rank without MPI."""
    with kernels.use_backend("numba"):
        trainer, history = train(name, EPOCHS, distributed_="off")
    return trainer, history


def relative(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ---- MPI: the same model on any number of ranks --------------------------------------------------------

@needs_mpi
@pytest.mark.slow
@pytest.mark.parametrize("ranks, kind", [(2, "plain"), (3, "plain"), (2, "dropout_batchnorm"),
                                         (3, "dropout_batchnorm"), (2, "plain_mpi"), (3, "dropout_batchnorm_mpi")])
def test_ranks_train_the_one_rank_model(tmp_path, ranks, kind):
    """Gradients summed through shared memory (the default on one machine) or MPI's Allreduce (_mpi)."""
    results = run_ranks(ranks, kind, tmp_path)
    for r in results[1:]:  # every rank holds the same model, bit for bit
        for key in results[0]:
            assert r[key].tobytes() == results[0][key].tobytes(), key
    assert int(results[0]["size"]) == ranks
    assert results[0]["optimizer_bound"] and results[0]["shared"] == (not kind.endswith("_mpi"))
    cores = len(os.sched_getaffinity(0))  # the ranks share this machine's cores unless told otherwise
    threads = os.environ.get("NUMBA_NUM_THREADS") or max(1, min(numba.config.NUMBA_NUM_THREADS, cores // ranks))
    assert int(results[0]["threads"]) == int(threads)
    trainer, history = single(kind.removesuffix("_mpi"))
    assert relative(results[0]["params"], trainer.model.params) < 1e-5
    for key, value in trainer.model.state().items():  # BatchNorm running statistics, Dropout counters
        np.testing.assert_allclose(results[0][f"state/{key}"], value, rtol=1e-5, atol=1e-6)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):  # metrics reduced over ranks
        np.testing.assert_allclose(results[0][f"history/{key}"], history[key], rtol=1e-5)


FALLBACK = "RuntimeWarning: the gradients are summed with MPI Allreduce instead of in shared memory"


@needs_mpi
@pytest.mark.slow
@pytest.mark.parametrize("ranks, stage", [(2, "reserve"), (3, "attach")])
def test_a_rank_without_shared_memory_makes_every_rank_use_allreduce(tmp_path, ranks, stage):
    """Setting up the shared buffers fails on rank 1 alone: no rank waits for it, every rank trains through
    MPI's Allreduce (the same bits as shared_memory=False), and rank 0 warns once, saying why and what to
    change."""
    out, expected = tmp_path / "fail", tmp_path / "mpi"
    out.mkdir(), expected.mkdir()
    result = mpirun(ranks, f"plain_fail_{stage}", out, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count(FALLBACK) == 1, result.stderr[-3000:]
    assert "rank 1: OSError: [Errno 28] No space left on device (simulated)" in result.stderr
    assert "docker run --shm-size" in result.stderr and "MPICommunicator(shared_memory=False)" in result.stderr
    results = load_ranks(ranks, out)
    assert not results[0]["shared"]
    assert_same_bits(results, run_ranks(ranks, "plain_mpi", expected))


def mounts_small_shm():
    """Whether this process may mount a tmpfs over /dev/shm in a private mount namespace (root, Linux)."""
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "-o",
                               "size=1m", "tmpfs", distributed.SHM_DIRECTORY], capture_output=True).returncode == 0
    except OSError:
        return False


@needs_mpi
@pytest.mark.slow
@pytest.mark.skipif(not mounts_small_shm(), reason="needs root and unshare to mount a small /dev/shm")
def test_a_full_dev_shm_falls_back_to_allreduce(tmp_path):
    """A real tmpfs with room for one of the two gradient buffers (in a private mount namespace): rank 1's
    reservation fails, rank 0's succeeds; both ranks train through MPI's Allreduce, and no file is left."""
    out, expected = tmp_path / "small", tmp_path / "mpi"
    out.mkdir(), expected.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = (f"mount -t tmpfs -o size=32m tmpfs {distributed.SHM_DIRECTORY} && "
              f"{MPIEXEC} -n 2 {sys.executable} {os.path.abspath(__file__)} wide_small_shm {out} && "
              f"ls {distributed.SHM_DIRECTORY}")
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count(FALLBACK) == 1, result.stderr[-3000:]
    assert result.stderr.count("No space left on device") == 1 and "rank 1: OSError: [Errno 28]" in result.stderr
    assert "nn-gradients" not in result.stdout and "filler" in result.stdout
    results = load_ranks(2, out)
    assert not results[0]["shared"]
    assert_same_bits(results, run_ranks(2, "wide_mpi", expected))


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_shared_memory_sums_equal_the_rank_order_sum_with_a_late_rank(tmp_path, ranks):
    result = mpirun(ranks, "shared_sums", tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [int(np.load(tmp_path / f"rank{r}.npy")) for r in range(ranks)] == [ranks] * ranks


def test_shared_memory_flag_is_checked():
    pytest.importorskip("mpi4py")
    with pytest.raises(TypeError, match="shared_memory must be True or False, got 'yes'"):
        distributed.MPICommunicator(shared_memory="yes")


def test_nccl_without_cupy_is_a_clear_error():
    """Where nn's cuda arrays are Numba device arrays (no CuPy, or the simulator), NCCL cannot sum them."""
    if _device._cupy() is not None:
        pytest.skip("CuPy runs here")
    with pytest.raises(ImportError, match="sums device arrays with NCCL through CuPy, which cannot run here"):
        distributed.NCCLCommunicator()


@needs_mpi
@pytest.mark.slow
def test_checkpoint_saved_on_two_ranks_resumes_on_one(tmp_path):
    result = mpirun(2, "save_dropout_batchnorm", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with kernels.use_backend("numba"):
        trainer = make_trainer("dropout_batchnorm", "off")
        trainer.restore(tmp_path / "checkpoint.npz")
        assert trainer.epoch == EPOCHS // 2
        _, resumed = train("dropout_batchnorm", EPOCHS - EPOCHS // 2, trainer=trainer)
    straight, history = single("dropout_batchnorm")
    for key in ("loss", "val_loss", "lr"):
        np.testing.assert_allclose(resumed[key], history[key][EPOCHS // 2:], rtol=1e-5)
    assert relative(trainer.model.params, straight.model.params) < 1e-5
    for key, value in straight.model.state().items():
        np.testing.assert_allclose(trainer.model.state()[key], value, rtol=1e-5, atol=1e-6)


@needs_mpi
def test_a_failing_rank_ends_the_job_at_once(tmp_path):
    result = mpirun(2, "boom", tmp_path, timeout=300)  # without the abort, rank 0 would wait forever
    elapsed = time.time() - float((tmp_path / "raised").read_text())
    assert result.returncode != 0
    assert "boom on purpose" in result.stderr and "rank 1" in result.stderr
    assert elapsed < 15, f"the job ended {elapsed:.1f}s after the exception"


@needs_mpi
@pytest.mark.slow
def test_main_job_prints_the_same_test_accuracy_on_two_ranks(tmp_path):
    args = [sys.executable, "-m", "nn.train", "--epochs", "3", "--verbose", "0"]
    one = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    two = subprocess.run([MPIEXEC, "-n", "2"] + args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    assert "; 1 rank" in one.stdout and "; 2 ranks" in two.stdout
    last = [[line for line in r.stdout.splitlines() if line.startswith("test ")] for r in (one, two)]
    assert len(last[0]) == 2 and last[0] == last[1]
    assert two.stdout.count("test accuracy") == 1  # rank 0 prints alone


# ---- in one process: sharing a batch, argument checks, dropout offsets ---------------------------------

def ranks(size, rank):
    comm = Communicator()
    comm.rank, comm.size = rank, size
    return comm


class ThreadRank(Communicator):
    """Rank ``rank`` of ``len(board)`` threads of this process: reductions go through ``board`` (one slot per
    rank) between two barriers, summed in rank order as MPI would; ``reductions`` counts the gradient sums."""

    def __init__(self, rank, board, barrier):
        super().__init__()
        self.rank, self.size, self.board, self.wait = rank, len(board), board, barrier.wait
        self.reductions = 0

    def _everyone(self, value):
        self.board[self.rank] = value
        self.wait()
        values = list(self.board)
        self.wait()
        return values

    def reduce_gradients(self, grads):
        """The rank-order sum, made on the host (device buffers are copied there and back)."""
        self.reductions += 1
        parts = self._everyone(to_host(grads).copy())
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        namespace_of(grads).copyto(grads, total)

    def sum(self, *values):
        return tuple(float(np.sum(v)) for v in zip(*self._everyone(values)))

    def gather(self, array):
        return namespace_of(array).asarray(np.stack(self._everyone(to_host(array).copy())))

    def barrier(self):
        self._everyone(None)

    def allgather(self, value):
        return self._everyone(value)

    def bcast(self, value):
        return self._everyone(value)[0]

    def bcast_array(self, array):
        array[...] = self._everyone(array.copy())[0]


def on_thread_ranks(size, run, backend="numpy"):
    """``run(comm)`` on ``size`` thread ranks on ``backend``: each rank's (result, comm); a rank's exception
    is raised here."""
    board, barrier, results = [None] * size, threading.Barrier(size, timeout=120), [None] * size

    def rank(r):
        comm = ThreadRank(r, board, barrier)
        with kernels.use_backend(backend):
            try:
                results[r] = run(comm), comm
            except BaseException as exc:  # noqa: BLE001 - returned to the test (pytest's failures too)
                barrier.abort()  # the other ranks stop waiting instead of hanging
                results[r] = exc, comm
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failures = [result for result, _ in results if isinstance(result, BaseException)]
    for failure in sorted(failures, key=lambda e: isinstance(e, threading.BrokenBarrierError)):
        raise failure  # the cause first: the other ranks only saw it break the barrier
    return results


# the CUDA simulator computes in NumPy scalars, which warn (in its kernel threads) where a GPU overflows silently
@pytest.mark.filterwarnings("ignore:.*overflow encountered:RuntimeWarning")
def test_a_loss_non_finite_on_one_rank_skips_the_step_on_every_rank(nn_backend):
    """Rank 1's rows overflow the float32 loss, every gradient stays finite: the loss is summed with the
    gradients (one reduction per step, on the device for device arrays), so both ranks skip the step, raise
    the same error and keep the same weights (a decision per rank would apply the step on rank 0 alone)."""
    X = np.array([[1, 0], [0, 1], [1, 1], [0.5, 0.5]], np.float32)
    y = np.array([[0.0], [1.0], [2.0], [2e19]], np.float32)  # rank 1's rows: 2..3; (pred - 2e19)**2 overflows

    def run(comm):
        trainer = nn.Trainer(nn.Sequential([nn.Dense(1)], seed=0), loss="mse", optimizer=nn.SGD(lr=1e-22),
                             distributed=comm)
        with pytest.raises(nn.NonFiniteError, match="epoch 1, step 1: the loss became inf") as error:
            trainer.fit(X, y, epochs=1, batch_size=4, shuffle=False, verbose=0)
        return str(error.value).split(" (")[0], to_host(trainer.model.params).copy(), trainer.optimizer.t

    results = on_thread_ranks(2, run, nn_backend.name)
    for _, comm in results:
        assert comm.reductions == 1
    (error0, params0, t0), (error1, params1, t1) = (result for result, _ in results)
    assert error0 == error1 and t0 == t1 == 0
    assert params0.tobytes() == params1.tobytes()
    np.testing.assert_array_equal(params0, nn.Sequential([nn.Dense(1)], seed=0, input_dim=2).params)


@pytest.mark.parametrize("kind", ["plain", "dropout_batchnorm"])
def test_thread_ranks_train_the_one_rank_model_with_one_reduction_per_step(nn_backend, kind):
    """On every backend (on cuda the loss is weighted and summed with the gradients on the device), with
    validation (each rank evaluates its share)."""
    X, y = dataset()
    rows, epochs = (64, 1) if nn_backend.simulated else (180, 2)

    def run(comm):
        trainer = make_trainer(kind, comm)
        history = trainer.fit(X[:rows], y[:rows], epochs=epochs, batch_size=BATCH, seed=3, verbose=0,
                              validation_data=(X[180:], y[180:]))
        return history, to_host(trainer.model.params).copy()

    results = on_thread_ranks(3, run, nn_backend.name)
    one, = on_thread_ranks(1, run, nn_backend.name)
    for (history, params), comm in results:
        assert comm.reductions == epochs * -(-rows // BATCH)
        assert params.tobytes() == results[0][0][1].tobytes()
        for key in ("loss", "val_loss", "val_accuracy"):
            np.testing.assert_allclose(history[key], one[0][0][key], rtol=1e-5)
        assert relative(params, one[0][1]) < 1e-5


@pytest.mark.parametrize("rank1, message", [
    (dict(rows=150), r"^n differs between ranks \(rank 0: 180, rank 1: 150\)"),
    (dict(batch_size=16), r"^batch_size differs between ranks \(rank 0: 32, rank 1: 16\)"),
    (dict(seed=4), r"^seed differs between ranks \(rank 0: 3, rank 1: 4\)"),
    (dict(shuffle=False, epochs=2), r"^epochs differs between ranks \(rank 0: 1, rank 1: 2\); "
                                    r"shuffle differs between ranks \(rank 0: True, rank 1: False\)"),
    (dict(kind="wide"), r"^parameters differs between ranks \(rank 0: 387, rank 1: 65539\)"),
])
def test_ranks_that_disagree_on_the_run_raise_the_same_error_on_every_rank(rank1, message):
    """Rows, batch size, epochs, shuffling, seed or model differing on one rank would hang the collectives or
    train different models: setup's one allgather makes every rank raise the same error, before any step."""
    X, y = dataset()

    def run(comm):
        args = dict(rows=180, batch_size=BATCH, seed=3, shuffle=True, epochs=1, kind="plain")
        args.update(rank1 if comm.rank == 1 else {})
        trainer = make_trainer(args.pop("kind"), comm)
        rows = args.pop("rows")
        with pytest.raises(ValueError, match=message) as error:  # caught here: no rank aborts the others' wait
            trainer.fit(X[:rows], y[:rows], verbose=0, **args)
        return str(error.value)

    results = on_thread_ranks(2, run)
    for result, comm in results:
        assert comm.reductions == 0
    assert results[0][0] == results[1][0]


def test_a_checkpoint_restored_on_rank_0_gives_every_rank_its_optimizer_state(tmp_path):
    """Rank 0 alone restores a checkpoint: setup broadcasts its optimizer state (moments, step count) with the
    weights, so every rank trains on as the one-rank run restored from it does."""
    X, y = dataset()
    saved = make_trainer("plain", "off")
    saved.fit(X[:180], y[:180], epochs=1, batch_size=BATCH, seed=3, verbose=0)
    saved.save(tmp_path / "ckpt.npz")

    def run(comm):
        trainer = make_trainer("plain", comm)
        trainer.fit(X[:64], y[:64], epochs=1, batch_size=BATCH, seed=5, verbose=0)  # another state on every rank
        if comm.rank == 0:
            trainer.restore(tmp_path / "ckpt.npz")
        trainer.fit(X[:180], y[:180], epochs=1, batch_size=BATCH, seed=3, verbose=0)
        opt = trainer.optimizer
        return trainer.model.params.copy(), opt.t, {k: v.copy() for k, v in opt.state.items()}

    results = on_thread_ranks(2, run)
    (params0, t0, state0), (params1, t1, state1) = (result for result, _ in results)
    assert t0 == t1 == 2 * -(-180 // BATCH)
    assert params0.tobytes() == params1.tobytes()
    assert all(state0[k].tobytes() == state1[k].tobytes() for k in state0)
    resumed = make_trainer("plain", "off").restore(tmp_path / "ckpt.npz")
    resumed.fit(X[:180], y[:180], epochs=1, batch_size=BATCH, seed=3, verbose=0)
    assert relative(params0, resumed.model.params) < 1e-5


@pytest.mark.parametrize("size", [1, 2, 3, 5])
@pytest.mark.parametrize("rows", [slice(0, 32), slice(64, 96), slice(192, 224)])
def test_shares_cover_the_global_batch_once(size, rows):
    n = 203  # the last batch, rows 192..202, has 11 rows
    parts = [ranks(size, r).share(rows, n) for r in range(size)]
    covered = np.concatenate([np.arange(n)[p] for p in parts])
    np.testing.assert_array_equal(covered, np.arange(n)[rows])
    comms = [ranks(size, r) for r in range(size)]
    for comm in comms:
        comm.share(rows, n)
    assert sum(c.weight for c in comms) == pytest.approx(1.0)
    assert [c.offset for c in comms] == [p.start - parts[0].start for p in parts]


def test_more_ranks_than_the_batch_is_a_clear_error():
    model = nn.Sequential([nn.Dense(3)], input_dim=4, seed=0)
    with pytest.raises(ValueError, match=r"3 ranks share each global batch, but batch_size=2 is smaller"):
        ranks(3, 0).setup(model, 100, 2)
    with pytest.raises(ValueError, match=r"the last batch of each epoch has 1 samples \(65 training samples, "
                                         r"batch_size=32\).* or at most 1 ranks"):
        ranks(2, 0).setup(model, 65, 32)
    ranks(2, 0).setup(model, 66, 32)


def test_get_picks_one_process_unless_launched_on_several_ranks(monkeypatch):
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    assert type(distributed.get("auto")) is Communicator
    monkeypatch.setenv("PMI_SIZE", "1")
    assert distributed.launched_ranks() == 1 and type(distributed.get()) is Communicator
    assert type(distributed.get("off")) is Communicator and type(distributed.get(None)) is Communicator
    comm = Communicator()
    assert distributed.get(comm) is comm
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.delenv("PMI_SIZE")
    assert distributed.launched_ranks() == 4
    with pytest.raises(ValueError, match="distributed must be 'auto', 'mpi', 'off'.*got 'nccl'"):
        distributed.get("nccl")


def test_single_process_trainer_is_unchanged_by_the_hooks():
    """distributed='off' and a fresh Communicator train exactly as before (no weighting, no reduction)."""
    with kernels.use_backend("numba"):
        a, _ = train("dropout_batchnorm", 2, distributed_="off")
        b, _ = train("dropout_batchnorm", 2, distributed_=Communicator())
    assert a.model.params.tobytes() == b.model.params.tobytes()


@pytest.mark.parametrize("shape, start", [((7, 5), 3), ((33, 40), 17), ((1, 9), 0), ((4, 1), 3)])
def test_dropout_offset_draws_the_whole_batchs_mask(backend, shape, start):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    whole = backend.get(kernels.dropout(backend.to(x), 0.4, 99))
    part = backend.get(kernels.dropout(backend.to(np.ascontiguousarray(x[start:])), 0.4, 99,
                                       offset=start * shape[1]))
    assert part.tobytes() == whole[start:].tobytes()


def _splitmix_keep(seed, p, first, n):
    """Whether elements first..first+n-1 are kept, from the definition in kernels/reference/dropout.py's
    docstring, in Python integers: SplitMix64 started at mix(seed) draws element j with counter j + 1 (mod
    2**64); the element stays when the output's top 24 bits are >= ceil(p * 2**24)."""
    mask64 = 2**64 - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
        return z ^ (z >> 31)

    start = mix(seed)
    return np.array([mix((start + (first + i + 1) * 0x9E3779B97F4A7C15) & mask64) >> 40 >= math.ceil(p * 2**24)
                     for i in range(n)])


def test_dropout_offset_wraps_modulo_2_to_the_64(backend):
    """Offsets count modulo 2**64: from 2**64 - 100, element 100 draws the mask of element 0."""
    x = np.ones(300, np.float64)
    y = backend.get(kernels.dropout(backend.to(x), 0.5, 5, offset=2**64 - 100))
    np.testing.assert_array_equal(y != 0, _splitmix_keep(5, 0.5, 2**64 - 100, 300))
    start = backend.get(kernels.dropout(backend.to(x[:200]), 0.5, 5))
    np.testing.assert_array_equal(y[100:], start)
    assert 0 < np.count_nonzero(y) < y.size


@pytest.mark.parametrize("offset, error, message", [(-1, ValueError, r"offset must be in \[0, 2\*\*64\), got -1"),
                                                    (2**64, ValueError, "offset must be in"),
                                                    (1.0, TypeError, "offset must be an integer, got float"),
                                                    (True, TypeError, "offset must be an integer, got bool")])
def test_dropout_offset_is_checked(offset, error, message):
    with pytest.raises(error, match=message):
        kernels.dropout(np.ones(3, np.float32), 0.5, 1, offset=offset)


if __name__ == "__main__":
    job(sys.argv[1], sys.argv[2])
