"""Reliability: the threading layer, fork after parallel kernels, Python threads calling kernels at once,
and bitwise determinism of every reduction across thread counts.

Fork and thread-count tests run in a fresh interpreter (``subprocess`` with a timeout): a child killed by
the threading layer, or a hang, then fails the test instead of taking pytest down with it.
"""

import os
import subprocess
import sys
import textwrap
import threading
from importlib import metadata

import numpy as np
import pytest

import kernels
from helpers import assert_close, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, timeout=240, **env):
    """Run ``code`` in a fresh interpreter from the repository root; returns its stdout."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})
    assert proc.returncode == 0, f"exit status {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_threading_info_reports_the_loaded_layer():
    info = kernels.threading_info()
    import numba
    assert info["layer"] == numba.threading_layer()
    assert info["threads"] == numba.get_num_threads() >= 1
    assert info["fork_safe"] == (info["layer"] == "tbb")
    assert info["thread_safe"] == (info["layer"] != "workqueue")


def test_tbb_is_chosen_when_installed():
    try:
        metadata.distribution("tbb")
    except metadata.PackageNotFoundError:
        pytest.skip("the pip package tbb (the fork-safe layer) is not installed on this platform")
    out = run_python("""
        import kernels
        info = kernels.threading_info()
        print(info["layer"], info["chosen_by"])
    """, NUMBA_THREADING_LAYER="default")
    assert out.split() == ["tbb", "kernels"]


def test_user_choice_is_respected():
    out = run_python("""
        import kernels
        info = kernels.threading_info()
        print(info["layer"], info["chosen_by"], info["fork_safe"])
    """, NUMBA_THREADING_LAYER="workqueue")
    assert out.split() == ["workqueue", "user", "False"]


def test_fallback_without_tbb_warns_about_fork():
    out = run_python("""
        import warnings
        import kernels._threading as t
        t._preload_tbb = lambda: False  # as on a machine without TBB
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer, chosen_by = t.setup()
        print(layer, chosen_by)
        print(*[str(w.message) for w in caught if issubclass(w.category, t.ThreadingLayerWarning)])
    """, NUMBA_THREADING_LAYER="default")
    first, message = out.split("\n", 1)
    assert first.split() == ["omp", "kernels"]
    assert "fork" in message and "pip install" in message


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_fork_after_parallel_kernels(backend_name):
    """A fork child (multiprocessing's fork start method) runs kernels after the parent ran parallel ones."""
    out = run_python(f"""
        import multiprocessing as mp
        import numpy as np
        import kernels

        def work(seed):
            rng = np.random.default_rng(seed)
            a = rng.standard_normal((256, 256)).astype(np.float32)
            x = rng.standard_normal(1 << 18).astype(np.float32)
            p, g, m, v = (rng.standard_normal(1 << 17).astype(np.float32) for _ in range(4))
            v = np.abs(v)
            kernels.adam_step(p, g, m, v, step=1)
            return float(kernels.matmul(a, a, activation="relu").sum() + kernels.relu(x).sum() + p.sum())

        if __name__ == "__main__":
            kernels.set_backend("{backend_name}")
            parent = work(0)  # parallel kernels run in the parent before the fork
            with mp.get_context("fork").Pool(2) as pool:
                children = pool.map(work, [0, 0, 1])
            print(parent == children[0] == children[1], children[2] != parent)
    """, timeout=300)
    assert out.split() == ["True", "True"]


def test_python_threads_hammering_kernels_at_once():
    """4 Python threads run matmul, activations and optimizer steps concurrently: every result right."""
    rng = np.random.default_rng(0)
    jobs = []
    for t in range(4):
        a = rng.standard_normal((192, 160)).astype(np.float32)
        b = rng.standard_normal((160, 128)).astype(np.float32)
        x = rng.standard_normal(1 << 18).astype(np.float32)
        p, g, m = (rng.standard_normal(1 << 17).astype(np.float32) for _ in range(3))
        v = np.abs(rng.standard_normal(1 << 17)).astype(np.float32)
        jobs.append((a, b, x, p, g, m, v))

    def expected(a, b, x, p, g, m, v):
        p, m, v = p.copy(), m.copy(), v.copy()
        for step in range(1, 4):
            reference(kernels.adam_step, p, g, m, v, step=step)
        return reference(kernels.matmul, a, b, activation="tanh"), reference(kernels.sigmoid, x), p

    wanted = [expected(*job) for job in jobs]
    errors, barrier = [], threading.Barrier(4)

    def hammer(i):
        a, b, x, p, g, m, v = jobs[i]
        p, m, v = p.copy(), m.copy(), v.copy()
        try:
            barrier.wait()
            with kernels.use_backend("numba"):
                for step in range(1, 4):
                    y = kernels.matmul(a, b, activation="tanh")
                    s = kernels.sigmoid(x)
                    kernels.adam_step(p, g, m, v, step=step)
            for got, want in zip((y, s, p), wanted[i]):
                assert_close(got, want, rtol=1e-4, atol=1e-5)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


def test_reductions_bitwise_equal_across_thread_counts():
    """Every kernel that sums (losses, bias_grad, softmax rows, matmul) gives the same bits on 1, 2 and 3
    threads, on shapes large enough for the parallel path."""
    out = run_python("""
        import numba
        import numpy as np
        import kernels

        rng = np.random.default_rng(1)
        results = {}
        for threads in (1, 2, 3):
            numba.set_num_threads(threads)
            for dtype in (np.float32, np.float64):
                rng = np.random.default_rng(1)
                x = (rng.standard_normal((700, 1031)) * 3).astype(dtype)
                t = rng.standard_normal((700, 1031)).astype(dtype)
                s = np.sign(t) + (t == 0)
                labels = rng.integers(0, 1031, 700)
                w = rng.standard_normal((1031, 300)).astype(dtype)
                y = kernels.softmax(x)
                got = [kernels.mse(x, t)[0], kernels.binary_cross_entropy(x, t)[0], kernels.hinge(x, s)[0],
                       *kernels.softmax_cross_entropy(x, labels), kernels.bias_grad(x), y,
                       kernels.softmax_backward(y, t), kernels.matmul(x, w)]
                results.setdefault(np.dtype(dtype).name, []).append(got)
        for name, runs in results.items():
            for i, first in enumerate(runs[0]):
                for other in runs[1:]:
                    assert np.asarray(first).tobytes() == np.asarray(other[i]).tobytes(), (name, i)
        print("ok", numba.get_num_threads())
    """, NUMBA_NUM_THREADS="3")
    assert out.split() == ["ok", "3"]


def test_dynamic_scheduling_leaves_the_callers_chunk_size_alone():
    import numba
    x = np.linspace(-1, 1, 1 << 18, dtype=np.float32)
    with kernels.use_backend("numba"):
        numba.set_parallel_chunksize(7)
        try:
            kernels.relu(x)
            kernels.mse(x, x)
            assert numba.get_parallel_chunksize() == 7
        finally:
            numba.set_parallel_chunksize(0)


def test_num_threads_reads_what_numba_get_num_threads_says():
    """``_parallel.num_threads`` (the threading layer's getter, without numba's locks) follows
    ``numba.set_num_threads`` on this thread and starts other threads at the default count, as numba does."""
    import numba

    from kernels.cpu._parallel import num_threads

    before = numba.get_num_threads()
    try:
        for n in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(n)
            assert num_threads() == numba.get_num_threads() == n
        numba.set_num_threads(1)
        seen = []
        worker = threading.Thread(target=lambda: seen.append((num_threads(), numba.get_num_threads())))
        worker.start()
        worker.join()
        assert seen[0][0] == seen[0][1]
    finally:
        numba.set_num_threads(before)
