"""Losses: each wraps one fused kernel returning ``(loss, d loss / d output)``, validates targets
before training, and knows how to score accuracy when it is a classification loss."""

import numpy as np

import kernels


class Loss:
    """Base class: ``loss(output, target) -> (loss scalar, doutput)``."""

    name = None
    kernel = None
    classification = True
    threshold = None  # binary losses: targets above it are the positive class, and outputs above 0 predict it

    def __call__(self, output, target):
        return getattr(kernels, self.kernel)(output, target)

    def compute(self, k, output, target, doutput):
        """The loss (a scalar of the output's dtype) with ``doutput`` written, by backend module ``k``'s
        kernel on validated, C-contiguous arrays (the training step's unchecked path)."""
        return getattr(k, self.kernel)(output.reshape(-1), target.reshape(-1), doutput.reshape(-1))

    def prepare_targets(self, y, n_outputs, dtype, what="y"):
        """Validate host targets for a model with ``n_outputs`` outputs; return them as the kernel wants.

        Float targets shaped like the outputs; a 1-D vector is accepted for a one-output model.
        """
        y = np.asarray(y)
        if y.dtype.kind not in "biuf":
            raise TypeError(f"{what} must be numeric, got dtype {y.dtype}")
        if y.ndim == 1 and n_outputs == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[1] != n_outputs:
            raise ValueError(f"{what} must have shape (n, {n_outputs}) to match the model's {n_outputs} outputs "
                             f"for {self.name}, got {y.shape}")
        y = y.astype(dtype)
        check_finite(y, what)
        self.check_values(y, what)
        return y

    def check_values(self, y, what):
        """Raise when a target value is outside what the loss accepts."""

    def count_correct(self, k, output, target, metrics):
        """Add the rows predicted right to the correct count of the device ``metrics`` buffer (see
        ``kernels.check_step``), by backend module ``k``'s kernel: every output on the side of 0 that its
        target is of ``threshold`` (class labels: the argmax)."""
        k.count_correct(output, target, self.threshold or 0.0, metrics)


def check_finite(a, what):
    bad = ~np.isfinite(a)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what} contains {a[where]} at index {where} ({int(bad.sum())} non-finite values); "
                         "remove or impute them before training")


class SoftmaxCrossEntropy(Loss):
    """Cross-entropy of softmax(logits) against integer class labels (the fused kernel)."""

    name = "softmax_cross_entropy"
    kernel = "softmax_cross_entropy"

    def prepare_targets(self, y, n_outputs, dtype, what="y"):
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError(f"{what} must be a 1-D array of class labels, got shape {y.shape}")
        if y.dtype.kind == "f":
            check_finite(y, what)
            if np.any(y != np.round(y)):
                i = int(np.argmax(y != np.round(y)))
                raise ValueError(f"{what} must hold integer class labels, got {y[i]} at index {i}")
        elif y.dtype.kind not in "biu":
            raise TypeError(f"{what} must hold integer class labels, got dtype {y.dtype}")
        if n_outputs < 2:
            raise ValueError(f"softmax cross-entropy needs a model with at least 2 outputs, got {n_outputs}")
        bad = (y < 0) | (y >= n_outputs)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{what} has label {y[i]} at index {i}, outside [0, {n_outputs}) for a model with "
                             f"{n_outputs} outputs ({int(bad.sum())} labels out of range)")
        return y.astype(np.int64)

    def compute(self, k, output, target, doutput):
        return k.softmax_cross_entropy(output, target, doutput)


class MSE(Loss):
    """Mean squared error over all outputs (regression; no accuracy)."""

    name = "mse"
    kernel = "mse"
    classification = False


class BinaryCrossEntropy(Loss):
    """Binary cross-entropy on logits (stable), targets in [0, 1]; a logit > 0 predicts 1."""

    name = "binary_cross_entropy"
    kernel = "binary_cross_entropy"
    threshold = 0.5

    def check_values(self, y, what):
        bad = (y < 0) | (y > 1)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{what} must be in [0, 1] for binary cross-entropy, got {y[where]} at {where}")


class Hinge(Loss):
    """Hinge loss max(0, 1 - t * s) with targets in {-1, +1}; a score > 0 predicts +1."""

    name = "hinge"
    kernel = "hinge"
    threshold = 0

    def check_values(self, y, what):
        bad = (y != 1) & (y != -1)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{what} must hold only -1 and +1 for the hinge loss, got {y[where]} at {where}")


LOSSES = {cls.name: cls for cls in (SoftmaxCrossEntropy, MSE, BinaryCrossEntropy, Hinge)}


def get(loss):
    """A loss instance from a name (``softmax_cross_entropy``, ``mse``, ``binary_cross_entropy``,
    ``hinge``) or an instance."""
    if isinstance(loss, Loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)} or a Loss instance, got {loss!r}")
    return LOSSES[loss]()
