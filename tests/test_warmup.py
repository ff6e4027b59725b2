"""kernels.warmup: says what it compiles (stderr), only what is asked, silent when cached or verbose=0."""

import os
import subprocess
import sys

import pytest

import kernels


def _warmup(cache, verbose=1, processes=2, only=("bias_grad", "adam_step")):
    code = (f"import kernels; kernels.warmup(dtypes=('float32',), only={only!r}, "
            f"verbose={verbose}, processes={processes})")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "NUMBA_CACHE_DIR": str(cache)})


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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)})
    assert out.stdout.strip() == "['relu']"


def test_activations_are_checked():
    with pytest.raises(ValueError, match=r"activations must be among .*got \['gelu'\]"):
        kernels.warmup(activations=("gelu",))
