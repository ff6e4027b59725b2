"""The cuda kernels compile for real GPUs, not only run in the simulator.

tests/cuda_ptx.py records every kernel launch of a sweep over the public functions (and a short nn fit)
under the Numba CUDA simulator, then compiles the kernels with the recorded argument types to PTX for
compute capabilities 9.0 and 8.0 in processes without the simulator (see its docstring); float32 kernels
must also be free of float64 instructions. That needs NVRTC and NVVM (the dev extra installs them); where
they cannot be loaded these tests skip, except in CI (CI set), where they fail.
"""

import itertools
import json
import os
import pickle
import subprocess
import textwrap

import numba
import pytest

import cuda_ptx


def _unavailable(reason):
    """Skip, or in CI (which installs the dev extra) fail: NVRTC/NVVM cannot be loaded."""
    (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{reason} (pip install -e '.[dev]' installs them)")


@pytest.fixture(scope="module")
def report():
    result = cuda_ptx.check()
    if result["unavailable"]:
        _unavailable(result["unavailable"])
    return result


def test_the_sweep_launches_every_kernel(report):
    found, launched = set(report["found"]), set(report["launched"])
    assert len(found) >= 26  # kernels/cuda held 26 @kernel definitions when this was written
    assert not found - launched, f"kernels the sweep in tests/cuda_ptx.py never launches: {sorted(found - launched)}"
    assert not launched - found, f"launched, but not found as @kernel in kernels/cuda: {sorted(launched - found)}"


def test_every_kernel_compiles_to_ptx_without_float64_in_float32_kernels(report):
    assert not cuda_ptx.problems(report), "\n\n".join(cuda_ptx.problems(report))
    for cc, results in report["results"].items():  # each cc compiled at least one variant of every kernel
        assert {r["kernel"] for r in results} == set(report["launched"]), cc


def test_a_kernel_the_simulator_runs_but_a_gpu_cannot_compile_is_reported(tmp_path):
    """The compile step on hand-made recipes: a kernel calling a plain Python function (fine in the
    simulator, untyped on a GPU) fails, naming the function; a kernel made by a factory, closing over a
    device function, is rebuilt and compiles."""
    source = textwrap.dedent("""
        from numba import cuda

        def plain(x):
            return x + 1

        @cuda.jit(device=True)
        def device(x):
            return x + 1

        def broken(a):
            a[0] = plain(a[0])

        def factory(fn):
            def closure(a):
                a[0] = fn(a[0])
            return closure
    """)
    (tmp_path / "ptx_probe_kernels.py").write_text(source)
    array = numba.types.Array(numba.float32, 1, "C")
    closure = ("closure", "ptx_probe_kernels", "factory.<locals>.closure",
               source.splitlines().index("    def closure(a):") + 1,
               (("device", ("global", "ptx_probe_kernels", "device")),))
    launches = [(("global", "ptx_probe_kernels", "broken"), (array,)), (closure, (array,))]
    (tmp_path / "launches.pickle").write_bytes(pickle.dumps(launches))
    env = cuda_ptx._env(False)
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    done = subprocess.run(cuda_ptx._command("compile", tmp_path / "launches.pickle", "9.0", "all",
                                            tmp_path / "out.json"), env=env, capture_output=True, text=True)
    if done.returncode == cuda_ptx.UNAVAILABLE:
        _unavailable(done.stderr.strip())
    assert done.returncode == 0, done.stderr
    broken, closure = json.loads((tmp_path / "out.json").read_text())
    assert broken["kernel"] == "ptx_probe_kernels:broken" and "plain" in broken["error"], broken
    assert closure["error"] is None and closure["variant"] == "device", closure


@pytest.mark.parametrize("strength", [1, 2])
def test_cover_keeps_every_recorded_value_or_pair(strength):
    launches = [(("closure", "m", "f.<locals>.k", 1, (("value", a), ("value", b))), (numba.float32, c))
                for a in range(3) for b in range(2) for c in (numba.float32, numba.float64)] * 2
    chosen = cuda_ptx.cover(launches, strength)

    def combos(subset):
        return {pair for (_, _, _, _, (a, b)), (_, c) in subset
                for pair in itertools.combinations(((0, a), (1, b), (2, repr(c))), strength)}

    assert combos(chosen) == combos(launches)
    assert len(chosen) == (3 if strength == 1 else 6)  # the fewest that cover: 3 values of a; 3 x 2 pairs
    assert cuda_ptx.cover(launches, None) == launches
