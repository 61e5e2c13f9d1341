"""RW, the Riemannian Walk, as in MiB (MiB utils/regularizer.py::RW): FT under MiB's protocol plus
``reg_importance`` · Σ (F̂ + Ŝ) ⊙ (θ − θ*)² (see ``methods/regularizers.py`` for the shared bookkeeping).
"""
from dataclasses import dataclass

import torch

from methods.base import hyper
from methods.mib_family import MIB_PROTOCOL, PLOP_PROTOCOL, protocol_hyper
from methods.regularizers import (RegularizedMethod, Regularizer, alpha_hyper, cpu_copy, ema_of_squares, f32,
                                  importance_hyper, normalize_hyper, on_device, positive_part, snapshot)

# MiB argparser.py: --reg_importance 100 for RW, reg_alpha 0.9, reg_iterations 10
RW_IMPORTANCES = {MIB_PROTOCOL: 100.0, PLOP_PROTOCOL: 100.0}  # λ by protocol (MiB's / PLOP's argparser)
RW_ALPHA = 0.9
RW_ITERATIONS = 10  # the RW score is updated every reg_iterations iterations
RW_EPS = 1e-8  # denominator of the RW score (MiB utils/regularizer.py::RW)


class RW(Regularizer):
    """Riemannian Walk as in MiB utils/regularizer.py::RW.

    * F starts from the carried Fisher (ones for trainable parameters it lacks); S starts at 0 every step
      (trainable parameters).
    * ``update`` (counter c, starting at 0): if c % ``iterations`` == 0: when θ_tmp exists,
      S_n += g_n ⊙ (θ_tmp,n − θ_n) / (½·F_n ⊙ (θ_n − θ_tmp,n)² + 1e-8), then θ_tmp ← θ; c += 1;
      then at every call F_n ← α·g_n² + (1 − α)·F_n. The score therefore uses the Fisher of the previous
      iteration (reproduced on purpose).
    * ``end_step``: S_save = ½·(max(S, 0) + S_old) where a carried score exists, else max(S, 0).
    * ``penalty``: R = Σ_{n ∈ θ*, trainable} Σ (F̂_old,n + Ŝ_old,n) ⊙ (θ_n − θ*_n)², both carried tensors
      min-max normalised separately.
    * carry: ``{"kind": "rw", "fisher": F, "score": S_save}``; both must be present to penalise (the
      reference discards a Fisher stored without a score, and vice versa).
    """

    kind = "rw"
    carry_keys = ("fisher", "score")
    options = ("alpha", "iterations")

    def __init__(self, params, reference=None, previous=None, alpha=RW_ALPHA, iterations=RW_ITERATIONS,
                 normalize=True):
        super().__init__(params, reference, previous, normalize)
        self.alpha = alpha
        self.iterations = iterations
        self.fisher = {} if self.previous is None else {n: t.clone() for n, t in self.previous["fisher"].items()}
        for name, p in params.items():
            if p.requires_grad and name not in self.fisher:
                self.fisher[name] = torch.ones_like(p, dtype=torch.float32)
        self.score = {name: torch.zeros_like(p, dtype=torch.float32)
                      for name, p in params.items() if p.requires_grad}
        self.theta_tmp = None
        self.count = 0

    def _importance_from(self, previous):
        importance = {name: self._normalized(f) for name, f in previous["fisher"].items()}
        for name, s in previous["score"].items():
            # a score without a Fisher entry (the reference would raise a KeyError) counts alone
            importance[name] = importance[name] + self._normalized(s) if name in importance else self._normalized(s)
        return importance

    def update(self, params, grads):
        """The score step every ``iterations`` calls (with the Fisher before this call's update), then the
        Fisher EMA for every parameter with a gradient."""
        if self.count % self.iterations == 0:
            if self.theta_tmp is not None:
                for name, p in params.items():
                    g = grads.get(name)
                    if g is None or name not in self.theta_tmp:
                        continue
                    g, theta = f32(g), f32(p)
                    theta_tmp = on_device(self.theta_tmp, name, theta.device)
                    fisher = (on_device(self.fisher, name, theta.device) if name in self.fisher
                              else torch.ones_like(theta))
                    gain = g * (theta_tmp - theta)
                    den = 0.5 * fisher * (theta - theta_tmp) ** 2 + RW_EPS
                    score = on_device(self.score, name, theta.device) if name in self.score else torch.zeros_like(theta)
                    self.score[name] = score + gain / den
            self.theta_tmp = snapshot(params, grads, into=self.theta_tmp)
        self.count += 1
        for name, p in params.items():
            g = grads.get(name)
            if g is None:
                continue
            g = f32(g)
            if name not in self.fisher:
                self.fisher[name] = torch.ones_like(g)
            ema_of_squares(on_device(self.fisher, name, g.device), g, self.alpha)

    def end_step(self, params=None):
        """The carry for the next step: ``{"kind": "rw", "fisher": F, "score": S_save}`` (CPU)."""
        previous = self.previous["score"] if self.previous is not None else {}
        score = {}
        for name, s in self.score.items():
            s = positive_part(s)
            if name in previous:
                s = 0.5 * (s + previous[name].to(s.device))
            score[name] = s
        return {"kind": self.kind, "fisher": cpu_copy(self.fisher), "score": cpu_copy(score)}

    def _running_state(self):
        return {"fisher": cpu_copy(self.fisher), "score": cpu_copy(self.score), "theta_tmp": cpu_copy(self.theta_tmp),
                "count": self.count}

    def _load_running(self, state):
        self.fisher = cpu_copy(state["fisher"])
        self.score = cpu_copy(state["score"])
        self.theta_tmp = cpu_copy(state["theta_tmp"])
        self.count = int(state["count"])


@dataclass
class RWHyper:
    reg_importance: float = importance_hyper(RW_IMPORTANCES)
    reg_alpha: float = alpha_hyper(RW_ALPHA)
    reg_iterations: int = hyper(RW_ITERATIONS, "the RW score is updated every this many iterations", positive=True)
    reg_normalize: bool = normalize_hyper()
    protocol: str = protocol_hyper()


class RWMethod(RegularizedMethod):
    """RW (MiB utils/regularizer.py::RW): CE + ``reg_importance`` · Σ (F̂ + Ŝ) ⊙ (θ − θ*)²."""

    name = "rw"
    Hyper = RWHyper
    regularizer_cls = RW
    importance = RW_IMPORTANCES
