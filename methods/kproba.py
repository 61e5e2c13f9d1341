"""KProBA: BARM with kernel-prototype pseudo-labels (KProBA trainer/trainer.py, KLDA.py).

Everything is BARM's (model, losses, data, evaluation) except the pseudo-label rule at t > 0:

* prototypes (KProBA KLDA.py::KLDA, trainer/trainer.py::Trainer.compute_class_feature_averages): before each step,
  one pass over the training set maps the layer-4 features (``back_out``) of every pixel of the updated classes
  through three random-Fourier-feature maps (seeds 42, 43, 44; D = 5000; σ = 1e−4) and keeps per member a
  running class mean; the prototype of a class is the mean over the members, blended with the stored one with
  momentum 0.9 (:class:`PrototypeAccumulator`);
* pseudo-labels (KProBA trainer/trainer.py::generate_pseudo_labels): ground-truth background pixels get
  ``argmax_c κ_c · softmax(O')_c`` over the old classes, κ from the distance of the *student's* features
  (member 0's map) to the prototypes (:func:`kproba_pseudo_labels`); no threshold.

Deliberate differences from the reference (KProBA KLDA.py::KLDA; docs/differences.md): the scatter matrices and
their pseudo-inverses (never used by KProBA) are left out; Ω and b are drawn from a dedicated ``torch.Generator``
seeded with the member's seed instead of reseeding the global RNG (the values are the same, the global RNG is
left alone, so later draws follow ``--random_seed``); the random-feature maps and distances run in float32 even
under AMP.

The numerics are plain functions and small classes; :class:`KProBA` (a :class:`methods.barm.BARM`) assembles
them as a method of the trainer. Prototypes are keyed by channel position (the class id in the natural orders),
computed before every step (step 0 included) and carried in the checkpoint's method state.
"""
import dataclasses
import logging

import torch
import torch.nn.functional as F

from methods import losses
from methods.barm import BARM, BARM_PUBLISHED, BarmHyper, barm_loss
from methods.base import Published

log = logging.getLogger("ciss")

# settings of KProBA trainer/trainer.py::Trainer.compute_class_feature_averages and KLDA.py::KLDA_E
KPROBA_RFF_DIM = 5000  # D
KPROBA_SIGMA = 1e-4  # kernel bandwidth σ: Ω ~ N(0, std = √(2σ)) (KProBA KLDA.py::KLDA)
KPROBA_SEEDS = (42, 43, 44)  # ensemble seeds: seed 42 + member index (KProBA KLDA.py::KLDA_E)
KPROBA_MOMENTUM = 0.9  # prototype momentum
# similarity weights (KProBA trainer/trainer.py::compute_similarity_weights)
KPROBA_TAU = 1.0  # temperature τ of the similarity weights
KPROBA_KAPPA_EPS = 1e-8  # denominator ε of κ, the reference's


def _float32_matmul(x, omega):
    """``x @ Ω`` in float32, with autocast off (KProBA trainer/trainer.py::compute_similarity_weights ran it in
    fp16 under AMP: a deviation, docs/differences.md)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return x.float() @ omega


class RandomFourierFeatures:
    """Random Fourier features of an RBF kernel: one KLDA member's (Ω, b) (KProBA KLDA.py::KLDA).

    ``Ω ~ N(0, std = √(2σ))`` of shape (d, D), then ``b ~ U[0, 2π)`` of shape (D,), drawn on the CPU in that
    order from a ``torch.Generator`` seeded with ``seed``; the same values as the reference's
    ``torch.manual_seed(seed)`` followed by its two draws, without touching the global RNG (a deliberate
    difference: docs/differences.md). ``φ(x) = √(2/D) · cos(xΩ + b)`` for x of shape (..., d), returning
    (..., D) in float32.
    """

    def __init__(self, d, D=KPROBA_RFF_DIM, sigma=KPROBA_SIGMA, seed=KPROBA_SEEDS[0]):
        self.d, self.D, self.sigma, self.seed = int(d), int(D), float(sigma), int(seed)
        generator = torch.Generator().manual_seed(self.seed)
        std = torch.sqrt(torch.tensor(2 * self.sigma, dtype=torch.float32))  # float32, as the reference
        self.omega = torch.normal(0, float(std), (self.d, self.D), generator=generator)
        self.b = torch.rand(self.D, generator=generator) * 2 * torch.pi
        self.scale = torch.sqrt(torch.tensor(2.0 / self.D, dtype=torch.float32))

    def to(self, device):
        """Move Ω, b and the scale to ``device`` (returns self)."""
        self.omega, self.b, self.scale = self.omega.to(device), self.b.to(device), self.scale.to(device)
        return self

    def __call__(self, x):
        """φ(x) = √(2/D)·cos(xΩ + b); x (..., d) → (..., D), float32."""
        if x.shape[-1] != self.d:
            raise ValueError(f"RandomFourierFeatures: features have {x.shape[-1]} channels, expected {self.d}")
        return self.scale * torch.cos(_float32_matmul(x, self.omega) + self.b)


class PrototypeAccumulator:
    """KProBA's class prototypes in random-feature space (KProBA KLDA.py::KLDA.batch_update,
    trainer/trainer.py::Trainer.compute_class_feature_averages).

    ``classes``: the classes U updated this step (t = 0: 0 … n_0 − 1; t > 0: the new classes and 0); ``d``: the
    feature channels (2048 for ``back_out``); one :class:`RandomFourierFeatures` member per seed. Per member m
    and class y, a running mean over all pixels seen so far::

        μ_y ← (μ_y · n_old + mean(φ_m(X)) · n) / (n_old + n),   n_old ← n_old + n

    (X: the n feature rows of class y in one batch; unseen classes keep μ = 0). :meth:`finalize` averages the
    members and blends with the stored prototypes. Call it under ``torch.no_grad()``, without autocast, with the
    model as the reference had it (train mode, KProBA trainer/trainer.py::Trainer.compute_class_feature_averages).
    """

    def __init__(self, classes, d, D=KPROBA_RFF_DIM, sigma=KPROBA_SIGMA, seeds=KPROBA_SEEDS):
        self.classes = [int(c) for c in classes]
        self.d, self.D = int(d), int(D)
        self.members = [RandomFourierFeatures(d, D, sigma, seed) for seed in seeds]
        self.device = torch.device("cpu")
        self.counts = {c: 0 for c in self.classes}
        self.means = [{c: torch.zeros(self.D) for c in self.classes} for _ in self.members]

    def to(self, device):
        """Move the members and the running means to ``device`` (returns self)."""
        self.device = torch.device(device)
        for member, means in zip(self.members, self.means):
            member.to(self.device)
            for c in means:
                means[c] = means[c].to(self.device)
        return self

    @torch.no_grad()
    def update(self, features, labels):
        """Add one batch (the feature collection of KProBA trainer/trainer.py::Trainer.compute_class_feature_averages).

        ``features``: (B, d, h, w) ``back_out``; ``labels``: (B, H, W) ciss label positions, nearest-resized here
        to h×w as the reference (``F.interpolate(mode="nearest")``; identity when already h×w). For each class c
        in ``classes`` with at least one pixel, the rows of ``features`` at its pixels (in (b, y, x) order) update
        every member's running mean of c.
        """
        features = features.float()
        if features.shape[1] != self.d:
            raise ValueError(f"PrototypeAccumulator: features have {features.shape[1]} channels, expected {self.d}")
        small = F.interpolate(labels[:, None].float(), size=features.shape[-2:], mode="nearest")[:, 0].long()
        rows = features.permute(0, 2, 3, 1).reshape(-1, self.d)
        flat = small.reshape(-1)
        for c in self.classes:
            mask = flat == c
            n = int(mask.sum())
            if n < 1:
                continue
            selected = rows[mask]
            previous = self.counts[c]
            self.counts[c] = previous + n
            for member, means in zip(self.members, self.means):
                batch_mean = member(selected).mean(dim=0)
                means[c] = (means[c] * previous + batch_mean * n) / self.counts[c]

    def finalize(self, previous=None, momentum=KPROBA_MOMENTUM):
        """The prototypes after this step (the end of KProBA
        trainer/trainer.py::Trainer.compute_class_feature_averages): a dict {class: tensor (D,)}.

        For c in ``classes``: ``μ̄_c = mean over members of μ_c`` (members live in different random feature
        spaces, yet are averaged: reproduced), then::

            proto_c = momentum · previous_c + (1 − momentum) · μ̄_c    if c in previous
            proto_c = μ̄_c                                            otherwise

        Classes of ``previous`` not in ``classes`` are kept unchanged. A class of ``classes`` that had no pixel
        has μ̄_c = 0 (the reference's zero default, KProBA KLDA.py::KLDA: reproduced). Tensors are on the
        accumulator's device; ``previous`` may be on any device. ``previous`` is not modified.
        """
        result = {int(c): p.to(self.device) for c, p in (previous or {}).items()}
        for c in self.classes:
            ensemble = torch.stack([means[c] for means in self.means]).mean(dim=0)
            if c in result:
                result[c] = momentum * result[c] + (1 - momentum) * ensemble
            else:
                result[c] = ensemble
        return result

    def all_reduce(self, reduce):
        """Combine the running means of several processes (each over its share of the data) into the means over
        all their pixels: ``μ_c ← Σ_r n_r,c·μ_r,c / Σ_r n_r,c`` (0 where no process saw c). ``reduce(tensor)``
        sums a tensor over the processes in place (``StepData.all_reduce``). Not needed on one process."""
        counts = torch.tensor([float(self.counts[c]) for c in self.classes], dtype=torch.float64,
                              device=self.device)
        sums = torch.stack([torch.stack([means[c].double() * self.counts[c] for c in self.classes])
                            for means in self.means])  # (members, classes, D)
        reduce(counts)
        reduce(sums)
        for index, c in enumerate(self.classes):
            total = counts[index]
            self.counts[c] = int(total.item())
            for member, means in enumerate(self.means):
                means[c] = (sums[member, index] / total).float() if total > 0 else torch.zeros_like(means[c])

    def state_dict(self):
        """Running state as plain Python and CPU tensors (for ``--resume`` in the middle of the pass)."""
        return {"classes": list(self.classes), "seeds": [m.seed for m in self.members], "d": self.d, "D": self.D,
                "sigma": self.members[0].sigma, "counts": dict(self.counts),
                "means": [{c: t.cpu() for c, t in means.items()} for means in self.means]}

    def load_state_dict(self, state):
        """Restore :meth:`state_dict` (the members are re-drawn from their seeds, which must match)."""
        mine = (self.classes, [m.seed for m in self.members], self.d, self.D, self.members[0].sigma)
        theirs = (list(state["classes"]), list(state["seeds"]), state["d"], state["D"], state["sigma"])
        if mine != theirs:
            raise ValueError(f"PrototypeAccumulator state for (classes, seeds, d, D, sigma) = {theirs}, "
                             f"expected {mine}")
        self.counts = {int(c): int(n) for c, n in state["counts"].items()}
        self.means = [{int(c): t.to(self.device) for c, t in means.items()} for means in state["means"]]


def prototypes_state(prototypes):
    """Prototypes as a checkpoint-safe dict {int class: CPU tensor (D,)} (the reference's ``.pt`` file)."""
    return {int(c): p.detach().cpu() for c, p in prototypes.items()}


def similarity_weights(features, prototypes, rff, n_old, tau=KPROBA_TAU):
    """KProBA's similarity weights κ (KProBA trainer/trainer.py::compute_similarity_weights): (B, n_old, h, w)
    from features (B, d, h, w).

    ``rff``: ensemble member 0's :class:`RandomFourierFeatures`; ``prototypes``: {class: tensor (D,)}. For every
    stored class c < n_old (others, and old classes without a prototype, get w_c = 0)::

        w_c = exp(−‖φ(f) − proto_c‖₂ / τ),    κ_c = w_c / (Σ_c' w_c' + 1e−8)
    """
    batch, d, height, width = features.shape
    phi = rff(features.float().reshape(batch, d, -1).permute(0, 2, 1))  # (B, hw, D)
    weights = phi.new_zeros(batch, phi.shape[1], n_old)
    for c, proto in prototypes.items():
        if not 0 <= c < n_old:
            continue
        dist = torch.norm(phi - proto.to(phi.device).float()[None, None], dim=2)
        weights[:, :, c] = torch.exp(-dist / tau)
    kappa = weights / (weights.sum(dim=2, keepdim=True) + KPROBA_KAPPA_EPS)
    return kappa.permute(0, 2, 1).reshape(batch, n_old, height, width)


@torch.no_grad()
def kproba_pseudo_labels(features, prototypes, rff, old_logits, labels, n_old, tau=KPROBA_TAU):
    """KProBA's pseudo-labels (KProBA trainer/trainer.py::generate_pseudo_labels), at label resolution (B, H, W).

    ``features``: the **student's** ``back_out`` (B, d, h, w); ``prototypes``: {class: (D,)}; ``rff``: member 0's
    :class:`RandomFourierFeatures`; ``old_logits``: the teacher's logits (B, n_old, h', w') at any resolution;
    ``labels``: (B, H, W); ``n_old`` = C_{t−1}, the old classes including background::

        κ = up(similarity_weights(features))         bilinear, align_corners False, to H×W
        q = softmax(up(O'))                          over the n_old channels (softmax although BARM trains BCE)
        y_ps = y                                     where y > 0 (255 included)
        y_ps = argmax_c κ_c·q_c  if max_c κ_c·q_c > 0, else 0       where y = 0

    No confidence threshold (``--pseudo_thresh`` is dead in KProBA).
    """
    if old_logits.shape[1] != n_old:
        raise ValueError(f"kproba_pseudo_labels: teacher logits have {old_logits.shape[1]} channels, "
                         f"expected n_old = {n_old}")
    size = labels.shape[-2:]
    kappa = losses.upsample(similarity_weights(features, prototypes, rff, n_old, tau), size)
    q = torch.softmax(losses.upsample(old_logits.float(), size), dim=1)
    weighted = kappa * q
    best_score = weighted.amax(dim=1)
    best = weighted.argmax(dim=1)
    background = torch.where(best_score > 0, best.to(labels.dtype), torch.zeros_like(labels))
    return torch.where(labels > 0, labels, background)


def prototype_classes(classes_per_step, step):
    """The classes U whose prototypes step ``step`` updates (KProBA
    trainer/trainer.py::Trainer.compute_class_feature_averages), as channel positions.

    ``classes_per_step``: class counts of steps 0..t (step 0 with the background). Step 0: ``0 … n_0 − 1``;
    t > 0: the background 0 and the new classes ``C_{t−1} … C_t − 1``. (The reference wrote the step's class
    ids, which equal the positions for the ascending orders; positions are what its labels and κ index.)
    """
    counts = [int(n) for n in classes_per_step[:step + 1]]
    if step == 0:
        return list(range(counts[0]))
    first = sum(counts[:-1])
    return [0] + list(range(first, first + counts[-1]))


# ======================================================================================================
# The method
# ======================================================================================================

#: KProBA's runs: its VOC scripts (scripts/run_init.sh, run.sh: one GPU, 5 epochs, batch 16, --lr 0.001); on ADE its
#: README gives BARM's settings (no number is published).
KPROBA_PUBLISHED = {
    "voc": Published("KProBA scripts/run_init.sh, scripts/run.sh (1 GPU, batch 16, 5 epochs, --lr 0.001)",
                     train_epoch=(5, 5), global_batch=(16, 16), lr=(0.001, 0.001), gpus=(1, 1), crop_size=513,
                     random_seed=1, amp=True),
    "ade": BARM_PUBLISHED["ade"],
}

#: BARM's hyper-parameters that KProBA does not read: its pseudo-label rule has no threshold (KProBA
#: trainer/trainer.py::generate_pseudo_labels).
KPROBA_UNUSED_HYPER = ("pseudo_thresh",)

KProbaHyper = dataclasses.make_dataclass(
    "KProbaHyper",
    [(f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
     for f in dataclasses.fields(BarmHyper) if f.name not in KPROBA_UNUSED_HYPER])
KProbaHyper.__module__ = __name__
KProbaHyper.__doc__ = ("BARM's hyper-parameters without --pseudo_thresh (BARM utils/parser.py::get_argparser;"
                       " dead in KProBA trainer/trainer.py::generate_pseudo_labels).")


class KProBA(BARM):
    """KProBA (KProBA trainer/trainer.py, KLDA.py): BARM with kernel-prototype pseudo-labels.

    Before every step, one pass over the step's training batches (:meth:`before_step`) updates the prototypes
    of :func:`prototype_classes` with the student as the reference had it: train mode (BN on batch statistics,
    updating its running statistics, at step 0 and without ``--bn_freeze``; frozen with ``--bn_freeze`` at t >
    0), no autocast, fp32, no gradients. At t > 0 with ``--pseudo`` the loss is BARM's with the targets of
    :func:`kproba_pseudo_labels` (``--pseudo_thresh`` does not exist: it was dead in KProBA).
    """
    name = "kproba"
    domain_refusal = ("it finds old-class prototypes in the background, and cityscapes_domain has no background: its 19"
                      " classes are labelled at every step and no step adds a class")
    Hyper = KProbaHyper

    def __init__(self, hyper=None, dataset="voc"):
        super().__init__(hyper, dataset)
        self.prototypes = {}  # {channel: CPU tensor (D,)} after this step's pass (or restored)
        self.previous_prototypes = {}  # step t-1's, blended with momentum 0.9
        self._rff = None  # member 0's feature map, rebuilt from its seed when first needed
        self._device_prototypes = None

    def published(self):
        return KPROBA_PUBLISHED.get(self.dataset)

    # ---- before the step: the prototypes ----------------------------------------------------------------
    def before_step(self, model, teacher, data, ctx):
        """Prototype pass (KProBA trainer/trainer.py::Trainer.compute_class_feature_averages) over
        ``data.train_batches()`` with ``model`` in the mode the trainer set (train mode, BN per ``--bn_freeze``);
        multi-process: the means over every process's pixels (docs/differences.md)."""
        classes = prototype_classes(ctx.classes_per_step, ctx.step)
        accumulator = None
        # fp32: no autocast (KProBA trainer/trainer.py::Trainer.compute_class_feature_averages)
        with torch.no_grad():
            for index, batch in enumerate(data.train_batches()):
                if index == 0:
                    # quirk (KProBA trainer/trainer.py::Trainer.compute_class_feature_averages): the
                    # reference's one-batch probe of the feature width is a forward in train mode too, so at
                    # step 0 it moves the BN running statistics once more
                    model(batch.images)
                back_out = model(batch.images)[1]["back_out"]
                if accumulator is None:
                    accumulator = PrototypeAccumulator(classes, back_out.shape[1]).to(back_out.device)
                accumulator.update(back_out, batch.labels)
        # deviation (docs/differences.md): the reference kept each rank's own statistics (KProBA
        # trainer/trainer.py::Trainer.compute_class_feature_averages)
        if data.dist.distributed:
            accumulator.all_reduce(data.all_reduce)
        self.prototypes = prototypes_state(accumulator.finalize(self.previous_prototypes))
        self._device_prototypes = None
        log.info("KProBA prototypes of step %d: classes %s updated from %d pixels", ctx.step, classes,
                 sum(accumulator.counts.values()))

    # ---- per batch ------------------------------------------------------------------------------------
    def _feature_map(self, d, device):
        """Ensemble member 0's random Fourier features (the only member KProBA's pseudo-labels use)."""
        if self._rff is None or self._rff.d != d or self._rff.omega.device != torch.device(device):
            self._rff = RandomFourierFeatures(d, KPROBA_RFF_DIM, KPROBA_SIGMA, KPROBA_SEEDS[0]).to(device)
        return self._rff

    def _prototypes_on(self, device):
        if self._device_prototypes is None or self._device_prototypes[0] != device:
            self._device_prototypes = (device, {c: p.to(device) for c, p in self.prototypes.items()})
        return self._device_prototypes[1]

    def pseudo_labels(self, back_out, old_logits, labels, ctx):
        """:func:`kproba_pseudo_labels` with the stored prototypes and member 0's map (KProBA
        trainer/trainer.py::generate_pseudo_labels)."""
        device = back_out.device
        return kproba_pseudo_labels(back_out, self._prototypes_on(device), self._feature_map(back_out.shape[1], device),
                                    old_logits, labels, ctx.num_old)

    def loss(self, outputs, teacher_outputs, batch, ctx):
        if not self.needs_teacher(ctx):
            return super().loss(outputs, teacher_outputs, batch, ctx)
        logits, features = outputs
        prev_logits, prev_features = teacher_outputs
        pseudo = self.pseudo_labels(features["back_out"], prev_logits, batch.labels, ctx)
        hp = self.hp
        terms, _ = barm_loss(logits, features, prev_logits, prev_features, batch.labels, ctx.num_new,
                             loss_type=hp.loss_type, w_tri=hp.w_tri, w_fd=hp.w_fd, w_gkd=hp.w_gkd,
                             w_bga_ce=hp.w_bga_ce, pseudo_labels=pseudo)
        return terms

    # ---- state ----------------------------------------------------------------------------------------
    def state_dict(self):
        """``prototypes`` ({channel: CPU tensor (D,)}) and the feature map's settings (the reference's
        ``class_avg_features_step_{t}.pt``, here inside the checkpoint)."""
        return {"prototypes": dict(self.prototypes), "rff_dim": KPROBA_RFF_DIM, "sigma": KPROBA_SIGMA,
                "seeds": list(KPROBA_SEEDS)}

    @staticmethod
    def _read_prototypes(state):
        settings = (state.get("rff_dim", KPROBA_RFF_DIM), state.get("sigma", KPROBA_SIGMA),
                    list(state.get("seeds", KPROBA_SEEDS)))
        if settings != (KPROBA_RFF_DIM, KPROBA_SIGMA, list(KPROBA_SEEDS)):
            raise ValueError(f"KProBA prototypes computed with (D, sigma, seeds) = {settings}, expected"
                             f" {(KPROBA_RFF_DIM, KPROBA_SIGMA, list(KPROBA_SEEDS))}")
        return {int(c): p.detach().cpu() for c, p in state.get("prototypes", {}).items()}

    def load_state_dict(self, state):
        self.prototypes = self._read_prototypes(state)
        self._device_prototypes = None

    def load_previous_state(self, state, ctx):
        self.previous_prototypes = self._read_prototypes(state)
        self.prototypes, self._device_prototypes = {}, None
        if not self.previous_prototypes:
            log.warning("KProBA step %d: the previous checkpoint holds no prototypes (not a KProBA run?): the old"
                        " classes start without any, so their similarity weights are 0", ctx.step)
