"""Numba's threading layer, chosen once when the numba backend loads.

Order: ``tbb`` (work-stealing; safe under ``fork()`` and under parallel calls from several Python
threads), then ``omp`` (GNU OpenMP: thread-safe, but a child forked after a parallel kernel is killed),
then ``workqueue`` (always loads; aborts when two Python threads run parallel kernels at once). The pip
package ``tbb`` puts libtbb in ``<prefix>/lib`` (``<prefix>/Library/bin`` on Windows), where the dynamic
loader does not look, so Numba reports it unavailable; loading it here first, globally, lets Numba's
``tbbpool`` resolve it. A layer the user chose (``NUMBA_THREADING_LAYER``,
``NUMBA_THREADING_LAYER_PRIORITY`` or ``numba.config.THREADING_LAYER``) is left as it is.
"""

import ctypes
import importlib
import os
import sys
import warnings

ORDER = ("tbb", "omp", "workqueue")
_POOL_MODULES = {"tbb": "tbbpool", "omp": "omppool", "workqueue": "workqueue"}
_LIBTBB = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib", "win32": "tbb12.dll"}
_TBB_MIN_INTERFACE = 12060  # Numba's floor: TBB 2021 update 6
_RISKS = {
    "omp": "a process forked after a parallel kernel ran (multiprocessing's fork start method, data-loader "
           "workers) is killed by GNU OpenMP",
    "workqueue": "two Python threads calling parallel kernels at once abort the process",
}


class ThreadingLayerWarning(UserWarning):
    """The threading layer in use is not safe under fork or under concurrent calls."""


_chosen = None  # (layer, who chose it), once setup() ran


def _preload_tbb():
    """Load the pip package's libtbb with RTLD_GLOBAL; True when a compatible one is loaded."""
    name = _LIBTBB.get(sys.platform)
    if name is None:
        return False
    for folder in (os.path.join(sys.prefix, "lib"), os.path.join(sys.prefix, "Library", "bin")):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        try:
            if sys.platform == "win32":
                os.add_dll_directory(folder)
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            lib.TBB_runtime_interface_version.restype = ctypes.c_int
            return lib.TBB_runtime_interface_version() >= _TBB_MIN_INTERFACE
        except (OSError, AttributeError):
            return False
    return False


def _loads(layer):
    """Whether Numba can load ``layer`` (imports its pool module; starts no threads)."""
    try:
        importlib.import_module(f"numba.np.ufunc.{_POOL_MODULES[layer]}")
    except ImportError:
        return False
    return True


def setup():
    """Pick the threading layer before Numba starts its threads; returns ``(layer, chosen_by)``."""
    global _chosen
    if _chosen is not None:
        return _chosen
    import numba
    from numba.np.ufunc import parallel

    tbb_ok = _preload_tbb()
    requested = str(numba.config.THREADING_LAYER).lower()
    if parallel._is_initialized:  # a parallel function ran before kernels loaded: its layer stays
        _chosen = (parallel.threading_layer(), "already started")
    elif requested != "default" or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ:
        _chosen = (requested, "user")
    else:
        layer = next(name for name in ORDER if (tbb_ok or name != "tbb") and _loads(name))
        numba.config.THREADING_LAYER = layer
        _chosen = (layer, "kernels")
        if layer in _RISKS:
            warnings.warn(
                f"kernels: Numba threading layer {layer!r} in use because TBB did not load; {_RISKS[layer]}. "
                "Install TBB (pip install 'tbb>=2021.6') for a fork- and thread-safe layer, or set "
                "NUMBA_THREADING_LAYER to choose one knowingly (that also silences this warning).",
                ThreadingLayerWarning, stacklevel=2)
    return _chosen


def threading_info():
    """The threading layer parallel kernels run on and its thread count.

    Returns a dict: ``layer`` ("tbb", "omp" or "workqueue"), ``threads`` (``numba.get_num_threads()``
    of the calling thread), ``chosen_by`` ("kernels", "user" or "already started"), ``fork_safe`` and
    ``thread_safe``. Starts Numba's thread pool if it is not running yet.
    """
    import numba

    _, chosen_by = setup()
    threads = numba.get_num_threads()  # starts the pool, so the layer below is the one actually loaded
    layer = numba.threading_layer()
    return {"layer": layer, "threads": threads, "chosen_by": chosen_by,
            "fork_safe": layer == "tbb", "thread_safe": layer != "workqueue"}
