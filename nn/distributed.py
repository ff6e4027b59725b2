"""Data-parallel training: one process per rank, each taking its share of every global batch.

The trainer and the layers talk to a communicator through a few calls, and a run's result does not
depend on the number of ranks beyond float rounding:

- ``setup(model, n, batch_size, optimizer, **settings)`` at the start of ``fit``: every rank checks that
  all run alike (rows, batch size, fit's settings, parameters; one allgather), rank 0's seed, weights,
  layer state and optimizer state go to every rank, and the layers (Dropout, BatchNorm) get the
  communicator; on several ranks the gradient buffer moves to the head of one a slot longer (the model's,
  its layers' and the optimizer's views of it), in shared memory on one machine;
- ``share(rows, n)``: this rank's rows of a global batch (rank r of N takes rows ``r*m//N`` to
  ``(r+1)*m//N`` of its m); it remembers where they start, so Dropout draws the masks of the global
  sample index, and the rank's weight ``m_r / m``;
- ``weigh(dloss)``: scales the loss gradient (a mean over the rank's rows) by that weight, so that after
  backward every rank holds its part of the gradient of the global batch's mean loss;
- ``reduce_step(grads, loss)``: sums the flat gradient buffer over ranks, in place, with the loss in its
  slot, and returns the global batch's mean loss: every rank then sees the same loss and gradient norms,
  and clips or skips a non-finite step as the others do (one reduction, no host read);
- ``reduce_gradients(buffer)``: sums a flat buffer over ranks, in place (in shared memory on one machine,
  else one allreduce);
- ``sum(*values)``: sums host numbers over ranks (loss totals, accuracy counts);
- ``gather(array)``: every rank's copy of a small array, stacked in rank order (BatchNorm's statistics
  and backward sums, which its kernels merge: the same bits on every rank);
- ``shard(n)``, ``is_root``, ``barrier()``: evaluation shares, printing and checkpoint writes on rank 0.

:class:`Communicator` is one process (every reduction is the identity); :class:`MPICommunicator` runs
over mpi4py (host arrays); :class:`NCCLCommunicator` reduces device arrays with NCCL (CuPy).
``fit``, ``evaluate`` and ``save`` are collective: every rank calls them in the same order.
"""

import mmap
import os
import sys
import tempfile
import warnings

import numpy as np

import kernels
from kernels import _checks

from ._device import _cupy, namespace, namespace_of, to_host

# Set by the launchers in every rank's environment: MPICH/Intel MPI (hydra), Open MPI, srun.
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
# Where the shared gradient buffers are reserved (Linux's POSIX shared-memory tmpfs; Docker: 64 MiB by default).
SHM_DIRECTORY = "/dev/shm"


class Communicator:
    """A single process: it holds the whole global batch, and every reduction is the identity."""

    rank, size, local_rank, local_size = 0, 1, 0, 1

    def __init__(self):
        self.rows = 0  # size of the current global batch
        self.offset = 0  # row of this rank's first sample in it
        self.weight = 1.0  # this rank's share of it
        self._slotted = {}  # id(a model's gradient buffer) -> (that buffer, the buffer it heads, a slot longer)

    @property
    def is_root(self):
        """Rank 0 prints and writes checkpoints."""
        return self.rank == 0

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"

    def shard(self, n):
        """This rank's part ``slice(r*n//N, (r+1)*n//N)`` of ``n`` rows."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def share(self, rows, n):
        """This rank's part of the global batch ``rows`` (a slice of ``n`` rows); remembers where it starts
        in the global batch (for Dropout) and its weight in the mean loss (for :meth:`weigh`)."""
        start, stop, _ = rows.indices(n)
        part = self.shard(stop - start)
        self.rows, self.offset = stop - start, part.start
        self.weight = (part.stop - part.start) / self.rows
        return slice(start + part.start, start + part.stop)

    def setup(self, model, n, batch_size, optimizer=None, **settings):
        """Before training on ``n`` rows in global batches of ``batch_size``: check that every rank runs
        alike (:meth:`check_agreement`: ``n``, ``batch_size``, the other ``settings`` such as fit's epochs,
        shuffle and seed, the parameter count, dtype and optimizer), and that every batch gives each rank a
        row; give the model's layers this communicator, broadcast rank 0's state (``optimizer``'s included),
        and place the gradient buffer where the reduction wants it (``optimizer``'s view included)."""
        self.check_agreement(n=n, batch_size=batch_size, **settings, parameters=model.params.size,
                             dtype=model.dtype.name, optimizer=type(optimizer).__name__)
        last = n % batch_size
        if batch_size < self.size:
            raise ValueError(f"{self.size} ranks share each global batch, but batch_size={batch_size} is smaller: "
                             f"use a batch size of at least {self.size}, or at most {batch_size} ranks")
        if 0 < last < self.size:
            raise ValueError(f"{self.size} ranks share each global batch, but the last batch of each epoch has "
                             f"{last} samples ({n} training samples, batch_size={batch_size}): use a batch size "
                             f"that leaves 0 or at least {self.size} samples for the last batch, or at most "
                             f"{last} ranks")
        for layer in model.layers:
            layer.comm = self
        self.broadcast_model(model, optimizer)
        self.place_gradients(model, optimizer)

    def check_agreement(self, **values):
        """Raise the same ValueError on every rank, naming each setting and every rank's value, unless all
        ranks give the same ``values`` (one allgather): different step counts would hang the collectives,
        different settings would train different models silently."""
        every = self.allgather(values)
        differ = [name for name in values if any(other[name] != every[0][name] for other in every[1:])]
        if differ:
            raise ValueError("; ".join(f"{name} differs between ranks (" + ", ".join(
                f"rank {rank}: {other[name]!r}" for rank, other in enumerate(every)) + ")" for name in differ)
                + "; every rank must call fit with the same data length, arguments and model")

    def broadcast_model(self, model, optimizer=None):
        """Give every rank rank 0's seed (which draws Dropout's masks), weights and layer state, and the
        state of ``optimizer`` when it is bound to the model (buffers, step count, hyperparameters: a
        checkpoint restored on rank 0 alone must not leave the ranks' moments apart)."""
        if self.size == 1:
            return
        seed = self.bcast(model.seed)
        if seed != model.seed:
            model.seed = seed
            model.reset_parameters()
        params = to_host(model.params).copy()
        self.bcast_array(params)
        model.set_weights(params, self.bcast(model.state()))
        if optimizer is None or optimizer.params is not model.params:
            return
        sd = optimizer.state_dict()
        sd.update(self.bcast({key: sd[key] for key in ("class", "hyper", "base_lr", "t")}))
        names = self.bcast(sorted(sd["buffers"]))
        sd["buffers"] = {name: sd["buffers"].get(name, np.empty(params.shape, params.dtype)) for name in names}
        for name in names:
            self.bcast_array(sd["buffers"][name])
        if not self.is_root:
            optimizer.load_state_dict(sd)

    def allgather(self, value):
        """Every rank's ``value`` (a picklable object), in rank order."""
        return [value]

    def bcast(self, value):
        """Rank 0's ``value`` (a picklable object)."""
        return value

    def bcast_array(self, array):
        """Rank 0's contiguous host ``array``, in place."""

    def place_gradients(self, model, optimizer):
        """On several ranks, move the model's flat gradient buffer to the head of one a slot longer, where
        :meth:`reduce_step` sums the loss with the gradients."""
        if self.size > 1 and self._with_slot(model.grads) is None:
            self._adopt(model, optimizer, namespace_of(model.grads).empty(model.grads.size + 1, model.grads.dtype))

    def _with_slot(self, grads):
        """The buffer that ``grads`` heads (one element longer: the loss slot), or None."""
        entry = self._slotted.get(id(grads))
        return entry[1] if entry is not None and entry[0] is grads else None

    def _adopt(self, model, optimizer, full):
        """Move the model's gradients to the head of ``full`` (its layers' and ``optimizer``'s views too)."""
        old, new = model.grads, full[:-1]
        namespace_of(new).copyto(new, old)
        for layer in model.layers:
            for name, view in layer.grads.items():
                start = (_address(view) - _address(old)) // old.itemsize
                layer.grads[name] = new[start:start + view.size].reshape(view.shape)
        model.grads = new
        if optimizer is not None and optimizer.grads is old:
            optimizer.grads = new
        self._slotted[id(new)] = (new, full)

    def reduce_step(self, grads, loss):
        """Sum the model's flat gradient buffer ``grads`` over ranks, in place, and return the global batch's
        mean loss: this rank's loss, weighted by its share, is summed in the slot after the gradients (the same
        reduction), so every rank checks the same loss and norms and skips a non-finite step with the others
        (a decision per rank would let the ranks' weights part and their collectives hang)."""
        if self.size == 1:
            return loss
        full = self._with_slot(grads)
        namespace_of(full).multiply(loss, self.weight, out=full[-1:])
        self.reduce_gradients(full)
        return full[-1:] if kernels.is_device_array(full) else full[-1]  # a Numba array's full[-1] is a host read

    def weigh(self, dloss):
        """The loss gradient of the rank's rows weighted for the global batch (in place)."""
        if self.weight != 1.0:
            dloss *= dloss.dtype.type(self.weight)
        return dloss

    def reduce_gradients(self, grads):
        """Sum the flat buffer ``grads`` over ranks, in place."""

    def sum(self, *values):
        """Each of ``values`` (host numbers) summed over ranks, as floats."""
        return tuple(float(v) for v in values)

    def gather(self, array):
        """``array`` of every rank, stacked in rank order: shape ``(size,) + array.shape``. The result
        may be reused by the next call for the same shape."""
        return array.reshape((1,) + tuple(array.shape))

    def barrier(self):
        """Wait until every rank is here."""


class MPICommunicator(Communicator):
    """Data parallelism over MPI (mpi4py) on host arrays.

    ``comm``: an mpi4py communicator (default ``COMM_WORLD``). Creating one also makes an uncaught
    exception on any rank abort the whole job (so the other ranks never wait forever in a collective),
    and, unless ``NUMBA_NUM_THREADS`` is set, gives each rank cores / ranks-on-this-machine Numba threads.
    ``shared_memory``: when every rank runs on this machine, the gradient buffer lives in shared memory
    and is summed there (:class:`_SharedSum`) instead of by ``Allreduce``. A custom layer must then read
    its gradient views from ``layer.grads`` at each backward, not keep them from ``build``.
    """

    def __init__(self, comm=None, shared_memory=True):
        super().__init__()
        if not isinstance(shared_memory, (bool, np.bool_)):
            raise TypeError(f"shared_memory must be True or False, got {shared_memory!r}")
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError("data-parallel training needs mpi4py and an MPI library "
                              "(pip install kernels-nn[mpi]); or run without mpiexec") from exc
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self._gathered, self._shared = {}, {}
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.shared_memory = bool(shared_memory) and 1 < self.size == self.local_size
        if self.size > 1:
            _abort_on_uncaught_exception(self.comm, self.rank)
        if "NUMBA_NUM_THREADS" not in os.environ:
            import numba

            numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS,
                                             len(os.sched_getaffinity(0)) // self.local_size)))

    def allgather(self, value):
        return self.comm.allgather(value)

    def bcast(self, value):
        return self.comm.bcast(value)

    def bcast_array(self, array):
        self.comm.Bcast(array)

    def place_gradients(self, model, optimizer):
        """In shared memory when every rank runs on this machine (host arrays), else as any communicator."""
        old = model.grads
        if not self.shared_memory or kernels.is_device_array(old) or self._with_slot(old) is not None:
            return super().place_gradients(model, optimizer)
        try:
            summer = _SharedSum(self.comm, self.MPI, old.size + 1, old.dtype)  # + the loss slot
        except _NoSharedMemory as exc:  # raised on every rank at once: all of them keep Allreduce
            self.shared_memory = False
            if self.is_root:
                warnings.warn(_fallback_message(exc, self.size, old.nbytes), RuntimeWarning, stacklevel=2)
            return super().place_gradients(model, optimizer)
        self._shared[id(summer.buffer)] = summer  # kept for the process's life: the model's buffer is its memory
        self._adopt(model, optimizer, summer.buffer)

    def reduce_gradients(self, grads):
        summer = self._shared.get(id(grads))
        if summer is not None and summer.buffer is grads:
            return summer()
        self._allreduce(grads)

    def sum(self, *values):
        total = np.array([float(v) for v in values])
        self.comm.Allreduce(self.MPI.IN_PLACE, total)
        return tuple(total.tolist())

    def gather(self, array):
        """One allgather into a buffer kept per (shape, dtype, array kind)."""
        key = (tuple(array.shape), array.dtype, kernels.is_device_array(array))
        out = self._gathered.get(key)
        if out is None:
            out = self._gathered[key] = namespace_of(array).empty((self.size,) + key[0], array.dtype)
        self._allgather(array, out)
        return out

    def barrier(self):
        self.comm.Barrier()

    def _allreduce(self, buffer):
        """Sum a contiguous host buffer over ranks, in place."""
        self.comm.Allreduce(self.MPI.IN_PLACE, buffer)

    def _allgather(self, array, out):
        """Every rank's contiguous host ``array``, in rank order, into ``out``."""
        self.comm.Allgather(array, out)


class _NoSharedMemory(RuntimeError):
    """The shared gradient buffers could not be set up; raised on every rank at once."""


def _on_every_rank(comm, step):
    """Every rank's ``step()`` result, in rank order. If it raised OSError/ValueError/MemoryError on any
    rank, every rank raises :class:`_NoSharedMemory` naming each failure: no rank is left waiting in a
    collective the others have given up on."""
    try:
        result, error = step(), None
    except (OSError, ValueError, MemoryError) as exc:
        result, error = None, f"{type(exc).__name__}: {exc}"
    gathered = comm.allgather((result, error))
    errors = [f"rank {rank}: {error}" for rank, (_, error) in enumerate(gathered) if error is not None]
    if errors:
        raise _NoSharedMemory("; ".join(errors))
    return [result for result, _ in gathered]


def _reserve(directory, nbytes):
    """A new file of ``nbytes`` in ``directory`` with its pages allocated now (so a full tmpfs raises
    ENOSPC here instead of a SIGBUS at the first touch), mapped: ``(path, map)``."""
    fd, path = tempfile.mkstemp(prefix="nn-gradients-", dir=directory)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return path, mmap.mmap(fd, nbytes)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def _attach(path, nbytes):
    """Another rank's reserved file ``path``, mapped."""
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def _fallback_message(exc, ranks, nbytes):
    """The warning when the gradient buffers do not fit in shared memory: why, and what to change."""
    directory = SHM_DIRECTORY
    try:
        stat = os.statvfs(directory)
        free = f"{stat.f_bavail * stat.f_frsize / 2**20:.1f} MiB free there"
    except OSError as error:
        free = str(error)
    return (f"the gradients are summed with MPI Allreduce instead of in shared memory: {ranks} x "
            f"{nbytes / 2**20:.1f} MiB could not be reserved in {directory} ({free}; {exc}). Enlarge {directory} "
            f"(Docker: docker run --shm-size=1g), or pass MPICommunicator(shared_memory=False) to use Allreduce "
            f"without this warning")


class _SharedSum:
    """A flat host ``buffer`` of ``n`` elements per rank in shared memory of the ranks of one machine,
    summed over ranks in place by a call: one barrier (every rank's buffer written), rank r adds every
    rank's part r in rank order and writes the sum into every rank's buffer (the same operands in the same
    order: the same bits on every rank), a second barrier (every part written everywhere). Each rank reads
    and writes 2 x n / ranks elements of the others' buffers; MPI's Allreduce copies more.

    Each rank reserves its buffer as a file in :data:`SHM_DIRECTORY` (pages allocated up front), then
    maps every rank's; the files are unlinked once all are mapped. Each stage ends in an allgather, so if
    any rank fails (a full ``/dev/shm``), every rank raises :class:`_NoSharedMemory` and nothing is left
    behind. A zero-byte MPI shared window gives ``MPI_Win_sync``, the memory barrier around each barrier."""

    def __init__(self, comm, MPI, n, dtype):
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        dtype = np.dtype(dtype)
        nbytes = max(n * dtype.itemsize, 1)  # mmap cannot map 0 bytes
        own = {}

        def reserve():
            own["path"], own["map"] = _reserve(SHM_DIRECTORY, nbytes)
            return own["path"]

        def attach():
            maps[:] = [own["map"] if r == self.rank else _attach(path, nbytes) for r, path in enumerate(paths)]

        maps = []
        try:
            paths = _on_every_rank(comm, reserve)
            _on_every_rank(comm, attach)
        finally:  # every rank has mapped it, or given up
            if "path" in own:
                os.unlink(own["path"])
        self.win = MPI.Win.Allocate_shared(0, 1, comm=comm)
        self.win.Lock_all(MPI.MODE_NOCHECK)  # one passive epoch for the window's life: Sync orders memory
        self.buffers = [np.ndarray(n, dtype, buffer=m) for m in maps]
        self.buffer = self.buffers[self.rank]
        part = slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)
        self.parts = [b[part] for b in self.buffers]  # part r of every rank's buffer
        self.sum = self.parts[self.rank] if self.size == 2 else np.empty(part.stop - part.start, dtype)

    def barrier(self):
        self.win.Sync()
        self.comm.Barrier()
        self.win.Sync()

    def __call__(self):
        parts = self.parts
        self.barrier()
        np.add(parts[0], parts[1], out=self.sum)  # with 2 ranks, into this rank's own part
        for part in parts[2:]:
            np.add(self.sum, part, out=self.sum)
        for part in parts:
            if part is not self.sum:
                np.copyto(part, self.sum)
        self.barrier()


class NCCLCommunicator(MPICommunicator):
    """MPI for control and host numbers, NCCL (``cupy.cuda.nccl``) for device buffers, on CuPy's current
    stream (the one the cuda kernels use). Each rank uses GPU ``local_rank % GPUs on this machine``; create
    the communicator before the model, so the model's arrays land on that GPU. Written against CuPy's
    documented NCCL API; not yet run on GPUs."""

    def __init__(self, comm=None):
        cupy = _cupy()
        if cupy is None:  # nn's cuda arrays are then Numba device arrays, which this NCCL path cannot reduce
            raise ImportError("data-parallel training on the cuda backend sums device arrays with NCCL through "
                              "CuPy, which cannot run here (install cupy-cuda12x or cupy-cuda13x; not under the "
                              "CUDA simulator); or train on the numba backend")
        super().__init__(comm)
        from cupy.cuda import nccl

        cupy.cuda.Device(self.local_rank % cupy.cuda.runtime.getDeviceCount()).use()
        self.nccl = nccl
        self.nccl_comm = nccl.NcclCommunicator(
            self.size, self.comm.bcast(nccl.get_unique_id() if self.is_root else None), self.rank)

    def _allreduce(self, buffer):
        if not kernels.is_device_array(buffer):
            return super()._allreduce(buffer)
        ptr = buffer.data.ptr
        self.nccl_comm.allReduce(ptr, ptr, buffer.size, self._type(buffer), self.nccl.NCCL_SUM, self._stream())

    def _allgather(self, array, out):
        if not kernels.is_device_array(array):
            return super()._allgather(array, out)
        self.nccl_comm.allGather(array.data.ptr, out.data.ptr, array.size, self._type(array), self._stream())

    def _type(self, array):
        return {np.dtype(np.float32): self.nccl.NCCL_FLOAT32, np.dtype(np.float64): self.nccl.NCCL_FLOAT64}[array.dtype]

    @staticmethod
    def _stream():
        return namespace("cuda").cuda.get_current_stream().ptr


def _address(array):
    """Where ``array``'s first element is, in host or device memory (the CUDA simulator's too)."""
    return _checks._layout(array)[0]


def _abort_on_uncaught_exception(comm, rank):
    """An uncaught exception prints its traceback (naming the rank) and aborts every rank, at once."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        # the one-line summary first: the launcher may drop the tail of the output once Abort kills the job
        sys.stderr.write(f"rank {rank}: uncaught {kind.__name__}: {value}; aborting all ranks\n")
        sys.stderr.flush()
        previous(kind, value, tb)
        sys.stderr.flush()
        comm.Abort(1)

    sys.excepthook = hook


def launched_ranks():
    """The number of ranks the launcher (mpiexec, srun) started, from its environment; 1 without one."""
    for name in _SIZE_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


_WORLD = None


def get(distributed="auto"):
    """The communicator for ``distributed``: ``"auto"`` (MPI when launched on several ranks, else one
    process), ``"mpi"`` (MPI even on one rank), ``"off"``/``None``/``False`` (one process), or a
    :class:`Communicator`. On the cuda backend the MPI communicator reduces device arrays with NCCL.
    The MPI communicator over ``COMM_WORLD`` is created once per process."""
    global _WORLD
    if isinstance(distributed, Communicator):
        return distributed
    if distributed in (None, False, "off") or (distributed == "auto" and launched_ranks() == 1):
        return Communicator()
    if distributed not in ("auto", "mpi"):
        raise ValueError(f"distributed must be 'auto', 'mpi', 'off', None or a Communicator, got {distributed!r}")
    if _WORLD is None:
        _WORLD = NCCLCommunicator() if kernels.get_backend() == "cuda" else MPICommunicator()
    return _WORLD
