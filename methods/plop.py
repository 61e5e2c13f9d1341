"""PLOP: pseudo-labels from the old model's entropy and Local POD distillation (PLOP train.py::Trainer.train,
train.py::features_distillation).

At step t ≥ 1 the old model (teacher) relabels the ground-truth background pixels: a pixel whose teacher
prediction ŷ has a normalised entropy below the per-class threshold τ_ŷ gets the label ŷ, the others are
ignored; each image's cross-entropy is scaled by the fraction of its background pixels that were kept.
The thresholds are approximate medians of an entropy histogram gathered over the training set before the
first epoch, computed with the reference's loop, bugs included (PLOP train.py::Trainer.find_median). Local POD
distils width/height pooled statistics of squared intermediate maps at several scales (PLOP
train.py::features_distillation).

This module holds the loss terms as pure functions of tensors (PLOP train.py, argparser.py::modify_command_options)
and the method :class:`PLOP` (``--method plop``) at its end; shapes: B images, K_old teacher channels, K_t
student channels, N_new = K_t − K_old.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.base import Deviation, hyper, per_dataset
from methods.losses import ce_all_pixels, check_map_pairs, collapse_logits, layer_factors
from methods.mib_family import INIT_FULL, PLOP_PROTOCOL, MiBFamily, protocol_hyper
from utils.tasks import is_domain_incremental

IGNORE_INDEX = 255

# loss weights (PLOP argparser.py::modify_command_options; ADE: PLOP scripts/ade/plop_ade_*.sh): λ of the five
# feature maps and of the collapsed small logits
POD_FACTOR_VOC = 0.01
POD_LOGITS_FACTOR_VOC = 0.0005
POD_FACTOR_ADE = 0.001
POD_LOGITS_FACTOR_ADE = 1e-5
# Cityscapes domains (PLOP scripts/cityscapesDomain/plop_cityscapesDomain_11-1.sh: --pod_factor 0.0001 and the logits'
# "after" factor 0.0001; the 1-1 script sets that one to 0.001, which scripts/recipes/mib.sh passes for 1-1)
POD_FACTOR_CITYSCAPES = 1e-4
POD_LOGITS_FACTOR_CITYSCAPES = 1e-4
POD_FACTORS = {"voc": (POD_FACTOR_VOC, POD_LOGITS_FACTOR_VOC), "ade": (POD_FACTOR_ADE, POD_LOGITS_FACTOR_ADE),
               "cityscapes_domain": (POD_FACTOR_CITYSCAPES, POD_LOGITS_FACTOR_CITYSCAPES)}
POD_SCALES = (1, 2, 4)  # spp_scales of Local POD (PLOP train.py::features_distillation)

# entropy pseudo-labelling (PLOP train.py::Trainer.find_median, Trainer.train)
ENTROPY_BINS = 100  # histogram bins of the per-class entropy medians
ENTROPY_THRESHOLD_MIN = 0.001  # τ_min: lower bound of every class threshold (`--threshold`)
ENTROPY_EPS = 1e-8  # inside the log of the entropy, as the reference
ADAPTIVE_FACTOR_EPS = 1e-6  # denominator ε of the per-image factor a_b (PLOP commit b70fb8f, train.py::Trainer.train)


def normalized_entropy(probs):
    """Normalised entropy ē of a probability map (PLOP train.py::entropy).

    ``probs``: (B, K, H, W) class probabilities (K = the teacher's K_old channels in PLOP). Returns (B, H, W)::

        ē(P) = −(1 / log K) · (1 / K) · Σ_c P_c · log(P_c + 1e-8)

    Note the *mean* over the K channels (not the sum), so ē ≤ 1/K; K ≥ 2 is required.
    """
    probs = probs.float()
    n_channels = probs.shape[1]
    if n_channels < 2:
        raise ValueError(f"normalized_entropy: probs must have at least 2 channels, got shape {tuple(probs.shape)}")
    return -(probs * torch.log(probs + ENTROPY_EPS)).mean(dim=1) / math.log(n_channels)


def entropy_histogram(probs, labels, n_classes_total, bins=ENTROPY_BINS):
    """One batch's contribution to PLOP's per-class entropy histogram (PLOP train.py::Trainer.find_median).

    ``probs``: (B, K_old, H, W) teacher softmax (upsampled logits); ``labels``: (B, H, W) masked ground truth;
    ``n_classes_total``: K_t, the current number of classes. Only pixels with label 0 count: with
    ŷ = argmax_c P_c and v = ē(P) / log(K_t) (entropy normalised a second time, by the *current* class count),
    ``H[ŷ, min(⌊bins·v⌋, bins − 1)] += 1``. Returns an int64 (K_t, bins) tensor on ``probs``' device; the
    caller sums the batches (per rank, no all-reduce in the reference). ⌊·⌋ truncates toward zero, as the
    reference's ``.long()`` (the same as floor since v ≥ 0).
    """
    probs = probs.float()
    entropy = normalized_entropy(probs) / math.log(n_classes_total)
    predicted = probs.argmax(dim=1)
    background = labels == 0
    rows = predicted[background]
    columns = (entropy[background] * bins).long().clamp(max=bins - 1)
    flat = torch.bincount(rows * bins + columns, minlength=n_classes_total * bins)
    return flat.view(n_classes_total, bins).to(torch.int64)


def median_thresholds(histogram, min_threshold=ENTROPY_THRESHOLD_MIN):
    """Per-class entropy thresholds τ from the histogram, with the reference's loop (PLOP
    train.py::Trainer.find_median).

    ``histogram``: (K_t, n_bins) int64 counts (n_bins = 100 in PLOP). Returns (K_t,) float32 τ on the
    histogram's device. For each class c with n_c = Σ H[c] > 0, half = n_c / 2 and r = 0; for k = 0 … n_bins − 1:
    ℓ = k / n_bins, b = int(ℓ·n_bins); stop if half ≥ r and half ≤ r + H[c, b]; otherwise r += ℓ·n_bins. Then
    median_c = ℓ + (half − r) / H[c, b] · (1 / n_bins) with the ℓ, b, r at the stop (if it never stops: ℓ and b
    of k = n_bins − 1 and r after its last increment, i.e. Σ_k k = 4950 for 100 bins);
    τ_c = max(median_c, min_threshold) with Python's ``max(tensor, float)`` semantics; a class with n_c = 0 gets
    min_threshold.

    This is *not* a median: every quirk below is reproduced on purpose, because the thresholds decide which
    pixels are pseudo-labelled. Arithmetic is float32 like the reference's tensors (half is a float32 tensor,
    r a Python float), so a zero count at the chosen bin gives ±inf or nan rather than an exception.
    """
    counts = histogram.detach().to("cpu", torch.int64)
    n_classes, n_bins = counts.shape
    medians = torch.zeros(n_classes, dtype=torch.float32)
    for c in range(n_classes):
        n_c = counts[c].sum()
        if n_c <= 0:
            continue  # stays 0, raised to min_threshold below
        half = n_c / 2  # float32 tensor, as the reference's `total / 2`
        running = 0.0
        for k in range(n_bins):
            lower = k / n_bins
            # quirk (PLOP train.py::Trainer.find_median): float bin index, int(k / 100 * 100) is 28, 56, 57
            # at k = 29, 57, 58
            b = int(lower * n_bins)
            count = counts[c, b].float()
            if half >= running and half <= running + count:
                break
            # quirk (PLOP train.py::Trainer.find_median): the running sum adds the bin index, not the bin's count
            running += lower * n_bins
        # quirk (PLOP train.py::Trainer.find_median): without a stop this uses k = n_bins − 1 (usually an empty
        # bin), and an empty bin at the stop divides by zero: ±inf or nan, kept as in the reference
        medians[c] = lower + ((half - running) / count) * (1 / n_bins)
    # quirk (PLOP train.py::Trainer.find_median): Python max(median, τ_min) returns median unless τ_min > median,
    # so −inf and 0 (empty class) become τ_min, +inf stays inf and nan stays nan
    thresholds = torch.where(min_threshold > medians, torch.full_like(medians, min_threshold), medians)
    return thresholds.to(histogram.device)


def exact_median_thresholds(histogram, min_threshold=ENTROPY_THRESHOLD_MIN):
    """Per-class entropy thresholds from the true medians of the histogram (``--clean``'s alternative to
    :func:`median_thresholds`, PLOP's loop with its quirks).

    ``histogram``: (K_t, n_bins) counts of the normalised entropy over [0, 1) in bins of width 1 / n_bins. For a
    class with n_c > 0 counts, with C_b the cumulative count up to bin b included and b* the first bin where
    C_b ≥ n_c / 2, the median interpolated linearly inside that bin::

        median_c = (b* + (n_c / 2 − C_{b*−1}) / H[c, b*]) / n_bins        (C_{−1} = 0)

    τ_c = max(median_c, min_threshold); a class without counts gets min_threshold. Returns (K_t,) float32 on the
    histogram's device."""
    counts = histogram.detach().to("cpu", torch.float64)
    n_classes, n_bins = counts.shape
    thresholds = torch.full((n_classes,), float(min_threshold), dtype=torch.float64)
    for c in range(n_classes):
        total = counts[c].sum()
        if total <= 0:
            continue
        cumulative = counts[c].cumsum(0)
        half = total / 2
        b = int(torch.nonzero(cumulative >= half)[0])
        before = cumulative[b - 1] if b > 0 else 0.0
        median = (b + (half - before) / counts[c, b]) / n_bins
        thresholds[c] = max(float(median), float(min_threshold))
    return thresholds.to(torch.float32).to(histogram.device)


def entropy_pseudo_labels(old_logits_up, labels, thresholds, n_old):
    """PLOP's entropy pseudo-labels and per-image classification factor (PLOP train.py::Trainer.train).

    ``old_logits_up``: (B, K_old, H, W) teacher logits upsampled to the labels' size; ``labels``: (B, H, W) with
    255 = ignore; ``thresholds``: (K_t,) τ from :func:`median_thresholds` (its length gives K_t); ``n_old``:
    K_old. With P = softmax(z^old), ŷ = argmax P, m_bg = (y < K_old), valid = ē(P) / log(K_t) < τ_ŷ::

        y' = y;  y'[m_bg ∧ ¬valid] = 255;  y'[m_bg ∧ valid] = ŷ   (ŷ may be 0)
        a_b = |m_bg ∧ valid|_b / (|m_bg|_b + 1e-6)

    Returns ``(new_labels, factor)``: new labels (B, H, W) with the labels' dtype (the input is not modified)
    and the float32 factor a (B,), which is 0 for an image without background pixels (the ε avoids the 0/0
    of PLOP train.py::Trainer.train before commit b70fb8f).
    """
    with torch.no_grad():
        probs = torch.softmax(old_logits_up.float(), dim=1)
        predicted = probs.argmax(dim=1)
        thresholds = thresholds.to(device=probs.device, dtype=torch.float32)
        n_classes_total = thresholds.numel()
        valid = normalized_entropy(probs) / math.log(n_classes_total) < thresholds[predicted]
        background = labels < n_old
        new_labels = labels.clone()
        new_labels[background & ~valid] = IGNORE_INDEX
        kept = background & valid
        new_labels[kept] = predicted[kept].to(labels.dtype)
        factor = kept.float().sum(dim=(1, 2)) / (background.float().sum(dim=(1, 2)) + ADAPTIVE_FACTOR_EPS)
    return new_labels, factor


def weighted_ce_all_pixels(logits, labels, factor):
    """PLOP's classification loss (PLOP train.py::Trainer.train): mean over all B·H·W pixels of a_b · CE(z, y').

    ``logits``: (B, K_t, H, W) student logits (upsampled); ``labels``: (B, H, W) pseudo-labels y' with 255 = ignore
    (per-pixel loss 0, still counted in the mean, as in PLOP train.py::Trainer.train); ``factor``: (B,) a_b,
    multiplying every pixel of image b, new-class pixels included. Returns a float32 scalar.
    """
    per_pixel = F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE_INDEX, reduction="none")
    return (per_pixel * factor.float().view(-1, 1, 1)).mean()


def _local_pod_embedding(x, scales):
    """Φ(X) of Local POD for squared maps ``x`` (B, C, H, W): per scale s (k = W // s) and region (i, j), the means
    over the width axis and over the height axis, concatenated per sample.

    The reference loops over the regions and interleaves their two means; here each scale's regions are one
    (B, C, s, k, s, k) view of the top-left s·k × s·k block, reduced twice, so the elements come in another
    order. Φ only enters a Euclidean norm of Φ(A²) − Φ(A'²), which the order does not change (the sums
    agree to ~1e-7). Maps must be square, as PLOP's are (the region size comes from the last axis)."""
    batch, channels, height, width = x.shape
    if height != width:
        raise ValueError(f"Local POD needs square maps, got {height}x{width}")
    x = x.contiguous()  # the reductions below are several times slower on channels-last strides
    pieces = []
    for scale in scales:
        k = width // scale
        regions = x[:, :, :scale * k, :scale * k].reshape(batch, channels, scale, k, scale, k)
        pieces.append(regions.mean(dim=5).reshape(batch, -1))  # mean over each region's width axis
        pieces.append(regions.mean(dim=3).reshape(batch, -1))  # mean over each region's height axis
    return torch.cat(pieces, dim=1)


def local_pod(old_maps, new_maps, factors, n_classes_total, n_new, scales=POD_SCALES):
    """PLOP's Local POD distillation (PLOP train.py::features_distillation).

    ``old_maps`` / ``new_maps``: lists of L teacher / student maps A_ℓ, A'_ℓ of equal shapes (B, C_ℓ, W_ℓ, W_ℓ)
    (PLOP: the four pre-activation stage outputs, x_pl, and the small logits with the student collapsed by
    :func:`collapse_logits`); ``factors``: the L weights λ_ℓ (see :func:`layer_factors`); ``n_classes_total``:
    K_t; ``n_new``: N_new. Each map is squared elementwise, then Φ (:func:`_local_pod_embedding`) gives per
    sample the width- and height-means of every region of every scale (no L2 normalisation)::

        d_ℓ = mean_b ‖Φ(A_ℓ²)_b − Φ(A'_ℓ²)_b‖₂
        L_POD = (1/L) Σ_ℓ λ_ℓ · √(K_t / N_new) · d_ℓ

    Returns a float32 scalar (differentiable with respect to the student maps).
    """
    check_map_pairs("local_pod", old_maps, new_maps, factors, n_new)
    schedule = math.sqrt(n_classes_total / n_new)
    total = old_maps[0].new_zeros((), dtype=torch.float32)
    for old, new, factor in zip(old_maps, new_maps, factors):
        old_emb = _local_pod_embedding(old.float().pow(2), scales)
        new_emb = _local_pod_embedding(new.float().pow(2), scales)
        # torch.frobenius_norm(·, dim=-1) of PLOP train.py::features_distillation = vector 2-norm over the last axis
        distance = torch.linalg.vector_norm(old_emb - new_emb, ord=2, dim=-1).mean()
        total = total + factor * schedule * distance
    return total / len(old_maps)


# ======================================================================================================
# The method (PLOP argparser.py::modify_command_options, train.py::Trainer)
# ======================================================================================================

@dataclass
class PLOPHyper:
    pod_factor: float = hyper(POD_FACTOR_VOC, "t>0: Local POD weight of the four stages and x_pl (VOC 0.01, ADE"
                                              " 0.001)", low=0.0)
    pod_logits_factor: float = hyper(POD_LOGITS_FACTOR_VOC, "t>0: Local POD weight of the collapsed small logits"
                                                            " (VOC 0.0005, ADE 1e-5)", low=0.0)
    threshold: float = hyper(ENTROPY_THRESHOLD_MIN, "lower bound of every class's entropy threshold", low=0.0)
    classif_adaptive_factor: bool = hyper(True, "t>0: scale each image's cross-entropy by the fraction of its"
                                                " background pixels that were pseudo-labelled")
    init_balanced: bool = hyper(True, "t>0: background initialisation of the new classifier (weights and biases,"
                                      " b <- b_bg - log(N+1))")
    protocol: str = protocol_hyper(PLOP_PROTOCOL)
    exact_median: bool = hyper(False, "t>0: entropy thresholds from the histograms' true medians (default: PLOP's"
                                      " loop, whose quirks decide which pixels are pseudo-labelled; --clean: on)")
    histogram_per_process: bool = hyper(True, "t>0: each process's thresholds from its own share of the images, as"
                                              " PLOP (--clean: one histogram summed over the processes)")


class PLOP(MiBFamily):
    """PLOP (PLOP argparser.py::modify_command_options, train.py::Trainer): MiB's network with the
    pre-activation taps, PLOP's label tables (void ignored, ADE class 0 scored, future classes background at
    test).

    * step 0: plain CE over all pixels;
    * before the first epoch of a step t ≥ 1 (``before_step``): the teacher's entropy histogram over one
      pass of the training loader (training augmentation), summed over the processes, and the per-class
      thresholds of :func:`median_thresholds` (kept in the method's state);
    * t ≥ 1: ``a_b`` · CE on the entropy pseudo-labels (:func:`entropy_pseudo_labels`,
      :func:`weighted_ce_all_pixels`) + Local POD (:func:`local_pod`) over the five ``attentions`` and the
      small logits (the student's collapsed by :func:`collapse_logits`), weights (``pod_factor`` × 5,
      ``pod_logits_factor``);
    * new classifier: MiB's background initialisation (``--no_init_balanced`` keeps PyTorch's).

    At a step that adds no class (Cityscapes domains, PLOP scripts/cityscapesDomain/plop_cityscapesDomain_*.sh) there
    is no background to pseudo-label: the loss is plain CE over all pixels + Local POD over the same six maps, the
    logits uncollapsed (teacher and student have the same channels) and the factor √(K_t / N_new) = 1 (PLOP
    train.py::Trainer.__init__ counts the 19 classes as new there); no thresholds, no initialisation.
    """

    name = "plop"
    deviations = (
        Deviation("exact_median", True,
                  "PLOP's entropy thresholds come from a loop that is not a median (float bin index, the running sum"
                  " adds the bin index, not its count: PLOP train.py::Trainer.find_median)",
                  "the thresholds that decide which pixels are pseudo-labelled are not the medians the paper states"),
        Deviation("histogram_per_process", False,
                  "PLOP's processes each compute thresholds from their own share of the images",
                  "the thresholds, hence the pseudo-labels, depend on the number of GPUs"),
    )
    Hyper = PLOPHyper
    default_protocol = PLOP_PROTOCOL

    def __init__(self, hyper=None, dataset="voc"):
        super().__init__(hyper, dataset)
        self.thresholds = None  # (K_t,) float32 CPU, from before_step

    @classmethod
    def default_hyper(cls, dataset):
        factor, logits_factor = per_dataset(POD_FACTORS, dataset)
        with_background = not is_domain_incremental(dataset)  # PLOP's Cityscapes scripts set neither
        return cls.Hyper(pod_factor=factor, pod_logits_factor=logits_factor, init_balanced=with_background,
                         classif_adaptive_factor=with_background)

    def build_network(self, spec, classes_per_step, pretrained=None, layout_step=None):
        model = super().build_network(spec, classes_per_step, pretrained, layout_step)
        model.return_attentions = True  # the pre-activation taps of Local POD (PLOP models/resnet.py::ResNet.forward)
        return model

    def background_init(self, ctx):
        return INIT_FULL if self.hp.init_balanced else None

    def before_step(self, model, teacher, data, ctx):
        """The per-class entropy thresholds (PLOP train.py::Trainer.find_median): each process's from its own share
        of the images, as PLOP, or (``--no_histogram_per_process``) from one histogram summed over the processes;
        with PLOP's loop, or (``--exact_median``) the true medians."""
        if ctx.step == 0 or not ctx.adds_classes:  # nothing to pseudo-label at a domain step
            return
        histogram = torch.zeros(ctx.num_classes, ENTROPY_BINS, dtype=torch.int64, device=data.device)
        with torch.no_grad(), data.eval_mode(teacher):
            for batch in data.train_batches():
                with data.autocast():
                    logits = teacher(batch.images)[0]
                probs = torch.softmax(self.upsampled(logits, batch.labels), dim=1)
                histogram += entropy_histogram(probs, batch.labels, ctx.num_classes)
        if not self.hp.histogram_per_process:
            data.all_reduce(histogram)
        thresholds = exact_median_thresholds if self.hp.exact_median else median_thresholds
        self.thresholds = thresholds(histogram, self.hp.threshold).cpu()

    def loss(self, outputs, teacher_outputs, batch, ctx):
        logits, features = outputs
        logits_up = self.upsampled(logits, batch.labels)
        if ctx.step == 0:
            ce = ce_all_pixels(logits_up, batch.labels)
            return {"total": ce, "ce": ce}
        old_logits, old_features = teacher_outputs
        old_maps = list(old_features["attentions"]) + [old_features["sem_logits_small"]]
        factors = layer_factors(len(old_maps), self.hp.pod_factor, self.hp.pod_logits_factor)
        if not ctx.adds_classes:  # a domain step (PLOP plop_cityscapesDomain_*.sh): CE + Local POD, factor 1
            ce = ce_all_pixels(logits_up, batch.labels)
            new_maps = list(features["attentions"]) + [features["sem_logits_small"]]
            pod = local_pod(old_maps, new_maps, factors, ctx.num_classes, ctx.num_classes)
            return {"total": ce + pod, "ce": ce, "pod": pod}
        if self.thresholds is None or self.thresholds.numel() != ctx.num_classes:
            raise RuntimeError("PLOP.loss at t > 0 needs the thresholds of before_step (or of a resumed state)")
        labels, factor = entropy_pseudo_labels(self.upsampled(old_logits, batch.labels), batch.labels,
                                               self.thresholds, ctx.num_old)
        if not self.hp.classif_adaptive_factor:
            factor = torch.ones_like(factor)
        ce = weighted_ce_all_pixels(logits_up, labels, factor)
        new_maps = list(features["attentions"]) + [collapse_logits(features["sem_logits_small"], ctx.num_old)]
        pod = local_pod(old_maps, new_maps, factors, ctx.num_classes, ctx.num_new)
        return {"total": ce + pod, "ce": ce, "pod": pod}

    def state_dict(self):
        return {"thresholds": self.thresholds}

    def load_state_dict(self, state):
        self.thresholds = state.get("thresholds")

    def load_previous_state(self, state, ctx):
        """Nothing is carried across steps: the thresholds are recomputed at every step."""
