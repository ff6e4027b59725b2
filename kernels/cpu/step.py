"""A run of training steps of a small Sequential model in ONE compiled call (the numba backend).

For each mini-batch: gather the shuffled rows, forward through Dense / activation / dropout layers,
the loss (softmax cross-entropy, MSE, binary cross-entropy on logits, hinge), the correct count, backward
into the flat gradient buffer, per-layer gradient norms, the step's bookkeeping (``check_step``: metrics
buffer, clipping scale), one SGD / Adam / AdamW / RMSProp / Adagrad / Adadelta update: the same kernel
calls, with the same arguments, as the per-kernel step (``nn.layers``, ``nn.trainer``), made from
compiled code instead of Python.

The kernels are called through their addresses (:func:`kernel_table`): the very machine code the
per-kernel step runs, so the results are bitwise the same at every size, multithreaded kernels and
their chunked reductions included; where the per-kernel step runs a kernel's serial twin below its
parallel threshold (``_parallel.scheduled``), so does the driver (twin and kernel can differ in the last
bit: ``_jit.serial``). Calling them as ordinary jitted functions would link cached
parallel functions into a cached one (numba issue 8578) and re-optimise every kernel inside the
driver, where their fast-math flags leave LLVM free to round differently. The addresses are arguments,
not constants, so the driver compiles once per dtype and is cached on disk.

At a batch of one or two every layer's gradient norm comes from its factors (``dense_grad_norm``, as in the
per-kernel step), so the step is checked before the first layer's backward pass; when its clipping scale is
1, the first layer's gradient, update and the next step's forward product are one pass over W, piece by
piece (:func:`_product_update`); with two threads a worker on a pooled thread
(:func:`run`, :func:`worker`) takes half of the pieces each step, the same bits either way. On exactly two
threads the same worker shares the multithreaded products and optimizer updates (:func:`_shared_product`,
:func:`_shared_update`), chunk by chunk.

The model arrives as tables (one row per layer) and offsets into one scratch buffer. The driver stops
before the update of a step whose loss or gradient norms are not finite and returns that step's number;
the caller decides what follows.
"""

import ctypes
import os
import platform
from concurrent.futures import ThreadPoolExecutor, wait

import numba
import numpy as np
from llvmlite import binding, ir
from numba import carray, types
from numba.core import cgutils
from numba.extending import intrinsic, overload, register_jitable

from . import activations, fused, losses, optim
from ._gemm import (PARALLEL_MIN_FLOPS, SIGMOID as GEMM_SIGMOID, TANH as GEMM_TANH, _call_transcendental, _splat,
                    _take, body, chunk_shape, gemm, gemm_parallel, take_chunks)
from ._small import (BODY, DOTS_BODY, GEMM, MIN_FLOPS, PARALLEL, ROW_VECTORS, ROWS, ROWS_MAX_K, ROWS_MAX_M, THREADS,
                     _resume_one, _resume_wide, _voidptr, dispatcher, dots, route, rows, tiles)
from ._jit import jit
from ._math import _fma
from .dropout import _dropout as _dropout_body, _dropout_chunks, _mix
from .fused import NORMS_PARALLEL_MIN
from .metrics import _check_step, _count_labels, _count_thresholds
from . import _parallel
from ._parallel import PARALLEL_MIN, num_threads
from ..reference.metrics import BAD_STEP

# layer kinds, and the activation codes (those of _gemm.ACTIVATION_CODES, plus softmax)
DENSE, ACTIVATION, DROPOUT = range(3)
NONE, RELU, LEAKY_RELU, SIGMOID, TANH, SOFTMAX = range(6)
# columns of the integer layer table: kind, activation, input and output width, offsets of W and b in the
# flat parameters (and gradients), offsets in the scratch buffer of the input, the output, the incoming
# gradient dy, dz (a Dense layer's dy * activation'), the outgoing gradient dx (-1: not computed)
KIND, ACT, IN_W, OUT_W, W_AT, B_AT, X_AT, Y_AT, DY_AT, DZ_AT, DX_AT = range(11)
# optimizers; each row of the per-step table holds what the kernel's wrapper computes in float64 before
# the cast to the parameters' dtype: SGD (lr, momentum, 1 - dampening, weight_decay, nesterov, step == 1),
# Adam (1 - lr * weight_decay, weight_decay, 1 - beta1, beta2, 1 - beta2, lr / (1 - beta1**t),
# sqrt(1 - beta2**t), eps), RMSProp (lr, alpha, 1 - alpha, eps, weight_decay, momentum), Adagrad (lr, eps,
# weight_decay), Adadelta (lr, rho, 1 - rho, eps, weight_decay)
SGD, SGD_MOMENTUM, ADAM, ADAMW, RMSPROP, RMSPROP_MOMENTUM, ADAGRAD, ADADELTA = range(8)
# losses: softmax cross-entropy on integer labels, the pointwise ones on float targets shaped like the output
CROSS_ENTROPY, MSE, BINARY_CROSS_ENTROPY, HINGE = range(4)

# slots of the kernel table: the elementwise activations (forward, backward) by code, then the rest
_ELEMENTWISE = ("relu", "relu_backward", "leaky_relu", "leaky_relu_backward", "sigmoid", "sigmoid_backward", "tanh",
                "tanh_backward")
_BIAS_ACT = ("relu", "leaky_relu", "sigmoid", "tanh")
BIAS_ACT_K = len(_ELEMENTWISE)  # + activation code - 1
_REST = BIAS_ACT_K + len(_BIAS_ACT)
# dropout: its body, then its chunked driver; rows, dots, tiles: the small-M routes of the GEMM (_small);
# dense_grad_norm; then the serial twins of bias_grad and segment_norms,
# and of the fused activation backward kernels (+ activation code - 1)
(SOFTMAX_K, SOFTMAX_BACKWARD_K, BIAS_GRAD_K, GEMM_CC, GEMM_TC, GEMM_CT, GEMM_PARALLEL_K, NORMS_K, CHECK_K, DROPOUT_K,
 _, ROWS_K, DOTS_K, TILES_K, DENSE_NORM_K, BIAS_GRAD_SERIAL_K, NORMS_SERIAL_K) = range(_REST, _REST + 17)
BIAS_ACT_SERIAL_K = _REST + 17
# each optimizer kernel's four (body and chunked driver unscaled, then with a gradient scale), by optimizer_group
OPTIMIZER_K = BIAS_ACT_SERIAL_K + len(_BIAS_ACT)
# each loss kernel by loss code, then the correct counts of class labels and of thresholds, the serial twin of
# the cross-entropy kernel
LOSS_K = OPTIMIZER_K + 4 * 7
COUNT_K, THRESHOLDS_K, CROSS_ENTROPY_SERIAL_K = LOSS_K + 4, LOSS_K + 5, LOSS_K + 6
# SGD's update with the first layer's gradient computed as it is read (optim._sgd_outer), without and with a velocity
SGD_OUTER_K = LOSS_K + 7
SLOTS = SGD_OUTER_K + 2


@register_jitable
def optimizer_group(optimizer):
    """The optimizer's kernels in the table (AdamW runs Adam's kernels)."""
    return optimizer if optimizer < ADAMW else optimizer - 1


@intrinsic
def _call(typingctx, address, args, like):
    """Call the Numba-compiled function at ``address`` (its native entry, compiled for the types of the
    tuple ``args``) with ``args``; it returns a value of ``like``'s type, or nothing when ``like`` is None.
    An exception it raises propagates."""
    restype = types.none if isinstance(like, types.NoneType) else like

    def codegen(context, builder, signature, llargs):
        argtypes = list(args.types)
        values = [builder.extract_value(llargs[1], i) for i in range(len(argtypes))]
        fnty = context.call_conv.get_function_type(restype, argtypes)
        status, result = context.call_conv.call_function(builder, builder.inttoptr(llargs[0], fnty.as_pointer()),
                                                         restype, argtypes, values)
        with cgutils.if_unlikely(builder, status.is_error):
            context.call_conv.return_status_propagate(builder, status)
        return context.get_dummy_value() if restype == types.none else result

    return restype(address, args, like), codegen


def _star(argtypes):
    """The type a ``*args`` parameter gets for these arguments (the chunked drivers of ``_parallel.run``)."""
    return types.StarArgTuple.from_types(argtypes)


def _entries(dtype):
    """Every slot of the kernel table for arrays of ``dtype``, in order: (the groups that need it, the
    kernel, the argument types the per-kernel step passes it)."""
    f = numba.from_dtype(dtype)
    v, m, mt = types.Array(f, 1, "C"), types.Array(f, 2, "C"), types.Array(f, 2, "F")  # mt: a transpose
    i64, u64, flag, none = types.int64, types.uint64, types.boolean, types.none
    f1, labels = types.Array(types.float64, 1, "C"), types.Array(i64, 1, "C")
    drop = (v, v, u64, u64, f, f)
    gemm_args = (v, i64, types.float64, m, i64, i64, i64, i64)
    core = [(getattr(activations, f"_{name}_kernel"), (v, v, f, v)) for name in _ELEMENTWISE]
    core += [(fused._BIAS_ACT_BACKWARD[name], (m, m, f, m, v)) for name in _BIAS_ACT]
    core += [(activations.softmax, (m, m)), (activations.softmax_backward, (m, m, m)), (losses.bias_grad, (m, v)),
             (gemm, (m, m) + gemm_args), (gemm, (mt, m) + gemm_args), (gemm, (m, mt) + gemm_args),
             (gemm_parallel, (i64,) * 7 + (v, i64, types.float64, m) + (i64,) * 6 + (flag,)),
             (fused.segment_norms, (v, labels, f1)),
             (_check_step, (types.float64, types.float64, f1, types.float64, f1, v)),
             (_dropout_body, (u64, u64) + drop), (_dropout_chunks, (i64, _star(drop))),
             (rows, (i64,) * 7 + (v, i64, types.float64, m)), (dots, (i64,) * 5 + (v, i64, types.float64, m, i64)),
             (tiles, (i64,) * 6 + (v, i64, types.float64, m, i64, i64, i64)), (fused.dense_grad_norm, (m, m, v, f1)),
             (losses.bias_grad_serial, (m, v)), (fused.segment_norms_serial, (v, labels, f1))]
    core += [(fused._BIAS_ACT_BACKWARD_SERIAL[name], (m, m, f, m, v)) for name in _BIAS_ACT]
    entries = [(("core",), kernel, signature) for kernel, signature in core]
    sgd, adam = (f, f, f, flag, f, flag), (f,) * 8 + (flag,)
    for group, (name, state, hyper) in enumerate((("sgd", (none,), sgd), ("sgd", (v,), sgd), ("adam", (v, v), adam),
                                                  ("rmsprop", (v, none), (f,) * 6), ("rmsprop", (v, v), (f,) * 6),
                                                  ("adagrad", (v,), (f,) * 3), ("adadelta", (v, v), (f,) * 5))):
        body, chunks = getattr(optim, f"_{name}"), getattr(optim, f"_{name}_chunks")
        for gscale in (none, f):  # unscaled, scaled
            args = (v, v) + state + hyper + (gscale,)
            entries += [((("optimizer", group),), body, (u64, u64) + args), ((("optimizer", group),), chunks,
                                                                             (i64, _star(args)))]
    pointwise = (v, v, f, v)
    entries += [((("loss", CROSS_ENTROPY),), losses._cross_entropy, (m, labels, m)),
                ((("loss", MSE),), losses._mse_kernel, pointwise),
                ((("loss", BINARY_CROSS_ENTROPY),), losses._binary_cross_entropy_kernel, pointwise),
                ((("loss", HINGE),), losses._hinge_kernel, pointwise),
                ((("loss", CROSS_ENTROPY),), _count_labels, (m, labels, f1)),
                ((("loss", BINARY_CROSS_ENTROPY), ("loss", HINGE)), _count_thresholds, (m, m, f, f1)),
                ((("loss", CROSS_ENTROPY),), losses._cross_entropy_serial, (m, labels, m))]
    entries += [((("optimizer", group),), optim._sgd_outer, (u64, u64, v, m, m, state) + sgd)
                for group, state in ((SGD, none), (SGD_MOMENTUM, v))]
    return entries


_tables = {}


def kernel_table(dtype, optimizer=SGD, loss=CROSS_ENTROPY):
    """The addresses of the kernels the driver calls for arrays of ``dtype`` with this optimizer and loss,
    each compiled (or loaded from the cache) for the argument types the per-kernel step passes it. Only
    the kernels of the optimizer and loss asked for are compiled (the other slots hold 0 until asked)."""
    dtype = np.dtype(dtype)
    table, done = _tables.setdefault(dtype, (np.zeros(SLOTS, np.int64), set()))
    wanted = {"core", ("optimizer", optimizer_group(optimizer)), ("loss", loss)} - done
    if not wanted:
        return table
    for slot, (groups, kernel, signature) in enumerate(_entries(dtype)):
        if wanted.intersection(groups):
            kernel.compile(signature)
            result = kernel.overloads[tuple(signature)]
            table[slot] = result.library.get_pointer_to_function(result.fndesc.llvm_func_name)
    done |= wanted
    return table


_ready = set()  # the argument kinds (:func:`kinds`) of the signatures known to be ready


def kinds(args):
    """What Numba's type of each argument depends on, read in ~1 us an array (``typeof`` takes ~10)."""
    return tuple((a.dtype, a.ndim, a.flags.c_contiguous, a.flags.f_contiguous, a.flags.writeable, a.flags.aligned)
                 if isinstance(a, np.ndarray) else (type(a), isinstance(a, int) and a >= 2**63) for a in args)


def _loaded(dispatcher, args):
    """Whether ``dispatcher(*args)`` runs without compiling (see :func:`ready`), loading it from the cache if there."""
    key = (dispatcher.py_func.__name__, kinds(args))
    if key in _ready:
        return True
    sig = tuple(dispatcher.typeof_pyval(a) for a in args)
    if sig not in dispatcher.overloads:
        cres = dispatcher._cache.load_overload(sig, dispatcher.targetctx)
        if cres is None:
            return False
        dispatcher.targetctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])  # as compile() does
        dispatcher.add_overload(cres)
    _ready.add(key)
    return True


def ready(*args):
    """Whether :func:`run` ``(*args)`` runs without compiling: the machine code of ``train_steps`` (and of its
    worker, when ``job`` is not empty) for these argument types is in this process, or in Numba's on-disk
    cache (then loaded, as a call would). A cold compile of the driver costs tens of seconds; the automatic
    choice (``nn._compiled``) takes the driver only when ready."""
    return _loaded(train_steps, args) and (args[-1].size == 0 or _loaded(worker, _worker_args(args)))


def _worker_args(args):
    """:func:`worker`'s arguments, from :func:`train_steps`' ``args``."""
    (_, _, _, _, _, _, layers, alphas, _, params, grads, state1, state2, _, optimizer, hyper, _, _, _, _, kernels,
     _, _, _, _, _, _, job) = args
    return job, kernels, optimizer, hyper, layers, alphas, params, grads, state1, state2


@register_jitable
def first_layer_fused(rows):
    """Whether a step of ``rows`` rows can take the first layer's fused pass (dW an outer product); it takes it
    when the step's clipping scale is 1 (:func:`train_steps`)."""
    return rows <= ROWS_MAX_K


def job(layers, batch, threads):
    """The ``job`` argument of :func:`train_steps`: control words for a worker on a second core when the
    first-layer pass at a batch of one or two has W of at least TWO_CORES_MIN elements (and ``threads`` > 1),
    or when a step has products to share with it (:func:`shared_products`; its updates are then shared too);
    else empty (no worker: one would only spin)."""
    dense = layers[layers[:, KIND] == DENSE]
    first = threads > 1 and first_layer_fused(batch) and dense[0, IN_W] * dense[0, OUT_W] >= TWO_CORES_MIN
    shares = shared_products(layers, batch, threads) > 0
    words = np.zeros(JOB_WORDS if first or shares else 0, np.int64)
    if words.size:
        words[JOB_FIRST], words[JOB_SHARES] = first, shares
    return words


def shared_products(layers, batch, threads):
    """How many products of a step at ``batch`` rows :func:`train_steps` shares with its worker: on exactly two
    threads (more are left to Numba's pool), those ``_small.route`` sends to the multithreaded GEMM: each Dense
    layer's ``x @ W``, ``dW = x^T dz`` (unless the first layer's fused pass at a batch of one or two makes it)
    and ``dx = dz W^T`` where the layer table asks for it."""
    if threads != 2:
        return 0
    count, first = 0, True
    for row in layers[layers[:, KIND] == DENSE]:
        w_in, w_out = int(row[IN_W]), int(row[OUT_W])
        shapes = [(batch, w_in, w_out, 1, w_out, 1)]  # m, k, n and the strides route reads: x @ W
        if not (first and first_layer_fused(batch)):
            shapes.append((w_in, batch, w_out, w_in, w_out, 1))  # x^T dz
        if row[DX_AT] >= 0:
            shapes.append((batch, w_out, w_in, 1, 1, w_out))  # dz W^T
        count += sum(route(*shape, threads, PARALLEL_MIN_FLOPS) == PARALLEL for shape in shapes)
        first = False
    return count


def compile_worker(dtype):
    """Compile :func:`worker` (or load it from the cache) for parameters of ``dtype``, with the
    argument types nn passes it (told to STOP, it returns at once)."""
    flat, ints = np.zeros(1, dtype), np.zeros(2, np.int64)
    worker(np.full(JOB_WORDS, STOP, np.int64), ints, SGD, np.zeros((1, 8)), np.zeros((1, 11), np.int64), np.zeros(1),
           flat, flat, flat, flat)


_workers = None  # (pid, executor): the threads that run worker, kept from call to call


def _executor():
    """The pool that runs :func:`worker`: one idle thread reused by every call (starting a thread
    costs ~130 us a call, a submit ~30), more only while calls overlap; made anew in a forked child."""
    global _workers
    if _workers is None or _workers[0] != os.getpid():
        _workers = os.getpid(), ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="kernels-step-worker")
    return _workers[1]


def run(*args):
    """``train_steps(*args)``, its ``prange`` loops handed out an iteration at a time (``_parallel.dynamic``),
    with :func:`worker` on a thread of the :func:`_executor` for the call when ``job`` (the last
    argument) is not empty. The worker's exception, if any, is raised here, once it has returned."""
    job = args[-1]
    if job.size == 0:
        return _parallel.dynamic(train_steps, *args)

    failure = []

    def work():
        try:
            worker(*_worker_args(args))
        except BaseException as error:  # handed to the caller; the driver stops waiting on FAILED or EXITED
            failure.append(error)
            job[JOB_STATE], job[JOB_EXITED] = FAILED, 1

    job[JOB_STATE] = STOP  # the worker compiled (or loaded) here, not on its thread while the driver waits
    worker(*_worker_args(args))
    job[JOB_STATE], job[JOB_EXITED] = IDLE, 0
    future = _executor().submit(work)
    try:
        done = _parallel.dynamic(train_steps, *args)  # which stops the worker before it returns
    except RuntimeError:  # the driver's, when the worker failed
        if not failure:
            raise
    finally:
        if not job[JOB_EXITED]:  # the worker failed, or the driver raised before stopping it
            job[JOB_STATE] = STOP  # (a half it took, if the driver raised meanwhile, it finishes first)
            wait([future])
    if failure:  # even where the driver finished the steps without it
        raise failure[0]
    return done


def gemm_settings(tiling, dtype):
    """The GEMM settings row for the driver (``_small``'s columns): ``matmul.TILING``, this thread's Numba
    thread count, the threshold above which ``matmul`` goes multithreaded, the compiled bodies for ``dtype``."""
    return np.array(tuple(tiling) + (num_threads(), PARALLEL_MIN_FLOPS, body(dtype, False), body(dtype, True)),
                    np.int64)


@jit(fastmath=False, inline="always")
def _by_address(target, way, args):
    """``_small.dispatcher``'s call: route ``way``'s kernel from the table ``target[0]``, the serial GEMM at
    slot ``target[1]`` (compiled for the call site's layouts); a multithreaded product shared with the worker
    when the job ``target[2]`` says so (:func:`_shared_product`)."""
    kernels, serial, job = target
    if way == PARALLEL and job.size and job[JOB_SHARES]:
        _shared_product(job, args)
        return
    if way == GEMM:
        slot = serial
    elif way == PARALLEL:
        slot = GEMM_PARALLEL_K
    else:
        slot = ROWS_K + way - ROWS
    _call(kernels[slot], args, None)


@jit(fastmath=False, inline="always")
def _body_address(target, settings, dtype, dots):
    return settings[DOTS_BODY] if dots else settings[BODY]


# kernels.cpu.matmul's choice and call, on addresses: _matmul((kernels, serial slot, job), settings, threads, min_flops,
# a, b, bias, act, alpha, out)
_matmul = jit(fastmath=False, inline="always")(dispatcher(_by_address, _body_address))


@jit(fastmath=False, inline="always")
def _scheduled(kernels, slot, twin, size, minimum):
    """The address ``_parallel.scheduled`` would run for a first argument of ``size`` elements: the kernel at
    ``slot``, or below its parallel threshold ``minimum`` its serial twin at ``twin``."""
    return kernels[twin] if size < minimum else kernels[slot]


@jit(fastmath=False, inline="always")
def _run(kernels, slot, n, args):
    """``_parallel.run``: the body at table ``slot`` on all ``n`` elements below PARALLEL_MIN, else its
    chunked driver (the next slot)."""
    if n < PARALLEL_MIN:
        _call(kernels[slot], (np.uint64(0), np.uint64(n)) + args, None)
    else:
        _call(kernels[slot + 1], (n,) + args, None)


@jit(fastmath=False, inline="always")
def _update(kernels, optimizer, h, params, grads, state1, state2, gscale, scaled, shared):
    """One optimizer step as ``kernels.cpu.optim`` makes it, ``h`` its row of the per-step table, ``gscale``
    the gradient scale (None: 1; ``scaled`` says which, selecting the kernels compiled for it); ``shared``
    None, or the job whose counter hands out the chunks of the update to this thread and the worker
    (:func:`_shared_update`)."""
    t = params.dtype.type
    slot = OPTIMIZER_K + 4 * optimizer_group(optimizer) + (2 if scaled else 0)
    n = params.size
    if optimizer == SGD:
        _run_update(kernels, slot, n, shared, (params, grads, None, t(h[0]), t(h[1]), t(h[2]), h[4] != 0, t(h[3]),
                                               h[5] != 0, gscale))
    elif optimizer == SGD_MOMENTUM:
        _run_update(kernels, slot, n, shared, (params, grads, state1, t(h[0]), t(h[1]), t(h[2]), h[4] != 0, t(h[3]),
                                               h[5] != 0, gscale))
    elif optimizer == ADAM or optimizer == ADAMW:
        _run_update(kernels, slot, n, shared, (params, grads, state1, state2, t(h[0]), t(h[1]), t(h[2]), t(h[3]),
                                               t(h[4]), t(h[5]), t(h[6]), t(h[7]), optimizer == ADAMW, gscale))
    elif optimizer == RMSPROP:
        _run_update(kernels, slot, n, shared, (params, grads, state1, None, t(h[0]), t(h[1]), t(h[2]), t(h[3]),
                                               t(h[4]), t(h[5]), gscale))
    elif optimizer == RMSPROP_MOMENTUM:
        _run_update(kernels, slot, n, shared, (params, grads, state1, state2, t(h[0]), t(h[1]), t(h[2]), t(h[3]),
                                               t(h[4]), t(h[5]), gscale))
    elif optimizer == ADAGRAD:
        _run_update(kernels, slot, n, shared, (params, grads, state1, t(h[0]), t(h[1]), t(h[2]), gscale))
    else:
        _run_update(kernels, slot, n, shared, (params, grads, state1, state2, t(h[0]), t(h[1]), t(h[2]), t(h[3]),
                                               t(h[4]), gscale))


@jit(fastmath=False, inline="always")
def _run_update(kernels, slot, n, shared, args):
    """``_run(kernels, slot, n, args)``, or (``shared`` a job) the chunks it takes from the job's counter."""
    if shared is None:
        _run(kernels, slot, n, args)
    else:
        address, chunks = kernels[slot], _parallel.n_chunks(n)
        c = _take(shared[P_NEXT:P_NEXT + 1])
        while c < chunks:
            lo, hi = _parallel.chunk(c, n)
            _call(address, (lo, hi) + args, None)
            c = _take(shared[P_NEXT:P_NEXT + 1])


@jit(fastmath=False, inline="always")
def _gather_rows(X, order, start, out):
    """``out[r] = X[order[start + r]]`` for every row of ``out``."""
    for r in range(out.shape[0]):
        row = order[start + r]
        for j in range(out.shape[1]):  # an element loop: a row assignment compiles for seconds
            out[r, j] = X[row, j]


def _gather(targets, r, labels, row):
    """``targets[r] = labels[row]``: a class label, or a row of float targets (an element loop)."""


@overload(_gather, jit_options=dict(fastmath=False))
def _gather_compiled(targets, r, labels, row):
    if labels.ndim == 1:
        def gather(targets, r, labels, row):
            targets[r] = labels[row]
    else:
        def gather(targets, r, labels, row):
            for j in range(labels.shape[1]):
                targets[r, j] = labels[row, j]
    return gather


def _loss(kernels, loss, out, targets, dout, metrics, count):
    """The batch's mean loss with ``dout`` written (softmax cross-entropy on class labels; else the
    pointwise ``loss`` on float targets, its sum of terms divided by the size as ``kernels.cpu.losses``
    does); when ``count``, the correct predictions added to ``metrics`` as ``nn.losses`` counts them."""


@overload(_loss, jit_options=dict(fastmath=False))
def _loss_compiled(kernels, loss, out, targets, dout, metrics, count):
    if targets.ndim == 1:
        def cross_entropy(kernels, loss, out, targets, dout, metrics, count):
            value = _call(_scheduled(kernels, LOSS_K + CROSS_ENTROPY, CROSS_ENTROPY_SERIAL_K, out.size,
                                     losses.PARALLEL_MIN), (out, targets, dout), out.dtype.type(0))
            if count:
                _call(kernels[COUNT_K], (out, targets, metrics), None)
            return value
        return cross_entropy

    def pointwise(kernels, loss, out, targets, dout, metrics, count):
        t = out.dtype.type
        scale = 2 / out.size if loss == MSE else 1 / out.size
        value = _call(kernels[LOSS_K + loss], (_borrowed(out), _borrowed(targets), t(scale), _borrowed(dout)), t(0))
        if count:
            _call(kernels[THRESHOLDS_K], (out, targets, t(0.5 if loss == BINARY_CROSS_ENTROPY else 0), metrics), None)
        return value / t(out.size)
    return pointwise


@jit(fastmath=False, inline="always")
def _fold(x, w, lo, hi, acc):
    """``acc[r, j] = fma(x[r, p], w[i], acc[r, j])`` for the flat elements ``lo <= i < hi`` of W (row ``p =
    i // n``, column ``j = i % n``, ``n`` whole vectors) in order: over all of W, the chain of FMAs from
    zero that the ``rows`` route's vector path computes for ``x @ W``, so bit for bit its sums. Whole rows
    in register tiles, as that path has them; a row cut by ``lo`` or ``hi`` element by element."""
    n, item = acc.shape[1], acc.itemsize
    lanes = 32 // item
    r0, r1 = -(-lo // n), hi // n  # the whole rows
    if r0 >= r1:
        r0 = r1 = hi // n
    for r in range(x.shape[0]):
        a, out = x[r], acc[r]
        for e in range(lo, min(hi, r0 * n)):  # the end of the row cut by lo
            out[e % n] = _fma(a[e // n], w[e], out[e % n])
        pa, pb, pc = np.intp(a.ctypes.data) + r0 * item, np.intp(w.ctypes.data) + r0 * n * item, np.intp(out.ctypes.data)
        j = 0
        while r0 < r1 and j < n:
            if j + ROW_VECTORS * lanes <= n:
                _resume_wide(pa, np.intp(1), pb + j * item, np.intp(n), np.intp(r1 - r0), pc + j * item, out)
                j += ROW_VECTORS * lanes
            else:
                _resume_one(pa, np.intp(1), pb + j * item, np.intp(n), np.intp(r1 - r0), pc + j * item, out)
                j += lanes
        for e in range(max(lo, r1 * n), hi):  # the start of the row cut by hi
            out[e % n] = _fma(a[e // n], w[e], out[e % n])


@intrinsic
def _outer_rows(typingctx, a_at, sa_k, k, b_at, rows, n, out_at, like):
    """``out = a @ b`` for K ``k`` of 1 or 2 (A^T's row p at ``a_at`` + p elements, its second term ``sa_k``
    further; B's ``k`` rows of ``n`` elements one after the other at ``b_at``), ``rows`` x ``n`` elements written
    from ``out_at``: each element the chain of FMAs from zero that the ``rows`` route's outer product
    (``_small._outer``) computes, so bit for bit its result, in an IR loop of whole 32-byte vectors (``n`` a
    multiple of their lanes). No fast-math flags."""
    def codegen(context, builder, sig, args):
        fty = context.get_value_type(sig.args[7].dtype)
        size = context.get_abi_sizeof(fty)
        lanes = 32 // size
        vty, i64 = ir.VectorType(fty, lanes), ir.IntType(64)
        a_at_, sa_k_, k_, b_at_, rows_, n_, out_at_ = args[:7]
        a, b, out = (builder.inttoptr(v, fty.as_pointer()) for v in (a_at_, b_at_, out_at_))
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                             f"llvm.fma.v{lanes}f{8 * size}")
        zero = ir.Constant(vty, [0.0] * lanes)
        vectors = builder.sdiv(n_, ir.Constant(i64, lanes))

        def vector(pointer, at):
            return builder.bitcast(builder.gep(pointer, [at]), vty.as_pointer())

        def loop(terms):
            with cgutils.for_range(builder, rows_) as row:
                xs = [_splat(builder, builder.load(builder.gep(a, [builder.add(row.index, builder.mul(
                    sa_k_, ir.Constant(i64, t)))]), align=size), lanes) for t in range(terms)]
                with cgutils.for_range(builder, vectors) as column:
                    j = builder.mul(column.index, ir.Constant(i64, lanes))
                    value = zero
                    for t in range(terms):
                        bv = builder.load(vector(b, builder.add(j, builder.mul(n_, ir.Constant(i64, t)))), align=size)
                        value = builder.call(fma, [xs[t], bv, value])
                    builder.store(value, vector(out, builder.add(builder.mul(row.index, n_), j)), align=size)

        with builder.if_else(builder.icmp_signed("==", k_, ir.Constant(i64, 2))) as (two, one):
            with two:
                loop(2)
            with one:
                loop(1)
        return context.get_dummy_value()

    return types.void(*[types.intp] * 7, like), codegen


@jit(fastmath=False, inline="always")
def _dw_rows(kernels, x, dz, lo, hi, alpha, no_bias, out):
    """Rows ``lo <= p < hi`` of ``dW = x^T dz`` into ``out`` (their shape) as the per-kernel step's product
    takes them at a batch of one or two (the ``rows`` route): by :func:`_outer_rows` where dW's rows are whole
    vectors, else by that kernel."""
    if dz.shape[1] % (32 // dz.itemsize) == 0:
        _outer_rows(np.intp(x.ctypes.data) + lo * x.itemsize, np.intp(x.shape[1]), np.intp(x.shape[0]),
                    np.intp(dz.ctypes.data), np.intp(hi - lo), np.intp(dz.shape[1]), np.intp(out.ctypes.data), out)
    else:
        _call(kernels[ROWS_K], (np.intp(x.ctypes.data) + lo * x.itemsize, np.intp(1), np.intp(x.shape[1]),
                                np.intp(dz.ctypes.data), np.intp(dz.shape[1]), np.intp(1), np.intp(x.shape[0]),
                                no_bias, np.int64(NONE), alpha, out), None)


@jit(fastmath=False, inline="always")
def _borrowed(a):
    """The C-contiguous ``a`` as a flat array without a reference count, for the views taken of it (each view of
    a counted array costs two atomic operations: a tenth of a step at a batch of one; a reshape a call)."""
    return carray(_voidptr(np.intp(a.ctypes.data)), a.size, a.dtype)


@jit(fastmath=False, inline="always")
def _pieces(kernels, optimizer, h, x, dz, lo, hi, params, grads, state1, state2, alpha, x_next, acc, piece, no_bias):
    """The pieces ``lo <= a < hi`` (multiples of PIECE) of the first parameter layer's W at a batch of one or
    two: each piece's gradient (``dW = x^T dz``, an outer product, by the ``rows`` route), the unscaled
    optimizer step on its part of W, and with ``x_next`` (rows > 0: the next step's input) that part of W,
    once updated and still in L1, folded into ``acc``, the next step's ``x_next @ W`` (:func:`_fold`), so that
    W is read once per step, not twice. The same kernels on the same elements as the separate product and
    update, so bit for bit the same (the norm comes from the factors: ``dense_grad_norm``). Each piece's
    gradient goes into ``piece`` (at least PIECE + 2 rows of dW), where the update reads it from L1; an empty
    ``piece`` writes ``grads`` instead (the call's last step: they then hold its gradient). SGD, with or without a
    velocity, otherwise takes each element of the gradient as it is read (``optim._sgd_outer``: the same bits, no
    piece written and read back). ``params``, ``grads`` and the state come borrowed (:func:`_borrowed`),
    ``no_bias`` is an empty array of their dtype."""
    w_out = dz.shape[1]
    w_end = x.shape[1] * w_out
    into_grads = piece.size == 0
    outer = not into_grads and (optimizer == SGD or optimizer == SGD_MOMENTUM)
    t = params.dtype.type
    piece = _borrowed(piece)
    done = lo // w_out  # the rows of dW in grads
    r0, r1 = 0, 0  # the rows of dW in piece
    for a in range(lo, min(hi, w_end), PIECE):
        wb = min(a + PIECE, w_end)
        g, at = grads, 0  # the piece's gradient: g[i - at] for its elements i
        first, need = a // w_out, -(-wb // w_out)  # the rows of dW the piece meets
        sgd = (t(h[0]), t(h[1]), t(h[2]), h[4] != 0, t(h[3]), h[5] != 0)
        if outer and optimizer == SGD:
            _call(kernels[SGD_OUTER_K], (np.uint64(a), np.uint64(wb), params, x, dz, None) + sgd, None)
        elif outer:
            _call(kernels[SGD_OUTER_K + 1], (np.uint64(a), np.uint64(wb), params, x, dz, state1) + sgd, None)
        else:
            if into_grads:
                if need > done:
                    _dw_rows(kernels, x, dz, done, need, alpha, no_bias,
                             _view(grads, done * w_out, need - done, w_out))
                    done = need
            else:
                if first < r0 or need > r1:
                    r0, r1 = first, need
                    _dw_rows(kernels, x, dz, r0, r1, alpha, no_bias, _view(piece, 0, r1 - r0, w_out))
                g, at = piece, r0 * w_out
            _update(kernels, optimizer, h, params[a:wb], g[a - at:wb - at], state1[a:wb], state2[a:wb], None, False,
                    None)
        if x_next.shape[0]:
            _fold(x_next, params, a, wb, acc)


# The worker on a second core (``worker``): the first layer's pass at a batch of one or two from this many
# elements of W, and the worker's control words (``job``): its state, then the step's row of the optimizer table,
# the layer, the batch's rows, the next step's rows (0: no fold), where its pieces end, the addresses of x, dz,
# x_next, acc and its piece buffer, the piece buffer's size (0: write grads), the shares it
# ran, the shares the driver ran itself (the worker not there to take them), (tests) 1 for the driver to
# wait for the worker, 1 once the worker, told to STOP, has returned; whether it shares the first layer's pass,
# whether it shares the multithreaded products and updates; the next chunk of a shared product or update; for
# a product (``_shared_product``) ``gemm_parallel``'s arguments (the arrays as addresses and sizes, alpha's
# bits), the chunk's shape, the products the worker joined; for an update (``_shared_update``) the step, where
# it starts, whether the gradient is scaled and the scale's bits, the updates the worker joined
TWO_CORES_MIN = 1 << 15
PIECE = 1 << 11  # elements of W per piece of the first layer's pass: the piece and its gradient stay in L1
YIELD_SPINS = 1 << 12  # ~0.1 ms of pause instructions
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_SCHED_YIELD = getattr(ctypes.CDLL(None), "sched_yield", None) if os.name == "posix" else None
if _SCHED_YIELD is not None:  # for the JIT's linker (and code loaded from the cache)
    binding.add_symbol("sched_yield", ctypes.cast(_SCHED_YIELD, ctypes.c_void_p).value)
(JOB_STATE, JOB_STEP, JOB_LAYER, JOB_ROWS, JOB_FOLLOWING, JOB_SPLIT, JOB_X, JOB_DZ, JOB_X_NEXT, JOB_ACC, JOB_PIECE,
 JOB_PIECE_SIZE, JOB_STEPS, JOB_TAKEN, JOB_WAIT, JOB_EXITED, JOB_FIRST, JOB_SHARES,
 P_NEXT, P_A, P_SA_I, P_SA_K, P_B, P_SB_K, P_SB_J, P_K, P_BIAS, P_BIAS_N, P_ACT, P_ALPHA, P_OUT, P_M, P_N, P_VARIANT,
 P_KC, P_NC_BYTES, P_BODY, P_ROWS, P_COLS, P_JOINED, U_STEP, U_AT, U_SCALED, U_SCALE, U_JOINED) = range(45)
JOB_WORDS = U_JOINED + 1
# JOB_STATE: nothing to do, first-layer work to take, taken, return, raised, a product or an update to share
IDLE, GO, TAKEN, STOP, FAILED, PRODUCT, UPDATE = range(7)


@intrinsic
def _load_acquire(typingctx, words, i):
    """``words[i]`` (an int64 array), read with acquire ordering: what the writer stored before its release
    (:func:`_exchange`) is visible after."""
    def codegen(context, builder, sig, args):
        array = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.load_atomic(builder.gep(array.data, [args[1]]), "acquire", 8)

    return types.int64(words, i), codegen


@intrinsic
def _exchange(typingctx, words, i, expected, value):
    """``words[i] = value`` if it holds ``expected`` (an int64 array, atomically, with acquire-release
    ordering); returns what it held."""
    def codegen(context, builder, sig, args):
        array = context.make_array(sig.args[0])(context, builder, args[0])
        result = builder.cmpxchg(builder.gep(array.data, [args[1]]), args[2], args[3], "acq_rel", "acquire")
        return builder.extract_value(result, 0)

    return types.int64(words, i, expected, value), codegen


@intrinsic
def _pause(typingctx, spins):
    """One turn of a spin-wait, the ``spins``-th: the x86 ``pause`` hint, and every YIELD_SPINS turns (where
    the C library has it) ``sched_yield``, so that a waiting thread lets the one it waits for run when the
    two share a core (more threads than cores)."""
    def codegen(context, builder, sig, args):
        if _X86:
            builder.asm(ir.FunctionType(ir.VoidType(), []), "pause", "", [], True)
        if _SCHED_YIELD:
            mask = ir.Constant(ir.IntType(64), YIELD_SPINS - 1)
            with builder.if_then(builder.icmp_unsigned("==", builder.and_(args[0], mask), mask), likely=False):
                builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []),
                                                            "sched_yield"), [])
        return context.get_dummy_value()

    return types.void(spins), codegen


@jit(fastmath=False, inline="always")
def _first_layer_views(job, layers, dtype):
    """The worker's x, dz, x_next, acc and piece buffer for the step ``job`` describes."""
    i, rows, following = job[JOB_LAYER], job[JOB_ROWS], job[JOB_FOLLOWING]
    w_in, w_out = layers[i, IN_W], layers[i, OUT_W]
    x = carray(_voidptr(job[JOB_X]), (rows, w_in), dtype)
    dz = carray(_voidptr(job[JOB_DZ]), (rows, w_out), dtype)
    x_next = carray(_voidptr(job[JOB_X_NEXT]), (following, w_in), dtype)
    acc = carray(_voidptr(job[JOB_ACC]), (following, w_out), dtype)
    piece = carray(_voidptr(job[JOB_PIECE]), job[JOB_PIECE_SIZE], dtype)
    return x, dz, x_next, acc, piece


@jit(fastmath=False)
def worker(job, kernels, optimizer, hyper, layers, alphas, params, grads, state1, state2):
    """The other core's share of :func:`train_steps`' work: spins until ``job[JOB_STATE]`` is GO (the first
    layer's pass at a batch of one or two), PRODUCT (a multithreaded product) or UPDATE (the optimizer's),
    takes it (TAKEN), runs :func:`_pieces` on ``[0, job[JOB_SPLIT])`` (folding, when the step does) or the
    chunks of the product (:func:`_product_chunks`) or update it can take, sets it back to IDLE; until it reads
    STOP, which it acknowledges in ``job[JOB_EXITED]``. Run on a thread of its own (it holds no GIL) for the
    duration of a ``train_steps`` call given the same ``job`` and arrays."""
    params, grads, state1, state2 = _borrowed(params), _borrowed(grads), _borrowed(state1), _borrowed(state2)
    no_bias = np.empty(0, params.dtype)
    spins = 0
    while True:
        state = _load_acquire(job, JOB_STATE)
        if state == STOP:
            _exchange(job, JOB_EXITED, 0, 1)
            return
        if state != GO and state != PRODUCT and state != UPDATE or _exchange(job, JOB_STATE, state, TAKEN) != state:
            spins += 1  # nothing to do, or the driver took it back
            _pause(spins)
            continue
        spins = 0
        if state == PRODUCT:
            _product_chunks(job, params)
            job[P_JOINED] += 1
        elif state == UPDATE:
            _worker_update(kernels, optimizer, hyper, job, params, grads, state1, state2)
            job[U_JOINED] += 1
        else:
            x, dz, x_next, acc, piece = _first_layer_views(job, layers, params.dtype)
            _pieces(kernels, optimizer, hyper[job[JOB_STEP]], x, dz, 0, job[JOB_SPLIT], params, grads, state1, state2,
                    alphas[job[JOB_LAYER]], x_next, acc, piece, no_bias)
            job[JOB_STEPS] += 1
        _exchange(job, JOB_STATE, TAKEN, IDLE)  # unless told to STOP meanwhile


@jit(fastmath=False)
def _product_chunks(job, like):
    """The chunks of the product described in ``job`` (of ``like``'s dtype) that this thread can take
    (``_gemm.take_chunks``)."""
    dtype = like.dtype
    out = carray(_voidptr(job[P_OUT]), (job[P_M], job[P_N]), dtype)
    bias = carray(_voidptr(job[P_BIAS]), job[P_BIAS_N], dtype)
    take_chunks(job[P_NEXT:P_NEXT + 1], job[P_BODY], job[P_A], job[P_SA_I], job[P_SA_K], job[P_B], job[P_SB_K],
                job[P_SB_J], job[P_K], bias, job[P_ACT], job.view(np.float64)[P_ALPHA], out, job[P_VARIANT],
                job[P_KC], job[P_NC_BYTES], job[P_ROWS], job[P_COLS])


@jit(fastmath=False)
def _worker_update(kernels, optimizer, hyper, job, params, grads, state1, state2):
    """The worker's chunks of the update the job describes (:func:`_shared_update`)."""
    h, at = hyper[job[U_STEP]], job[U_AT]
    if job[U_SCALED]:
        _update(kernels, optimizer, h, params[at:], grads[at:], state1[at:], state2[at:],
                params.dtype.type(job.view(np.float64)[U_SCALE]), True, job)
    else:
        _update(kernels, optimizer, h, params[at:], grads[at:], state1[at:], state2[at:], None, False, job)


# Not inlined (nor _shared_update, _product_chunks, _worker_update): inlined at the driver's three product and two
# update call sites they took the cold compile of the float32 training step from 76 s to 276 s (148 s as calls)
@jit(fastmath=False)
def _shared_product(job, args):
    """``gemm_parallel(*args)`` on this thread and the worker: the product's chunks (the same as
    ``gemm_parallel``'s, each computed whole by one thread: the same bits) taken from one counter by whichever
    thread is free. A worker spinning on its core takes its first chunk within a microsecond, where a thread
    pool's sleeping thread takes tens (and at 128 x 256 x 256, 2 threads, most of the gain was lost to that);
    if it is not running (its core busy), this thread takes every chunk and waits for no one (but for the
    chunk the worker holds, if it took the offer and then lost its core)."""
    (a_at, sa_i, sa_k, b_at, sb_k, sb_j, k, bias, act, alpha, out, threads, variant, kc_max, nc_bytes, mc, body,
     dots) = args
    m, n = out.shape
    if m == 0 or n == 0:
        return
    rows, cols = chunk_shape(m, n, k, sb_k, sb_j, out, threads, variant, kc_max, nc_bytes, mc, dots)
    if act == GEMM_SIGMOID or act == GEMM_TANH:  # compiled, on its first use, by this thread
        _call_transcendental(out, 0, 0, 0, 0, act)
    job[P_A], job[P_SA_I], job[P_SA_K], job[P_B], job[P_SB_K], job[P_SB_J] = a_at, sa_i, sa_k, b_at, sb_k, sb_j
    job[P_K], job[P_BIAS], job[P_BIAS_N], job[P_ACT] = k, np.intp(bias.ctypes.data), bias.size, act
    job.view(np.float64)[P_ALPHA] = alpha
    job[P_OUT], job[P_M], job[P_N], job[P_VARIANT], job[P_KC] = np.intp(out.ctypes.data), m, n, variant, kc_max
    job[P_NC_BYTES], job[P_BODY], job[P_ROWS], job[P_COLS] = nc_bytes, body, rows, cols
    _publish(job, PRODUCT)
    take_chunks(job[P_NEXT:P_NEXT + 1], body, a_at, sa_i, sa_k, b_at, sb_k, sb_j, k, bias, act, alpha, out, variant,
                kc_max, nc_bytes, rows, cols)
    _join(job, PRODUCT)


@jit(fastmath=False)
def _shared_update(kernels, optimizer, hyper, step, at, params, grads, state1, state2, gscale, job):
    """``_update`` of ``params[at:]`` for ``step`` (``gscale`` None: unscaled), its chunks shared with the worker
    as :func:`_shared_product` shares a product's when the job says so and the update is multithreaded
    (PARALLEL_MIN elements): elementwise, the same bits however they are shared."""
    scaled = gscale is not None
    if job.size == 0 or not job[JOB_SHARES] or params.size - at < PARALLEL_MIN:
        _update(kernels, optimizer, hyper[step], params[at:], grads[at:], state1[at:], state2[at:], gscale, scaled,
                None)
        return
    job[U_STEP], job[U_AT], job[U_SCALED] = step, at, scaled
    job.view(np.float64)[U_SCALE] = _float_or_zero(gscale)
    _publish(job, UPDATE)
    _update(kernels, optimizer, hyper[step], params[at:], grads[at:], state1[at:], state2[at:], gscale, scaled, job)
    _join(job, UPDATE)


def _float_or_zero(x):
    """``x`` as a float64, None as 0 (compiled only)."""


@overload(_float_or_zero)
def _float_or_zero_compiled(x):
    return (lambda x: 0.0) if isinstance(x, types.NoneType) else (lambda x: np.float64(x))


@jit(fastmath=False, inline="always")
def _publish(job, work):
    """Offer the worker ``work`` (PRODUCT or UPDATE), its arguments written in ``job``, from chunk 0."""
    job[P_NEXT] = 0
    if _exchange(job, JOB_STATE, IDLE, work) != IDLE:  # FAILED: its thread raised before this
        raise RuntimeError("the training step's worker thread failed")


@jit(fastmath=False, inline="always")
def _join(job, work):
    """Once this thread has run out of chunks of the ``work`` it published: take the offer back if the worker
    has not taken it, else wait until the worker's chunks are done (tests: ``JOB_WAIT``, wait for the worker
    to take it first)."""
    state = _load_acquire(job, JOB_STATE) if job[JOB_WAIT] else _exchange(job, JOB_STATE, work, IDLE)
    spins = 0
    while state == TAKEN or (state == work and job[JOB_WAIT]):
        spins += 1
        _pause(spins)
        state = _load_acquire(job, JOB_STATE)
    if state == FAILED:
        raise RuntimeError("the training step's worker thread failed")


@jit(fastmath=False, inline="always")
def _product_update(kernels, optimizer, hyper, step, i, x, dz, params, grads, state1, state2, alpha, x_next, acc,
                    piece, job, no_bias):
    """The first parameter layer's (layer ``i``'s) weight gradient and update at a batch of one or two
    (:func:`_pieces` over its whole W). With a worker (``job`` not empty) and W of at least TWO_CORES_MIN elements, the
    worker takes the first pieces, folding, while this thread runs the rest without; this thread then runs the
    worker's share too if the worker has not taken it (its core busy: no waiting on a thread that is not
    running), and folds its own, continuing each column's chain of FMAs in row order: the same bits whoever
    runs what, wherever the split. The split starts at half the pieces and moves a piece a step toward
    whichever thread finished first (the worker's share folds as it goes, this thread's after the join).
    ``piece`` holds two piece buffers when there is a worker (the second its)."""
    w_end = x.shape[1] * dz.shape[1]
    pieces = -(-w_end // PIECE)
    h = hyper[step]
    if job.size and job[JOB_FIRST] and w_end >= TWO_CORES_MIN:
        split = job[JOB_SPLIT] if 0 < job[JOB_SPLIT] < w_end else pieces // 2 * PIECE  # balanced from step to step
        size = piece.size // 2
        job[JOB_STEP], job[JOB_LAYER], job[JOB_ROWS], job[JOB_FOLLOWING] = step, i, x.shape[0], x_next.shape[0]
        job[JOB_SPLIT], job[JOB_X], job[JOB_DZ] = split, np.intp(x.ctypes.data), np.intp(dz.ctypes.data)
        job[JOB_X_NEXT], job[JOB_ACC] = np.intp(x_next.ctypes.data), np.intp(acc.ctypes.data)
        job[JOB_PIECE], job[JOB_PIECE_SIZE] = np.intp(piece.ctypes.data) + size * piece.itemsize, size
        if _exchange(job, JOB_STATE, IDLE, GO) != IDLE:  # FAILED: its thread raised before this step
            raise RuntimeError("the training step's worker thread failed")
        _pieces(kernels, optimizer, h, x, dz, split, w_end, params, grads, state1, state2, alpha, x_next[:0], acc,
                piece[:size], no_bias)
        state = _load_acquire(job, JOB_STATE) if job[JOB_WAIT] else _exchange(job, JOB_STATE, GO, IDLE)
        if state == GO and not job[JOB_WAIT]:  # the worker has not started it (its core busy elsewhere): run it
            _pieces(kernels, optimizer, h, x, dz, 0, split, params, grads, state1, state2, alpha, x_next, acc,
                    piece[:size], no_bias)
            job[JOB_TAKEN] += 1
        elif state == IDLE:  # the worker done first: a piece more for it next step (a piece less if it is not)
            job[JOB_SPLIT] = min(split + PIECE, (pieces - 1) * PIECE)
        spins = 0
        while state == TAKEN or (state == GO and job[JOB_WAIT]):
            spins += 1
            _pause(spins)
            state = _load_acquire(job, JOB_STATE)
        if spins:
            job[JOB_SPLIT] = max(split - PIECE, PIECE)
        if state == FAILED:
            raise RuntimeError("the training step's worker thread failed")
        if x_next.shape[0]:
            _fold(x_next, params, split, w_end, acc)
    else:
        _pieces(kernels, optimizer, h, x, dz, 0, w_end, params, grads, state1, state2, alpha, x_next, acc, piece,
                no_bias)


@jit(fastmath=False, inline="always")
def _check(kernels, loss, rows, norms, max_norm, metrics, scale):
    """``check_step`` of the step (its metrics and clipping ``scale``); True when the step is not to be applied."""
    _call(kernels[CHECK_K], (np.float64(loss), np.float64(rows), norms, max_norm, metrics, scale), None)
    return metrics[BAD_STEP] != 0


@jit(fastmath=False, inline="always")
def _stop(job):
    """Tell the worker (if any) to return and wait until it has: the caller then owns every array, without
    waiting for the worker's thread to get the GIL back (on this side of the GIL, ~0.2 ms less a call)."""
    if job.size and _exchange(job, JOB_STATE, IDLE, STOP) == IDLE:  # (FAILED: it has returned, raising)
        spins = 0
        while _load_acquire(job, JOB_EXITED) == 0:
            spins += 1
            _pause(spins)


@jit(fastmath=False, inline="always")
def _dropout(kernels, x, out, seed, threshold, scale):
    """``kernels.cpu.dropout`` at offset 0 (its stream starts at mix(seed))."""
    t = x.dtype.type
    _run(kernels, DROPOUT_K, x.size, (x, out, _mix(seed), threshold, t(scale), t(0)))


@jit(fastmath=False, inline="always")
def _view(buffer, at, rows, width):
    """``buffer.reshape(-1)[at:at + rows * width]`` as a (rows, width) C array without a reference count: the
    driver takes a dozen views a step, and a reshape costs a library call, a counted view two atomic operations
    (together ~6% of a step at a batch of one)."""
    return carray(_voidptr(np.intp(buffer.ctypes.data) + at * buffer.itemsize), (rows, width), buffer.dtype)


@jit(fastmath=False, inline="always")
def _finish(acc, bias, code, alpha, y):
    """``y = act(acc + bias)`` for no activation, relu or leaky relu, as the ``rows`` kernel's epilogue
    (``_gemm._epilogue``) computes it: one add, then a comparison (and the slope's product)."""
    zero, slope = y.dtype.type(0), y.dtype.type(alpha)
    for r in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            v = acc[r, j] + bias[j]
            if code == RELU:
                v = zero if v < zero else v
            elif code == LEAKY_RELU:
                v = v if v > zero else slope * v
            y[r, j] = v


@jit(fastmath=False)
def train_steps(X, labels, order, s0, s1, batch, layers, alphas, seeds, params, grads, state1, state2, segments,
                optimizer, hyper, max_norm, factored, loss_kind, count, kernels, settings, scratch, targets, norms,
                metrics, scale, job):
    """Steps ``s0 <= s < s1`` of an epoch over the rows ``order`` of ``X`` / ``labels`` (class labels, or
    rows of float targets) in batches of ``batch``. ``layers`` is the integer layer table, ``alphas`` each
    layer's leaky slope (Dense, leaky relu) or dropout scale, ``seeds`` each dropout layer's (seed at step s0,
    keep threshold); ``segments`` bound each parameter layer's slice of the flat buffers; ``hyper[s - s0]`` is
    step s's optimizer row; ``max_norm`` the global gradient norm to clip to (inf: none); at a step of at most
    ``factored`` rows each layer's gradient norm comes from its factors (``dense_grad_norm``), as in the
    per-kernel step; ``loss_kind`` the loss (its code); ``count``: count the correct predictions;
    ``kernels`` the :func:`kernel_table`, ``settings`` the :func:`gemm_settings`; ``job`` the control words of
    :func:`worker` when one runs beside this call (see :func:`run`), else empty. The step's bookkeeping
    goes into ``metrics`` and ``scale`` through ``kernels.cpu.metrics``, as in the per-kernel step. Returns
    the first step not completed: s1, or the step whose loss or gradient norms were not finite (marked in
    ``metrics``, nothing of it applied)."""
    n, width = order.size, X.shape[1]
    params, grads, state1, state2 = _borrowed(params), _borrowed(grads), _borrowed(state1), _borrowed(state2)
    depth = layers.shape[0]
    t = params.dtype.type
    no_bias = np.empty(0, params.dtype)
    no_activation = np.int64(NONE)  # not the literal: one signature for every _matmul call
    first = 0  # the first parameter layer (its W at offset 0)
    while layers[first, KIND] != DENSE:
        first += 1
    # At a batch of one or two, a first layer Dense with no activation, relu or leaky relu (an
    # epilogue computed alike here and in the kernel) and whole vectors of outputs (the rows kernel's vector
    # path): the next step's x @ W1 is folded into this step's update of W1 (_product_update), then finished here.
    w1 = layers[0, OUT_W]
    foldable = (first == 0 and first_layer_fused(batch) and batch <= min(ROWS_MAX_M, factored)
                and layers[0, ACT] <= LEAKY_RELU and w1 % (32 // params.itemsize) == 0)
    x_next = np.empty((batch if foldable else 0, width), params.dtype)
    acc = np.empty((batch if foldable else 0, w1), params.dtype)
    folded = False  # acc holds this step's x @ W1
    # the fused product's buffer for a piece of dW (the last step writes grads, which then hold its gradient)
    piece = np.empty((PIECE + 2 * layers[first, OUT_W]) * (2 if job.size else 1) if batch <= ROWS_MAX_K else 0,
                     params.dtype)
    for s in range(s0, s1):
        lo = s * batch
        rows = min(batch, n - lo)
        xb = _view(scratch, layers[0, X_AT], rows, width)
        yb = targets[:rows]
        _gather_rows(X, order, lo, xb)
        for r in range(rows):
            _gather(yb, r, labels, order[lo + r])
        for i in range(depth):
            kind, code, w_in, w_out = layers[i, KIND], layers[i, ACT], layers[i, IN_W], layers[i, OUT_W]
            x, y = _view(scratch, layers[i, X_AT], rows, w_in), _view(scratch, layers[i, Y_AT], rows, w_out)
            if kind == DENSE and i == 0 and folded:
                _finish(_view(acc, 0, rows, w1), params[layers[0, B_AT]:layers[0, B_AT] + w_out], code, alphas[0], y)
                folded = False  # (until this step's pass folds again: not when it is clipped)
            elif kind == DENSE:
                w = _view(params, layers[i, W_AT], w_in, w_out)
                _matmul((kernels, GEMM_CC, job), settings, settings[THREADS], settings[MIN_FLOPS], x, w,
                        params[layers[i, B_AT]:layers[i, B_AT] + w_out], code, alphas[i], y)
            elif kind == ACTIVATION and code == SOFTMAX:
                _call(kernels[SOFTMAX_K], (x, y), None)
            elif kind == ACTIVATION:
                x1 = _borrowed(x)
                _call(kernels[2 * (code - 1)], (x1, x1, t(alphas[i] if code == LEAKY_RELU else 0), _borrowed(y)),
                      None)
            elif layers[i, Y_AT] != layers[i, X_AT]:  # dropout at a rate > 0
                _dropout(kernels, _borrowed(x), _borrowed(y), seeds[i, 0] + np.uint64(s - s0), seeds[i, 1],
                         alphas[i])
        out = _view(scratch, layers[depth - 1, Y_AT], rows, layers[depth - 1, OUT_W])
        dout = _view(scratch, layers[depth - 1, DY_AT], rows, layers[depth - 1, OUT_W])
        loss = _loss(kernels, loss_kind, out, yb, dout, metrics, count)
        fused = first_layer_fused(rows) and rows <= factored  # (every norm known before the first layer's pass)
        checked = False
        p = segments.size - 2  # the parameter layer (its norm's place) of the next Dense layer down
        for i in range(depth - 1, -1, -1):
            kind, code, w_in, w_out = layers[i, KIND], layers[i, ACT], layers[i, IN_W], layers[i, OUT_W]
            if kind != DENSE and layers[i, DX_AT] < 0:  # the first layer: no dx wanted
                continue
            x, y = _view(scratch, layers[i, X_AT], rows, w_in), _view(scratch, layers[i, Y_AT], rows, w_out)
            dy = _view(scratch, layers[i, DY_AT], rows, w_out)
            dx = _view(scratch, max(layers[i, DX_AT], 0), rows if layers[i, DX_AT] >= 0 else 0, w_in)
            if kind == DENSE:
                gw = _view(grads, layers[i, W_AT], w_in, w_out)
                if code == NONE:
                    _call(_scheduled(kernels, BIAS_GRAD_K, BIAS_GRAD_SERIAL_K, dy.size, losses.PARALLEL_MIN),
                          (dy, grads[layers[i, B_AT]:layers[i, B_AT] + w_out]), None)
                    dz = dy
                else:
                    dz = _view(scratch, layers[i, DZ_AT], rows, w_out)
                    _call(_scheduled(kernels, BIAS_ACT_K + code - 1, BIAS_ACT_SERIAL_K + code - 1, y.size,
                                     activations.PARALLEL_MIN),
                          (y, dy, t(alphas[i]), dz, grads[layers[i, B_AT]:layers[i, B_AT] + w_out]), None)
                if rows <= factored:
                    db = grads[layers[i, B_AT]:layers[i, B_AT] + w_out]
                    _call(kernels[DENSE_NORM_K], (x, dz, db, norms[p:p + 1]), None)
                p -= 1
                if layers[i, DX_AT] >= 0:
                    w = _view(params, layers[i, W_AT], w_in, w_out)
                    _matmul((kernels, GEMM_CT, job), settings, settings[THREADS], settings[MIN_FLOPS], dz, w.T, no_bias,
                            no_activation, alphas[i], dx)
                passing = fused and layers[i, W_AT] == 0
                if passing:  # every norm known: the step is checked before W is touched, the pass taken at scale 1
                    checked = True
                    if _check(kernels, loss, rows, norms, max_norm, metrics, scale):
                        _stop(job)
                        return s
                    passing = fused = scale[0] == 1
                if passing:
                    following = min(batch, n - lo - batch) if foldable and s + 1 < s1 else 0  # the next step's rows
                    following_x, following_acc = _view(x_next, 0, following, width), _view(acc, 0, following, w1)
                    _gather_rows(X, order, lo + batch, following_x)
                    following_acc[:] = 0
                    _product_update(kernels, optimizer, hyper, s - s0, i, x, dz, params, grads, state1, state2,
                                    alphas[i], following_x, following_acc, piece[:0] if s == s1 - 1 else piece, job,
                                    no_bias)
                    folded = following > 0
                else:
                    _matmul((kernels, GEMM_TC, job), settings, settings[THREADS], settings[MIN_FLOPS], x.T, dz, no_bias,
                            no_activation, alphas[i], gw)
            elif kind == ACTIVATION and code == SOFTMAX:
                _call(kernels[SOFTMAX_BACKWARD_K], (y, dy, dx), None)
            elif kind == ACTIVATION:
                saved = x if code == RELU or code == LEAKY_RELU else y  # what the kernel differentiates from
                _call(kernels[2 * code - 1], (_borrowed(saved), _borrowed(dy), t(alphas[i] if code == LEAKY_RELU else 0),
                                              _borrowed(dx)), None)
            elif layers[i, Y_AT] != layers[i, X_AT]:
                _dropout(kernels, _borrowed(dy), _borrowed(dx), seeds[i, 0] + np.uint64(s - s0), seeds[i, 1],
                         alphas[i])
        if rows > factored:
            norms_at = _scheduled(kernels, NORMS_K, NORMS_SERIAL_K, grads.size, NORMS_PARALLEL_MIN)
            _call(norms_at, (grads, segments, norms), None)
        if not checked and _check(kernels, loss, rows, norms, max_norm, metrics, scale):
            _stop(job)
            return s
        if scale[0] == 1:
            done = layers[first, IN_W] * layers[first, OUT_W] if fused else 0  # W updated with its product
            _shared_update(kernels, optimizer, hyper, s - s0, done, params, grads, state1, state2, None, job)
        elif scale[0] != 0:  # 0: a clipping scale that underflowed, the step skipped as the kernels skip it
            _shared_update(kernels, optimizer, hyper, s - s0, 0, params, grads, state1, state2, scale[0], job)
    _stop(job)
    return s1
