"""What the parameter regularisers of the MiB family share: EWC, PI (path integral) and RW (Riemannian Walk).

Reference: MiB utils/regularizer.py (EWC, PI, RW), loop placement MiB train.py::Trainer.train. Plain classes
working on name → tensor dicts; they know nothing about models, optimizers or the trainer. Life cycle of one
step t::

    reg = EWC(params, reference=theta_star, previous=carry)   # start of step t (previous: None at step 0)
    # every iteration, after the task-loss backward, with the unscaled gradients:
    reg.update(params, grads)
    penalty = reg.penalty(params)           # None, or a scalar; the caller backpropagates λ·penalty
    # end of the step:
    carry = reg.end_step(params)            # CPU tensors: give it to step t+1's constructor as `previous`

* ``params``: the student's parameters, name → tensor (``dict(model.named_parameters())``); tensors with
  ``requires_grad=False`` are frozen: no statistics (EWC/RW) and no penalty, as in the reference.
* ``reference``: θ*, the step t−1 weights of the parameters that existed before (the teacher's parameters),
  name → tensor; None at step 0. The tensors are kept by reference (not copied): they must not change.
* ``previous``: what ``end_step`` returned at step t−1 (the carried statistics), or None.
* ``grads``: name → gradient of the task loss (unscaled, after the all-reduce), or None. Parameters whose
  gradient is None (or missing) are skipped. The reference crashes on them in EWC (``p.grad ** 2``) and
  skips them in PI/RW, where they also drop out of the stored θ_prev / θ_tmp; a parameter without a stored
  θ_prev / θ_tmp is skipped for that one iteration here (the reference would raise a KeyError).

Two kinds of state:

* ``end_step(params)`` → the **carry** to the next step (EWC: Fisher; PI: summed importance; RW: Fisher
  and score), passed as ``previous`` to the next step's constructor.
* ``state_dict()`` → the complete **running** state mid-step (``--resume``), CPU tensors; a fresh object
  built with the same ``reference`` (any ``params``/``previous``) and given ``load_state_dict(state)``
  continues exactly as the saved one would (same updates, penalties and carry).

State tensors are float32 and live on the device of the parameters they belong to (moved lazily when a
parameter or gradient on another device shows up). Penalties are computed in float32 and are
differentiable with respect to ``params``. In the reference only rank 0 updates the statistics; the
penalty uses only the carried statistics, identical on every rank.

This module holds what EWC (``methods/ewc.py``), PI (``methods/pi.py``) and RW (``methods/rw.py``) share: the
statistics' bookkeeping (:class:`Regularizer`) and the method (:class:`RegularizedMethod`). The methods ``ewc``,
``pi`` and ``rw`` are FT under MiB's protocol (CE over all pixels, no teacher forward, default initialisation of
the new classifier) plus ``reg_importance`` · R, the penalty's gradients added after the task-loss backward
(a second backward pass, as the reference). Differences from the reference: every rank updates the
statistics from the all-reduced gradients (the reference: rank 0 only, so only rank 0's statistics were
saved), so every rank holds the same ones; a step t ≥ 1 whose previous checkpoint holds no statistics of
the method is refused (the reference silently trained without penalty).
"""
import dataclasses
import logging

import torch

from methods.base import hyper
from methods.losses import ce_all_pixels
from methods.mib_family import MIB_PROTOCOL, PLOP_PROTOCOL, MiBFamily
from utils.errors import UserError

log = logging.getLogger("ciss")

NORMALIZE_EPS = 1e-8  # ε of the min-max normalisation (MiB utils/regularizer.py)


def normalize_hyper():
    """The ``reg_normalize`` hyper-parameter of EWC, PI and RW."""
    return hyper(True, "min-max normalise the carried statistics per tensor before the penalty (MiB's default)")


def importance_hyper(importance):
    """The ``reg_importance`` hyper-parameter: λ of the penalty; unset, the protocol's repository's value."""
    return hyper(None, f"t>0: weight λ of the penalty (default: MiB's {importance[MIB_PROTOCOL]:g}; under"
                       f" --protocol plop PLOP's and RCIL's {importance[PLOP_PROTOCOL]:g})", low=0.0, type=float)


def alpha_hyper(default):
    """The ``reg_alpha`` hyper-parameter of EWC and RW: the EMA factor of their Fisher update."""
    return hyper(default, "EMA factor of the Fisher update F <- a·g² + (1-a)·F", low=0.0, high=1.0)


def min_max_normalize(x):
    """Per-tensor min-max normalisation of the reference (MiB utils/regularizer.py)::

        x̂ = (x − min x) / (max x − min x + 1e-8)
    """
    x = x.float()
    low = x.min()
    return (x - low) / (x.max() - low + NORMALIZE_EPS)


def positive_part(x):
    # the reference keeps x where x > 0 (PI) / x >= 0 (RW) and writes 0 elsewhere: NaN becomes 0, unlike clamp
    return torch.where(x > 0, x, torch.zeros_like(x))


def f32(t):
    return t.detach().float()


def cpu_copy(store):
    """A CPU float32 copy of a name → tensor dict (None stays None)."""
    if store is None:
        return None
    return {name: t.detach().to("cpu", torch.float32, copy=True) for name, t in store.items()}


def on_device(store, name, device):
    """``store[name]`` on ``device``, moving (and keeping) it there when it lives elsewhere."""
    t = store[name]
    if t.device != device:
        t = t.to(device)
        store[name] = t
    return t


def ema_of_squares(fisher, g, alpha):
    """F ← α·g² + (1 − α)·F in place (one pass over F, no temporaries: the statistics are as large as the model)."""
    fisher.mul_(1 - alpha).addcmul_(g, g, value=alpha)


def snapshot(params, grads, into=None):
    """θ of the parameters that have a gradient this iteration (the reference's model_temp), float32, copied
    into the tensors of an earlier snapshot ``into`` where they fit (no model-sized allocation per iteration)."""
    snapshot = {}
    for name, p in params.items():
        if grads.get(name) is None:
            continue
        earlier = None if into is None else into.get(name)
        if earlier is not None and earlier.shape == p.shape and earlier.device == p.device:
            snapshot[name] = earlier.copy_(p.detach())
        else:
            snapshot[name] = f32(p).clone()
    return snapshot


class Regularizer:
    """Shared bookkeeping; subclasses define ``kind``, the statistics and ``_importance_from``."""

    kind = None
    carry_keys = ()
    options = ()  # keyword arguments of the constructor set from the hyper-parameters reg_{name}  # the statistics ``end_step`` returns and ``previous`` must hold

    def __init__(self, params, reference=None, previous=None, normalize=True):
        self.normalize = normalize
        self.reference = None if reference is None else {n: f32(t) for n, t in reference.items()}
        self._set_previous(previous)
        if self.reference is not None and self.previous is None:
            log.warning("%s: no statistics carried from the previous step (was it trained with the same "
                        "regulariser?): the penalty is disabled for this step, as in MiB", self.kind)

    # ---- carried statistics ---------------------------------------------------------------------------
    def _set_previous(self, previous):
        """Keep the previous step's carry (CPU) and derive the importance used by the penalty."""
        if not previous:
            previous = None  # nothing carried (step 0, or a previous step trained without a regulariser)
        if previous is not None and previous.get("kind") != self.kind:
            raise UserError(f"the statistics carried from the previous step belong to regulariser "
                            f"'{previous.get('kind')}', expected '{self.kind}': run every step with the same method")
        if previous is not None and not all(previous.get(key) for key in self.carry_keys):
            previous = None  # nothing stored: no penalty (the reference's penalize=False)
        self.previous = None if previous is None else {
            "kind": self.kind, **{key: cpu_copy(previous[key]) for key in self.carry_keys}}
        self.importance = None if self.previous is None else self._importance_from(self.previous)

    def _normalized(self, t):
        return min_max_normalize(t) if self.normalize else t.float()

    @property
    def penalizes(self):
        """Whether :meth:`penalty` can return a value: reference weights and carried statistics exist."""
        return self.reference is not None and self.importance is not None

    def _penalty_reference(self):
        return self.reference

    def penalty(self, params):
        """R = Σ_n Σ importance_n ⊙ (θ_n − θ_ref,n)² over the trainable parameters that have both an
        importance and a reference value (the caller multiplies by λ = ``reg_importance``). None when
        nothing is penalised (step 0, or no carried statistics). Scalar float32 tensor, differentiable
        with respect to ``params``."""
        if not self.penalizes:
            return None
        reference = self._penalty_reference()
        total = None
        for name, p in params.items():
            if not p.requires_grad or name not in self.importance or name not in reference:
                continue
            importance = on_device(self.importance, name, p.device)
            term = (importance * (p.float() - on_device(reference, name, p.device)) ** 2).sum()
            total = term if total is None else total + term
        return total

    # ---- running state ----------------------------------------------------------------------------------
    def state_dict(self):
        """The complete running state (CPU float32 tensors), for an exact mid-step ``--resume``."""
        return {"kind": self.kind, "previous": self.previous, **self._running_state()}

    def load_state_dict(self, state):
        """Restore exactly what :meth:`state_dict` returned (the ``reference`` given to the constructor
        is kept: pass the same θ*)."""
        if state.get("kind") != self.kind:
            raise UserError(f"the saved regulariser state is '{state.get('kind')}', expected '{self.kind}'")
        self._set_previous(state["previous"])
        self._load_running(state)


# ======================================================================================================
# The methods ewc, pi, rw (MiB utils/regularizer.py, train.py::Trainer.train; weights: MiB argparser.py)
# ======================================================================================================

class RegularizedMethod(MiBFamily):
    """FT + a parameter regulariser (MiB utils/regularizer.py), the base of :class:`EWCMethod`,
    :class:`PIMethod` and :class:`RWMethod`.

    * Step 0 must be trained with the same method: its checkpoint carries the statistics
      (``method_state["carry"]``); a step t ≥ 1 without them is a :class:`UserError`.
    * ``prepare_student`` keeps θ* (the step t−1 weights, on the CPU); ``configure`` builds the statistics
      object (:attr:`regularizer_cls`) from the student's parameters at that moment (PI's reference for
      parameters θ* lacks), θ* and the carried statistics.
    * ``after_backward``: the statistics are updated from ``p.grad`` (the task loss's unscaled,
      all-reduced gradients) when they are finite; returns ``{"total": λ·R, "reg": λ·R}`` (R from the
      carried statistics, None at step 0).
    * ``end_of_step`` computes the carry; ``state_dict`` holds the running statistics (``--resume``) and the
      carry (the next step's :meth:`load_previous_state`).
    * ``reg_importance`` left unset takes :attr:`importance` of the repository whose protocol the method
      follows (MiB's argparser, or PLOP's / RCIL's, which set 100 for the three).
    """

    uses_gradients = True
    domain_refusal = "neither PLOP nor RCIL ran EWC, PI or RW on a domain-incremental dataset (no published protocol)"
    regularizer_cls = None
    importance = {}  # protocol -> λ (reg_importance) of that repository's argparser

    def __init__(self, hyper=None, dataset="voc"):
        super().__init__(hyper, dataset)
        if self.hp.reg_importance is None:
            self.hp = dataclasses.replace(self.hp, reg_importance=self.importance[self.protocol()])
        self.reference = None  # θ*: name -> step t-1 weight (CPU), t >= 1
        self.previous = None  # the statistics carried from step t-1
        self.regularizer = None
        self.carry = None  # the statistics for step t+1, after end_of_step

    def needs_teacher(self, ctx):
        return False  # the penalty needs θ* only, kept by prepare_student

    def step0_protocol(self):
        """The step carries its statistics to the next one: only the same method may start from its step 0."""
        return (self.name,)

    def regularizer_options(self):
        """Keyword arguments of :attr:`regularizer_cls` besides ``params``, ``reference``, ``previous``: the
        hyper-parameter ``reg_{name}`` for every name of the statistics' ``options``, and ``normalize``."""
        return {"normalize": self.hp.reg_normalize,
                **{name: getattr(self.hp, f"reg_{name}") for name in self.regularizer_cls.options}}

    def load_previous_state(self, state, ctx):
        carry = (state or {}).get("carry")
        kind = self.regularizer_cls.kind
        if not carry or carry.get("kind") != kind:
            raise UserError(f"step {ctx.step} of --method {self.name} needs the {kind.upper()} statistics of step"
                            f" {ctx.step - 1}, which its checkpoint does not hold: train step 0 (and every step)"
                            f" with --method {self.name}")
        self.previous = carry

    def prepare_student(self, model, previous, ctx):
        super().prepare_student(model, previous, ctx)
        self.reference = {name: p.detach().to("cpu", torch.float32, copy=True)
                          for name, p in previous.named_parameters()}

    def configure(self, model, ctx):
        super().configure(model, ctx)
        reference = self.reference if ctx.step > 0 else None
        previous = self.previous if ctx.step > 0 else None
        self.regularizer = self.regularizer_cls(dict(model.named_parameters()), reference=reference,
                                                previous=previous, **self.regularizer_options())
        self.carry = None

    def loss(self, outputs, teacher_outputs, batch, ctx):
        ce = ce_all_pixels(self.upsampled(outputs[0], batch.labels), batch.labels)
        return {"total": ce, "ce": ce}

    def after_backward(self, model, ctx, finite):
        params = dict(model.named_parameters())
        if finite:
            self.regularizer.update(params, {name: p.grad for name, p in params.items() if p.requires_grad})
        penalty = self.regularizer.penalty(params)
        if penalty is None:
            return None
        weighted = self.hp.reg_importance * penalty
        return {"total": weighted, "reg": weighted}

    def end_of_step(self, model, ctx):
        """The carry for step t+1; the running statistics are dropped (``final.pth`` needs only the carry)."""
        self.carry = self.regularizer.end_step(dict(model.named_parameters()))
        self.regularizer = None

    def state_dict(self):
        running = self.regularizer.state_dict() if self.regularizer is not None else None
        return {"kind": self.regularizer_cls.kind, "running": running, "carry": self.carry}

    def load_state_dict(self, state):
        if state.get("kind") != self.regularizer_cls.kind:
            raise UserError(f"the saved method state is '{state.get('kind')}', expected"
                            f" '{self.regularizer_cls.kind}' (--method {self.name})")
        if state.get("running") is not None:
            self.regularizer.load_state_dict(state["running"])
        self.carry = state.get("carry")
