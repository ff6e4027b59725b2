"""kernels.warmup: says what it compiles (stderr), only what is asked, silent when cached or verbose=0."""

import os
import subprocess
import sys

import numpy as np
import pytest

import kernels


def _fresh_process(code, cache):
    """Run ``code`` in a new interpreter with its own Numba cache (its stdout and stderr)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "NUMBA_CACHE_DIR": str(cache)})


def _warmup(cache, verbose=1, processes=2, only=("bias_grad", "adam_step")):
    return _fresh_process(f"import kernels; kernels.warmup(dtypes=('float32',), only={only!r}, "
                          f"verbose={verbose}, processes={processes})", cache)


def test_cold_cache_is_reported_then_silent(tmp_path):
    cold = _warmup(tmp_path)
    lines = cold.stderr.splitlines()
    assert lines[0].startswith("kernels: compiling numba kernels for float32 in 2 process(es) (first run only, "
                               f"cached in {tmp_path}")
    assert {line.split(":")[1].strip() for line in lines[1:-1]} == {"bias_grad float32", "adam_step float32"}
    assert lines[-1].startswith("kernels: compiled in ") and cold.stdout == ""
    assert _warmup(tmp_path).stderr == ""  # everything cached: nothing to say


def test_only_what_is_not_cached_compiles(tmp_path):
    _warmup(tmp_path, only=("bias_grad",))
    lines = _warmup(tmp_path).stderr.splitlines()  # this process's share is cached, the helper's is not
    assert lines[0].startswith("kernels: compiling numba kernels for float32 in 1 process(es)")
    assert [line.split(":")[1].strip() for line in lines[1:-1]] == ["adam_step float32"]


def test_verbose_0_is_silent_when_compiling(tmp_path):
    assert _warmup(tmp_path, verbose=0, processes=1).stderr == ""


def test_only_names_kernels():
    with pytest.raises(ValueError, match=r"only must name kernels among .*got \['matmull'\]"):
        kernels.warmup(only=("matmull",))
    assert kernels.warmup("numpy", only="relu") == "numpy"


def test_only_the_activations_asked_for_compile(tmp_path):
    """bias_act_backward has one compiled function per activation: a run using relu compiles relu's."""
    code = ("import kernels; from kernels.cpu import fused; "
            "kernels.warmup(dtypes=('float32',), only=('bias_act_backward',), activations=('relu',), verbose=0); "
            "print(sorted(name for name, f in fused._BIAS_ACT_BACKWARD.items() if f.signatures))")
    assert _fresh_process(code, tmp_path).stdout.strip() == "['relu']"


def test_activations_are_checked():
    with pytest.raises(ValueError, match=r"activations must be among .*got \['gelu'\]"):
        kernels.warmup(activations=("gelu",))


def _kernel_pairs():
    """(name, parallel kernel, serial twin, arguments maker) for each kernel with a serial twin."""
    from kernels.cpu import fused, losses

    def rows(n, cols, dtype):
        x = np.random.default_rng(n).standard_normal((n, cols)).astype(dtype)
        return x

    return [
        ("_cross_entropy", losses._cross_entropy, losses._cross_entropy_serial,
         lambda n, c, dt: (rows(n, c, dt), np.arange(n) % c, np.empty((n, c), dt))),
        ("bias_grad", losses.bias_grad, losses.bias_grad_serial, lambda n, c, dt: (rows(n, c, dt), np.empty(c, dt))),
        ("segment_norms", fused.segment_norms, fused.segment_norms_serial,
         lambda n, c, dt: (rows(n, c, dt).ravel(), np.array([0, 1, n * c // 3, n * c]), np.empty(3))),
    ] + [(f"bias_{act}_backward", fused._BIAS_ACT_BACKWARD[act], fused._BIAS_ACT_BACKWARD_SERIAL[act],
          lambda n, c, dt: (rows(n, c, dt), rows(n + 1, c, dt), dt(0.1), np.empty((n, c), dt), np.empty(c, dt)))
         for act in ("relu", "tanh")]


TWIN_SHAPES = [(1, 3), (7, 10), (4099, 33)]  # the last above every threshold but norms'


def _twin_results(shape, dtype):
    """For each kernel with a serial twin: (name, the kernel's results, the twin's), each its return value
    (a loss, or None) and the arrays it was given, outputs written."""
    results = []
    for name, parallel, twin, make in _kernel_pairs():
        a, b = make(*shape, dtype), make(*shape, dtype)
        results.append((name, (parallel(*a), *a), (twin(*b), *b)))
    return results


@pytest.mark.parametrize("shape", TWIN_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_serial_twins_compute_what_their_parallel_kernels_compute(shape, dtype):
    """To the last bits only here: a kernel loaded from Numba's cache next to a twin compiled in this process
    can differ in the last bit (seen: the cross-entropy's dlogits of 7 x 10, 1.2e-7 relative: the process
    that compiled a kernel runs the separately compiled copies of its helpers, a later one the copies in the
    cached object; README, Guarantees). Where the same bits matter
    (the compiled training step), the per-kernel step's own choice runs (``step._scheduled``)."""
    rtol = 8 * np.finfo(dtype).eps
    for name, kernel_results, twin_results in _twin_results(shape, dtype):
        for x, y in zip(kernel_results, twin_results):
            if x is not None:
                np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol * np.abs(x).max(initial=0), err_msg=name)


def test_serial_twins_compiled_beside_their_kernels_match_them_bit_for_bit(tmp_path):
    """Both compiled in one fresh process (an empty cache): the same bits, every kernel, shape and dtype."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import numpy as np; "
            "from test_warmup import TWIN_SHAPES, _twin_results; "
            "print([(name, shape, np.dtype(dtype).name) for shape in TWIN_SHAPES for dtype in (np.float32, np.float64) "
            "for name, a, b in _twin_results(shape, dtype) "
            "if any(np.asarray(x).tobytes() != np.asarray(y).tobytes() for x, y in zip(a, b) if x is not None)])")
    assert _fresh_process(code, tmp_path).stdout.strip() == "[]"


def _compiled(cache, largest):
    """Which variants a warm-up of nn's row kernels compiled in a fresh process: (parallel, serial) names."""
    code = ("import kernels; from kernels.cpu import fused, losses, optim; "
            f"kernels.warmup(dtypes=('float32',), only=('softmax_cross_entropy', 'bias_grad', 'segment_norms', "
            f"'bias_act_backward', 'adam_step'), activations=('relu',), verbose=0, processes=1, largest={largest}); "
            "print([n for n, f in (('ce', losses._cross_entropy), ('bias_grad', losses.bias_grad), "
            "('norms', fused.segment_norms), ('relu', fused._BIAS_ACT_BACKWARD['relu']), ('adam', optim._adam_chunks)) "
            "if f.signatures]); "
            "print([n for n, f in (('ce', losses._cross_entropy_serial), ('bias_grad', losses.bias_grad_serial), "
            "('norms', fused.segment_norms_serial), ('relu', fused._BIAS_ACT_BACKWARD_SERIAL['relu']), "
            "('adam', optim._adam)) if f.signatures])")
    return _fresh_process(code, cache).stdout.splitlines()


def test_a_small_run_compiles_no_threaded_variants(tmp_path):
    everything = "['ce', 'bias_grad', 'norms', 'relu', 'adam']"
    assert _compiled(tmp_path / "small", 1000) == ["[]", everything]
    assert _compiled(tmp_path / "large", 1 << 16) == [everything, everything]


def test_largest_is_checked():
    for bad in (-1, 2.5, True, "10"):
        with pytest.raises(ValueError, match=r"largest must be None or an int >= 0 \(elements\), got"):
            kernels.warmup("numpy", only="relu", largest=bad)


def test_nn_train_compiles_nothing_after_its_warmup(tmp_path):
    """The main job's warm-up covers every kernel and specialisation its training, partial last batch and
    evaluation use: nothing compiles once it has returned (cold cache)."""
    code = ("import kernels, nn.train; from numba.core import event; from kernels import _warmup\n"
            "watch, warmup = _warmup._watch(), kernels.warmup\n"
            "def then_watch(*args, **kwargs):\n"
            "    warmup(*args, **kwargs)\n"
            "    event.register('numba:compile', watch)\n"
            "kernels.warmup = then_watch\n"
            "nn.train.main(['--epochs', '2', '--verbose', '0'])\n"
            "print('compiled after warmup:', watch.compiles)")
    assert _fresh_process(code, tmp_path).stdout.splitlines()[-1] == "compiled after warmup: 0"
