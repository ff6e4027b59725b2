"""A training step's bookkeeping, kept where the kernels run: a small float64 ``metrics`` buffer that the
kernels below write every step and the host reads only now and then (no device-to-host copy per step).

Layout for a model with ``L`` parameter layers (:func:`size` elements, zeroed at the start of an epoch):

- ``metrics[LOSS]``: the sum of loss * rows over the steps that were applied;
- ``metrics[CORRECT]``: the rows predicted correctly (:func:`count_correct`);
- ``metrics[STEPS]``: the steps checked (:func:`check_step`);
- ``metrics[BAD_STEP]``: the first step (counting from 1) whose loss or a norm was NaN/Inf, 0 while none;
- ``metrics[BAD_LOSS]``: that step's loss;
- ``metrics[NORMS:NORMS + L]``: each layer's gradient norm summed over the applied steps;
- ``metrics[NORMS + L:NORMS + 2 * L]``: that bad step's norms.
"""

import math

import numpy as np

LOSS, CORRECT, STEPS, BAD_STEP, BAD_LOSS, NORMS = range(6)


def size(layers):
    """The length of the metrics buffer of a model with ``layers`` parameter layers."""
    return NORMS + 2 * layers


def count_correct(output, target, threshold, metrics):
    """``metrics[CORRECT] +=`` the rows of ``output`` (N, C) that predict ``target``: integer class labels (N,)
    match the row's argmax (the first maximum; NaN counts as the maximum, as in ``np.argmax``), float
    targets (N, C) have every output on their side of 0 (``(output > 0) == (target > threshold)``)."""
    if target.ndim == 1:
        right = output.argmax(axis=1) == target if output.shape[1] else np.zeros(len(target), bool)
    else:
        right = ((output > 0) == (target > threshold)).all(axis=1)
    metrics[CORRECT] += np.count_nonzero(right)


def check_step(loss, rows, norms, max_norm, metrics, scale):
    """Record one step in ``metrics`` and write the optimizer's gradient scale to ``scale[0]``.

    A step whose loss and norms are finite, with no bad step before it, adds ``loss * rows`` and its
    norms to the sums and gets the scale that clips the global norm ``sqrt(sum(norms**2))`` to
    ``max_norm`` (``max_norm / (total + 1e-6)`` when above it, else 1; ``inf``: no clipping). Any other
    step gets scale 0, which the optimizer kernels read as "skip"; the first such step is recorded."""
    metrics[STEPS] += 1
    layers = norms.size
    if metrics[BAD_STEP] == 0 and math.isfinite(loss) and np.isfinite(norms).all():
        metrics[LOSS] += float(loss) * rows
        metrics[NORMS:NORMS + layers] += norms
        total = math.sqrt(np.sum(norms**2))
        scale[0] = max_norm / (total + 1e-6) if total > max_norm else 1.0
        return
    if metrics[BAD_STEP] == 0:
        metrics[BAD_STEP] = metrics[STEPS]
        metrics[BAD_LOSS] = loss
        metrics[NORMS + layers:NORMS + 2 * layers] = norms
    scale[0] = 0.0
