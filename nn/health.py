"""Gradient health: per-layer gradient norms, warnings when they vanish or explode, and the error
raised when training meets NaN or Inf (instead of training on garbage)."""

import warnings


class GradientWarning(UserWarning):
    """Gradients of some layers vanished or exploded (training goes on; the message says which)."""


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN or Inf; the message names the layer, epoch and step."""


class GradientHealth:
    """Warn (once per ``fit`` and kind) from the per-epoch mean gradient norm of each layer.

    Vanishing: a layer below the top parameter layer has a norm under ``vanish_ratio`` times the top
    layer's, so it barely learns (deep sigmoid stacks, too-small initialisation). Exploding: any layer's
    norm exceeds ``explode_norm`` (too-large learning rate or initialisation; try ``clip_norm``).
    """

    def __init__(self, vanish_ratio=1e-4, explode_norm=1e3):
        self.vanish_ratio, self.explode_norm = float(vanish_ratio), float(explode_norm)
        self.warned = set()

    def reset(self):
        self.warned = set()

    def check(self, norms, epoch, clip_norm=None):
        """``norms``: {layer name: mean gradient norm this epoch, before clipping}, bottom to top;
        ``clip_norm``: the trainer's (the advice then is not to clip)."""
        names = list(norms)
        top = norms[names[-1]]
        vanished = [n for n in names[:-1] if norms[n] < self.vanish_ratio * top]
        exploded = [n for n in names if norms[n] > self.explode_norm]
        if vanished and "vanish" not in self.warned:
            self.warned.add("vanish")
            detail = ", ".join(f"{n}: {norms[n]:.2e}" for n in vanished)
            warnings.warn(f"epoch {epoch}: gradients vanish in lower layers ({detail}; top layer {names[-1]}: "
                          f"{top:.2e}); they barely learn. Try relu with He initialisation, BatchNorm, or "
                          "fewer layers", GradientWarning, stacklevel=3)
        if exploded and "explode" not in self.warned:
            self.warned.add("explode")
            detail = ", ".join(f"{n}: {norms[n]:.2e}" for n in exploded)
            advice = ("Lower the learning rate or clip gradients (clip_norm=...)" if clip_norm is None else
                      f"Lower the learning rate (these are the norms before clipping to clip_norm={clip_norm:g})")
            warnings.warn(f"epoch {epoch}: gradients explode ({detail} > {self.explode_norm:g}). {advice}",
                          GradientWarning, stacklevel=3)
