"""Learning-rate schedules, stepped once per iteration (BARM utils/scheduler.py::build_scheduler).

``it`` is the number of completed iterations and ``T`` the total:

* ``poly``: ``lr = max(base · (1 − it/T)^0.9, 1e−6)`` (the floor is BARM's, utils/scheduler.py::PolyLR);
* ``warm_poly``: ``lr = base · f(it) · (1 − it/T)^0.9`` with ``W = ⌊warmup·T⌋`` (warmup 0.1) and
  ``f = 0.001·(1 − it/W) + it/W`` for ``it < W``, else 1; no floor;
* ``step``: ``lr = base · 0.1^⌊it / step_size⌋``.
"""
from torch.optim.lr_scheduler import LambdaLR, StepLR

from utils.errors import UserError

POLY_POWER = 0.9
POLY_MIN_LR = 1e-6
WARMUP_FRACTION = 0.1
WARMUP_START_FACTOR = 0.001
STEP_GAMMA = 0.1
POLICIES = ("poly", "warm_poly", "step")


class PolyLR(LambdaLR):
    """Poly decay with the reference's absolute floor on every group's learning rate."""

    def __init__(self, optimizer, total_iters, power=POLY_POWER, min_lr=POLY_MIN_LR):
        self.total_iters, self.power, self.min_lr = total_iters, power, min_lr
        super().__init__(optimizer, lambda it: (1 - min(it, total_iters) / total_iters) ** power)

    def get_lr(self):
        return [max(lr, self.min_lr) for lr in super().get_lr()]


def warm_poly_factor(it, total_iters, warmup=WARMUP_FRACTION, start=WARMUP_START_FACTOR, power=POLY_POWER,
                     round_warmup=True):
    """The warm_poly factor; ``round_warmup``: ``W = int(warmup·T)`` (BARM/SSUL) or ``warmup·T`` (DKD)."""
    warmup_iters = int(warmup * total_iters) if round_warmup else warmup * total_iters
    ramp = start * (1 - it / warmup_iters) + it / warmup_iters if it < warmup_iters else 1.0
    return ramp * (1 - min(it, total_iters) / total_iters) ** power


def build_scheduler(policy, optimizer, total_iters, step_size=10000, min_lr=POLY_MIN_LR, warmup=WARMUP_FRACTION,
                    round_warmup=True):
    """The scheduler for ``--lr_policy``; call its ``step()`` after every optimizer step. ``min_lr`` (poly's
    floor), ``warmup`` and ``round_warmup`` (warm_poly) are the method's (``Method.schedule_options``)."""
    if total_iters < 1:
        raise UserError(f"the schedule needs at least one iteration, got {total_iters}")
    if policy == "poly":
        return PolyLR(optimizer, total_iters, min_lr=min_lr)
    if policy == "warm_poly":
        return LambdaLR(optimizer, lambda it: warm_poly_factor(it, total_iters, warmup=warmup,
                                                               round_warmup=round_warmup))
    if policy == "step":
        return StepLR(optimizer, step_size=step_size, gamma=STEP_GAMMA)
    raise UserError(f"unknown --lr_policy '{policy}': expected one of {', '.join(POLICIES)}")
