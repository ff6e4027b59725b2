"""The one place that picks the array namespace ``xp`` for nn's glue code.

Parameters, gradients, optimizer state and batches live where the kernels run: NumPy arrays for the
``numpy`` and ``numba`` backends, CuPy arrays for ``cuda`` (the kernels dispatch on the arrays). The
remaining glue (allocation, host/device copies, argmax for accuracy, the non-finite diagnostics) is
written against ``xp`` so it runs on either. CuPy is needed only for ``cuda``.
"""

import numpy as np

import kernels


def namespace(backend=None):
    """The array module for ``backend`` (default: the kernels' current backend)."""
    backend = backend or kernels.get_backend()
    if backend != "cuda":
        return np
    try:
        import cupy
    except ImportError as exc:
        raise ImportError("nn on the cuda backend keeps its arrays on the GPU with CuPy, which is not "
                          "installed (pip install kernels-nn[cuda])") from exc
    return cupy


def namespace_of(a):
    """The array module an existing array belongs to."""
    return namespace("cuda") if kernels.is_device_array(a) else np


def to_host(a):
    """A NumPy array with the values of ``a`` (a copy from the device, or ``a`` itself on the host)."""
    return a.get() if kernels.is_device_array(a) else np.asarray(a)
