"""The profiler: every kernel of the contract profiles on each backend, and the numbers are consistent."""

import io
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest

import kernels
from kernels import profile

KERNELS = [name for name in kernels.__all__ if name not in
           ("set_backend", "get_backend", "use_backend", "is_device_array", "warmup", "cpu_info",
                                       "threading_info", "metrics_size", "unpack_metrics")]


def _profiled(rows):
    return {r["kernel"].split()[0].split("+")[0] for r in rows}


def _check_rows(rows):
    sizes = profile.SIZES["smoke"]
    assert _profiled(rows) == set(KERNELS)
    for r in rows:
        assert r["median_ms"] > 0 and r["first_ms"] > 0
        assert (r["gflops"] is not None) == r["kernel"].startswith("matmul")
    relu = next(r for r in rows if r["kernel"] == "relu")
    assert relu["gbs"] * relu["median_ms"] * 1e6 == pytest.approx(2 * sizes["n"] * 4)  # read x, write out
    gemm = next(r for r in rows if r["kernel"] == "matmul")
    assert gemm["gflops"] * gemm["median_ms"] * 1e6 == pytest.approx(2 * sizes["gemm"] ** 3)


@pytest.mark.cuda
def test_profile_cuda_runs_every_kernel_and_flags_the_simulator():
    from numba import cuda

    if not cuda.is_available():
        pytest.skip("no CUDA device and the simulator is off")
    out = io.StringIO()
    rows = profile.profile("cuda", "smoke", file=out)
    _check_rows(rows)
    text = out.getvalue()
    from kernels.cuda._launch import SIMULATOR

    assert ("timings are meaningless" in text) == SIMULATOR
    for r in rows:
        assert r["kernel"] in text


@pytest.mark.cuda
def test_cuda_timing_queues_device_work_ahead_of_the_timed_call():
    """The events bracket the kernel only when device work is queued before them (else the host's launch
    cost is timed): the queued kernel runs its steps, in the stream ahead of the call."""
    from numba import cuda

    if not cuda.is_available():
        pytest.skip("no CUDA device and the simulator is off")
    dev = profile._Device()
    dev.queue_ahead(steps=3)
    assert dev.busy_out.copy_to_host()[0] == np.float32(1.75)  # 0 -> 1 -> 1.5 -> 1.75
    dev.queue_ahead(steps=1)
    assert dev.busy_out.copy_to_host()[0] == np.float32(1.875)


def test_command_line_on_numba_filters_kernels():
    """The host path (wall clock, memory and GEMM roofs), on two kernels to keep compilation short."""
    result = subprocess.run([sys.executable, "-m", "kernels.profile", "--smoke", "--only", "adam", "dropout"],
                            capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("backend numba, float32, shapes 'smoke'; roofs: a copy with each kernel's threads")
    assert "best GEMM peer" in lines[0] and "NumPy BLAS" in lines[0] and "meaningless" not in result.stdout
    assert [line.split()[0] for line in lines[2:]] == ["dropout", "adam_step"]
    for line in lines[2:]:
        numbers, roof = line.split("%")[0].split()[2:], line.split("%")[1]
        assert all(float(x) > 0 for x in numbers)
        kind = "in-place update" if line.startswith("adam_step") else "copy"  # an optimizer updates in place
        assert f"1-thread {kind} of" in roof and "(cache-resident)" in roof  # 1000 elements: serial kernels


def test_memory_roof_matches_threads_and_working_set():
    import numba

    small = profile.memory_roof(2**18)  # 256 KiB moved: below the parallel threshold, in cache
    assert small.value > 0 and small.what == "1-thread copy of 256 KiB (cache-resident)"
    big = profile.memory_roof(3 * profile.l3_bytes())  # well beyond the L3: from DRAM, on every thread
    assert big.what == f"{numba.get_num_threads()}-thread copy of {3 * profile.l3_bytes() // 2**20} MiB (DRAM)"
    assert profile.memory_roof(2**18) is small  # measured once per run and reused


def test_gemm_roof_is_the_best_peer_and_says_so():
    roof = profile.gemm_roof({"NumPy BLAS": 250.0, "XLA": 480.5, "torch": None})
    assert roof.value == 480.5
    assert roof.what == "best GEMM peer XLA (NumPy BLAS 250, XLA 480 GFLOP/s)"
    assert profile.gemm_roof({}) is None


def _map_entries(path):
    entries = []
    for line in open(path):
        start, size, name = line.rstrip("\n").split(" ", 2)
        entries.append((int(start, 16), int(size, 16), name))
    return entries


def test_perf_map_names_every_compiled_function(tmp_path):
    from kernels.cpu._gemm import body
    from kernels.cpu.activations import _relu_kernel as relu

    kernels.relu(np.ones(5, np.float32))  # compiled or loaded in this process
    gemm_body = body(np.dtype(np.float32))  # a cfunc's address: its C wrapper
    path = profile.perf_map(str(tmp_path / "perf.map"))
    entries = _map_entries(path)
    starts = [start for start, _, _ in entries]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert all(start + size <= following for (start, size, _), following in zip(entries, starts[1:]))
    assert all(0 < size <= profile.PERF_MAP_MAX for _, size, _ in entries)
    for result in relu.overloads.values():
        address = result.library.get_pointer_to_function(result.fndesc.llvm_func_name)
        start, _, name = next(entry for entry in entries if entry[0] == address)
        assert name.startswith(f"kernels.cpu.activations.relu({result.fndesc.argtypes[0]}, ")
    wrapper = next(name for start, _, name in entries if start == gemm_body)
    assert wrapper.startswith("kernels.cpu._gemm._block(") and wrapper.endswith(" (C wrapper)")
    assert any(name == wrapper.removesuffix(" (C wrapper)") for _, _, name in entries)  # the function it calls


def test_perf_map_survives_what_gc_holds(tmp_path):
    """The scan of gc's objects meets dead weakref proxies (isinstance on one raises ReferenceError)."""
    class Target:
        pass

    kernels.relu(np.ones(5, np.float32))
    target = Target()
    proxies = [weakref.proxy(target)]
    del target
    assert proxies and _map_entries(profile.perf_map(str(tmp_path / "perf.map")))


def test_perf_map_written_at_exit_when_asked(tmp_path):
    code = "import numpy as np, kernels; kernels.relu(np.ones(5, np.float32))"
    for setting, written in (("1", True), ("0", False)):
        child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "KERNELS_PERF_MAP": setting})
        assert child.wait(timeout=300) == 0
        path = f"/tmp/perf-{child.pid}.map"
        try:
            assert os.path.exists(path) == written
            if written:
                assert any(name.startswith("kernels.cpu.activations.relu(") for _, _, name in _map_entries(path))
        finally:
            if os.path.exists(path):
                os.remove(path)


def test_command_line_writes_the_perf_map():
    result = subprocess.run([sys.executable, "-m", "kernels.profile", "--smoke", "--only", "relu", "--perf-map"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip().splitlines()[-1].removeprefix("perf map: ")
    try:
        assert any("relu" in name for _, _, name in _map_entries(path))
    finally:
        os.remove(path)
