"""The GEMM's register tile and blocking for this CPU, chosen once at import from what LLVM reports.

A configuration is a variant of the micro-kernel (a register tile, see ``_gemm.TILES``) and its blocking:
``kc`` (the K block), ``nc_bytes`` (the packed B block of ``kc`` rows, in bytes: it sets the N block)
and ``mc`` (the fewest rows of ``out`` in a chunk of the multithreaded split, where it cuts rows: each
row block packs B again). A is not packed, so there is no M block in the serial loops.

Per CPU (LLVM's host CPU name, as ``llc -mcpu`` spells it):

- ``znver5`` (Zen 5): ``avx512``. Two full 512-bit FMA pipes: zmm tiles double the flops per
  instruction over ymm; the 256-bit kernel reached half of XLA's rate there.
- ``znver4`` (Zen 4): ``avx512vl``. Its 512-bit operations are double-pumped on 256-bit pipes, so zmm
  brings no more flops per cycle. Measured on an EPYC Zen 4 (L1d 32 KiB, L2 1 MiB per core), one
  thread, variants and blockings alternated call by call (KC 256-512 x 256-768 KiB of packed B): every
  combination at 95-107 GFLOP/s on 1024^3 and the training shapes, within the run's noise of each other
  and of OpenBLAS's SkylakeX kernels (97-99); the zmm tile 0-4% ahead (one outlier: the avx2 tile once at
  80 on 256 x 1024 x 784). On two threads the shared host's spread (140-200) hid any difference, so the ymm
  tile and blocking stay.
- Intel AVX-512 server cores: ``avx512``. Most have two 512-bit FMA ports (ports 0+1 fused and
  port 5); where only one exists the zmm tile still matches the ymm one's flops. Not measured.
- ``znver3``, ``znver2``, ``znver1`` and every other CPU with AVX2 but no AVX-512: ``avx2``, the 6 x 16 tile of
  16 ymm registers (the 6 x 32 tile spills half its accumulators to the stack there). Blocking measured on
  Zen 3 and on Zen 1 (both L1d 32 KiB, L2 512 KiB per core; 2 threads, blockings alternated call by call):
  KC 384 and 192 KiB of packed B there (on Zen 1 2-6% over the default blocks on 7 of 9 training shapes, 3%
  under on one; 65-70 GFLOP/s, XLA 73); Zen 2, with the same caches, takes it unmeasured. Other AVX2 CPUs keep
  the smaller default blocks (KC 128, 128 KiB: a 256 KiB L2 holds them).
  Row blocks of at least 192 rows on both (a 128-row x @ W split into 2 x 2 chunks packed W twice).
- any other CPU: with AVX-512VL ``avx512vl`` (safe: no frequency licence, 32 registers), else ``avx2``,
  the smallest register tile, correct on any x86-64 CPU (LLVM splits the vectors where it must).

Override: ``KERNELS_GEMM_VARIANT=avx2|avx512vl|avx512`` in the environment before ``import kernels``
forces a variant (with that variant's default blocking unless it is the CPU's own choice). Every
variant is correct on any CPU; a forced wider one is only slower where the CPU lacks the registers.

NumPy's BLAS library, on which the numpy backend's bits depend: :func:`numpy_blas`.
"""

import os

from llvmlite import binding as llvm

from ._gemm import TILES, VARIANTS

ENV_VARIANT = "KERNELS_GEMM_VARIANT"

# variant -> default blocking (kc, nc_bytes, mc)
DEFAULT_BLOCKING = {
    "avx2": (128, 128 * 1024, 192),
    "avx512vl": (512, 512 * 1024, 96),
    "avx512": (512, 512 * 1024, 96),
}
# LLVM CPU name -> (variant, blocking); CPUs not listed are chosen by their features (see the docstring)
CPUS = {
    **{name: ("avx2", (384, 192 * 1024, 192)) for name in ("znver1", "znver2", "znver3")},
    "znver4": ("avx512vl", DEFAULT_BLOCKING["avx512vl"]),
    "znver5": ("avx512", DEFAULT_BLOCKING["avx512"]),
    **{name: ("avx512", DEFAULT_BLOCKING["avx512"])
       for name in ("skylake-avx512", "cascadelake", "cooperlake", "icelake-server", "sapphirerapids",
                    "emeraldrapids", "graniterapids", "graniterapids-d")},
}


def choose(cpu, features, forced=None):
    """``(variant, (kc, nc_bytes, mc))`` for LLVM CPU name ``cpu`` with feature names ``features`` (a set
    of strings such as ``"avx512f"``), or for the ``forced`` variant (an override)."""
    if cpu in CPUS:
        variant, blocking = CPUS[cpu]
    else:
        variant = "avx512vl" if {"avx512f", "avx512vl"} <= features else "avx2"
        blocking = DEFAULT_BLOCKING[variant]
    if forced:
        if forced not in VARIANTS:
            raise ValueError(f"{ENV_VARIANT}: expected one of {', '.join(VARIANTS)}, got {forced!r}")
        if forced != variant:
            variant, blocking = forced, DEFAULT_BLOCKING[forced]
    return variant, blocking


def _host():
    features = llvm.get_host_cpu_features()
    return llvm.get_host_cpu_name(), {name for name, on in features.items() if on}


CPU, FEATURES = _host()
FORCED = os.environ.get(ENV_VARIANT) or None
VARIANT, (KC, NC_BYTES, MC) = choose(CPU, FEATURES, FORCED)
VARIANT_INDEX = VARIANTS.index(VARIANT)


def cpu_info():
    """What the CPU GEMM runs with here: LLVM's CPU name, the widest vector it supports (bits), the
    chosen variant and whether it was forced, the register tiles (MR x NR per dtype) and the blocking."""
    width = 512 if "avx512f" in FEATURES else 256 if "avx2" in FEATURES else 128
    (mr32, nr32, lanes32), (mr64, nr64, _) = TILES[VARIANT]
    return {"cpu": CPU, "vector_bits": width, "gemm_variant": VARIANT,
            "gemm_variant_forced": FORCED is not None,
            "gemm_vector_bits": 32 * lanes32, "tile_float32": (mr32, nr32), "tile_float64": (mr64, nr64),
            "kc": KC, "nc_bytes": NC_BYTES, "mc": MC}


def numpy_blas(any_blas=False):
    """NumPy's BLAS library as threadpoolctl reports it: the first BLAS entry of ``threadpool_info()`` loaded
    from NumPy's files (PyTorch may have loaded another), a dict (``internal_api``, ``version``,
    ``architecture``, ``filepath``...); where there is none, with ``any_blas`` the first BLAS entry of any
    library, else None (None too where no BLAS is loaded). threadpoolctl is optional (the dev extra):
    ImportError without it."""
    from threadpoolctl import threadpool_info

    blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
    own = [lib for lib in blas if "numpy" in lib["filepath"]]
    if own:
        return own[0]
    return blas[0] if any_blas and blas else None
