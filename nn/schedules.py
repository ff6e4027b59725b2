"""Learning-rate schedules: ``schedule(base_lr, t) -> lr``, where ``t`` counts epochs (``per="epoch"``,
the default) or optimizer steps (``per="step"``) from 0. The trainer sets the optimizer's ``lr`` from
them before each epoch or step, so a resumed run follows the same schedule."""

import math

from kernels._checks import count, scalar


class Schedule:
    def __init__(self, per="epoch"):
        if not isinstance(per, str) or per not in ("epoch", "step"):
            raise ValueError(f"per must be 'epoch' or 'step', got {per!r}")
        self.per = per


class StepDecay(Schedule):
    """Multiply the learning rate by ``gamma`` every ``step_size`` epochs (or steps)."""

    def __init__(self, step_size, gamma=0.1, per="epoch"):
        super().__init__(per)
        self.step_size = count("step_size", step_size, 1)
        self.gamma = scalar("gamma", gamma, low=0, high=1, low_open=True)

    def __call__(self, base_lr, t):
        return base_lr * self.gamma ** (t // self.step_size)


class CosineDecay(Schedule):
    """Cosine annealing from ``base_lr`` to ``min_lr`` over ``total`` epochs (or steps), then flat."""

    def __init__(self, total, min_lr=0.0, per="epoch"):
        super().__init__(per)
        self.total, self.min_lr = count("total", total, 1), scalar("min_lr", min_lr, low=0)

    def __call__(self, base_lr, t):
        progress = min(t, self.total) / self.total
        return self.min_lr + (base_lr - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2
