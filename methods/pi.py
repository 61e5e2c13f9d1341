"""PI, the path integral (synaptic intelligence), as in MiB (MiB utils/regularizer.py::PI): FT under MiB's protocol
plus ``reg_importance`` · Σ ω̂ ⊙ (θ − θ_ref)² (see ``methods/regularizers.py`` for the shared bookkeeping).
"""
from dataclasses import dataclass

import torch

from methods.mib_family import MIB_PROTOCOL, PLOP_PROTOCOL, protocol_hyper
from methods.regularizers import (RegularizedMethod, Regularizer, cpu_copy, f32, importance_hyper, normalize_hyper,
                                  on_device, positive_part, snapshot)

# MiB argparser.py: --reg_importance 500 for PI (the PLOP/RCIL argparsers: 100)
PI_IMPORTANCES = {MIB_PROTOCOL: 500.0, PLOP_PROTOCOL: 100.0}  # λ by protocol (MiB's / PLOP's argparser)
PI_EPS = 1e-20  # denominator of the PI importance (MiB utils/regularizer.py::PI)


class PI(Regularizer):
    """Path integral (synaptic intelligence) as in MiB utils/regularizer.py::PI.

    * θ_ref,n = θ*_n for parameters that existed before, else the value of the parameter given to the
      constructor (its initial value: the new classifier; every parameter at step 0).
    * ``update``: if θ_prev exists, δ_n += g_n ⊙ (θ_prev,n − θ_n); then θ_prev ← θ (parameters with a
      gradient only). δ starts at 0 every step.
    * ``end_step``: ω_n = max(δ_n / ((θ_n − θ_ref,n)² + 1e-20), 0) + ω_prev,n (the carried importance, when
      present: summed, although the reference's comment says "averaged").
    * ``penalty``: R = Σ_{n ∈ ω_prev, trainable} Σ ω̂_n ⊙ (θ_n − θ_ref,n)², ω̂ = min-max normalised
      ω_prev.
    * carry: ``{"kind": "pi", "score": ω}``.
    """

    kind = "pi"
    carry_keys = ("score",)

    def __init__(self, params, reference=None, previous=None, normalize=True):
        super().__init__(params, reference, previous, normalize)
        old = self.reference or {}
        self.start_new = {name: f32(p).clone() for name, p in params.items() if name not in old}
        self.theta_ref = {**self.start_new, **old}
        self.delta = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        self.theta_prev = None

    def _importance_from(self, previous):
        return {name: self._normalized(s) for name, s in previous["score"].items()}

    def _penalty_reference(self):
        return self.theta_ref

    def update(self, params, grads):
        """δ_n += g_n ⊙ (θ_prev,n − θ_n) (from the second call on), then θ_prev ← θ."""
        if self.theta_prev is not None:
            for name, p in params.items():
                g = grads.get(name)
                if g is None or name not in self.theta_prev:
                    continue
                g, theta = f32(g), f32(p)
                if name not in self.delta:
                    self.delta[name] = torch.zeros_like(theta)
                previous = on_device(self.theta_prev, name, theta.device)
                on_device(self.delta, name, theta.device).addcmul_(g, previous - theta)
        self.theta_prev = snapshot(params, grads, into=self.theta_prev)

    def end_step(self, params):
        """The carry for the next step: ``{"kind": "pi", "score": ω}`` (CPU), ω over the parameters in
        ``params`` (the final weights) that were known at construction."""
        theta_ref = self.theta_ref
        previous = self.previous["score"] if self.previous is not None else {}
        score = {}
        for name, p in params.items():
            if name not in theta_ref:
                continue
            theta = f32(p)
            delta = on_device(self.delta, name, theta.device) if name in self.delta else torch.zeros_like(theta)
            omega = positive_part(delta / ((theta - on_device(theta_ref, name, theta.device)) ** 2 + PI_EPS))
            if name in previous:
                omega = previous[name].to(theta.device) + omega
            score[name] = omega
        return {"kind": self.kind, "score": cpu_copy(score)}

    def _running_state(self):
        return {"delta": cpu_copy(self.delta), "theta_prev": cpu_copy(self.theta_prev),
                "start_new": cpu_copy(self.start_new)}

    def _load_running(self, state):
        self.delta = cpu_copy(state["delta"])
        self.theta_prev = cpu_copy(state["theta_prev"])
        self.start_new = cpu_copy(state["start_new"])
        self.theta_ref = {**self.start_new, **(self.reference or {})}


@dataclass
class PIHyper:
    reg_importance: float = importance_hyper(PI_IMPORTANCES)
    reg_normalize: bool = normalize_hyper()
    protocol: str = protocol_hyper()


class PIMethod(RegularizedMethod):
    """PI / synaptic intelligence (MiB utils/regularizer.py::PI): CE + ``reg_importance`` · Σ ω̂ ⊙ (θ − θ_ref)²."""

    name = "pi"
    Hyper = PIHyper
    regularizer_cls = PI
    importance = PI_IMPORTANCES
