"""EWC, elastic weight consolidation, as in MiB (MiB utils/regularizer.py::EWC): FT under MiB's protocol plus
``reg_importance`` · Σ F̂ ⊙ (θ − θ*)², F an exponential moving average of the squared gradients
(see ``methods/regularizers.py`` for the bookkeeping the three regularisers share).
"""
from dataclasses import dataclass

import torch

from methods.mib_family import MIB_PROTOCOL, PLOP_PROTOCOL, protocol_hyper
from methods.regularizers import (RegularizedMethod, Regularizer, alpha_hyper, cpu_copy, ema_of_squares, f32,
                                  importance_hyper, normalize_hyper, on_device)

# MiB argparser.py: --reg_importance 500 for EWC (the PLOP/RCIL argparsers: 100), reg_alpha 0.9
EWC_IMPORTANCES = {MIB_PROTOCOL: 500.0, PLOP_PROTOCOL: 100.0}  # λ by protocol (MiB's / PLOP's argparser)
EWC_ALPHA = 0.9  # EMA factor of the "Fisher" update F ← α·g² + (1 − α)·F


class EWC(Regularizer):
    """Elastic weight consolidation as in MiB utils/regularizer.py::EWC.

    * F starts from the carried (un-normalised) Fisher, with ones for trainable parameters it does not
      contain yet (all of them at step 0, the new classifier later).
    * ``update``: F_n ← α·g_n² + (1 − α)·F_n for every parameter with a gradient: an EMA dominated by the
      last ~10 iterations, not an average Fisher (reproduced on purpose).
    * ``penalty``: R = Σ_{n ∈ θ*, trainable} Σ F̂_n ⊙ (θ_n − θ*_n)², F̂ = min-max normalised carried F.
      New-classifier parameters are not penalised.
    * carry: ``{"kind": "ewc", "fisher": F}``.
    """

    kind = "ewc"
    carry_keys = ("fisher",)
    options = ("alpha",)

    def __init__(self, params, reference=None, previous=None, alpha=EWC_ALPHA, normalize=True):
        super().__init__(params, reference, previous, normalize)
        self.alpha = alpha
        self.fisher = {} if self.previous is None else {n: t.clone() for n, t in self.previous["fisher"].items()}
        for name, p in params.items():
            if p.requires_grad and name not in self.fisher:
                self.fisher[name] = torch.ones_like(p, dtype=torch.float32)

    def _importance_from(self, previous):
        return {name: self._normalized(f) for name, f in previous["fisher"].items()}

    def update(self, params, grads):
        """F_n ← α·g_n² + (1 − α)·F_n for every n with a gradient (``params`` unused, for a common call)."""
        for name, g in grads.items():
            if g is None:
                continue
            g = f32(g)
            if name not in self.fisher:
                self.fisher[name] = torch.ones_like(g)
            ema_of_squares(on_device(self.fisher, name, g.device), g, self.alpha)

    def end_step(self, params=None):
        """The carry for the next step: ``{"kind": "ewc", "fisher": F}`` (un-normalised, CPU)."""
        return {"kind": self.kind, "fisher": cpu_copy(self.fisher)}

    def _running_state(self):
        return {"fisher": cpu_copy(self.fisher)}

    def _load_running(self, state):
        self.fisher = cpu_copy(state["fisher"])


@dataclass
class EWCHyper:
    reg_importance: float = importance_hyper(EWC_IMPORTANCES)
    reg_alpha: float = alpha_hyper(EWC_ALPHA)
    reg_normalize: bool = normalize_hyper()
    protocol: str = protocol_hyper()


class EWCMethod(RegularizedMethod):
    """EWC (MiB utils/regularizer.py::EWC): CE + ``reg_importance`` · Σ F̂ ⊙ (θ − θ*)²."""

    name = "ewc"
    Hyper = EWCHyper
    regularizer_cls = EWC
    importance = EWC_IMPORTANCES
