"""Loss terms that several methods share, as plain functions of tensors (no hidden state).

A method's own terms live in its file (``methods/barm.py`` holds BARM's, ``methods/lwf.py`` LwF's and LwF-MC's,
...); a term used by two or more methods lives here: BARM's criteria (BARM, KProBA, SSUL), the upsampling of
logits (every method), the MiB family's cross-entropies and unbiased terms (MiB, RCIL, FT, LwF, ILT, EWC, PI,
RW, PLOP) and the map helpers of PLOP's Local POD and RCIL's pooled-cube distillation.

Shapes: logits ``(B, C, H, W)``; labels ``(B, H, W)`` integer class indices with 255 = ignore. Every
function computes in float32 whatever the input dtype (AMP-safe). Citations name the reference repository,
file and function (``REPO path/file.py::Function``, see docs/references.md).
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = 255

FOCAL_ALPHA = 1.0  # BARM utils/loss.py::build_criterion: FocalLoss(alpha=1, gamma=0)
FOCAL_GAMMA = 0.0
KD_ALPHA = 1.0  # --alpha: teacher logits are multiplied by it before the softmax (MiB utils/loss.py)


def bce_with_ignore(logits, labels, ignore_index=IGNORE_INDEX):
    """BARM's BCE criterion (BARM utils/loss.py::BCEWithLogitsLossWithIgnoreIndex): one-hot targets over the
    C channels, per pixel the sum over channels of BCE, averaged over the pixels whose label is not
    ``ignore_index``."""
    return _masked_mean(one_hot_bce_per_pixel(logits, labels, ignore_index), labels != ignore_index)


def _softplus(x):
    """``log(1 + e^x)`` as ``max(x, 0) + log(1 + e^{-|x|})``: the per-pixel sums it feeds agree with
    ``F.softplus`` to ~1e-9 relative and its gradient is σ(x), but it runs twice as fast on CPUs where
    ``log1p`` (used by ``F.softplus`` and BCE-with-logits) is not vectorised."""
    return F.relu(x) + torch.log(1 + torch.exp(-x.abs()))


def one_hot_bce_per_pixel(logits, labels, ignore_index=IGNORE_INDEX):
    """Per pixel ``Σ_c BCE(z_c, 1[y = c])`` in float32, computed as ``Σ_c softplus(z_c) − z_y`` (the same sum,
    without materialising the one-hot targets); ignored pixels hold ``Σ_c softplus(z_c)`` (mask them)."""
    logits = logits.float()
    index = torch.where(labels != ignore_index, labels, 0).long().unsqueeze(1)
    return _softplus(logits).sum(dim=1) - logits.gather(1, index).squeeze(1)


def _masked_mean(per_pixel, valid):
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1)


def ce_with_ignore(logits, labels, ignore_index=IGNORE_INDEX):
    """BARM's ``ce_loss`` (BARM utils/loss.py::build_criterion): softmax cross-entropy averaged over the
    non-ignored pixels only.

    Not the same as ``focal_loss`` (:func:`focal_with_ignore`), which divides by all pixels."""
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index)


def focal_with_ignore(logits, labels, gamma=FOCAL_GAMMA, alpha=FOCAL_ALPHA, ignore_index=IGNORE_INDEX):
    """BARM's ``focal_loss`` criterion (``FocalLoss(alpha=1, gamma=0, size_average=True)``, BARM
    utils/loss.py::build_criterion).

    Per pixel p, with ``CE(p)`` the softmax cross-entropy (0 at ``ignore_index`` pixels) and
    ``p_t = exp(−CE(p))``::

        focal = mean over ALL B·H·W pixels of  alpha · (1 − p_t)^gamma · CE(p)

    Ignored pixels count in the denominator with a loss of 0, so with the defaults (gamma 0) this is
    ``ce_with_ignore × (valid-pixel fraction)``, not ``ce_with_ignore`` (it equals CE only without ignored
    pixels). Shapes: logits (B, C, H, W), labels (B, H, W)."""
    ce = F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index, reduction="none")
    p_t = torch.exp(-ce)
    # reference quirk (BARM utils/loss.py::FocalLoss with size_average): .mean() over all pixels, ignored ones as 0
    return (alpha * (1 - p_t) ** gamma * ce).mean()


CRITERIA = {"bce_loss": bce_with_ignore, "ce_loss": ce_with_ignore, "focal_loss": focal_with_ignore}


def activation(loss_type):
    """Per-pixel class scores the reference uses with ``loss_type``: sigmoid for BCE, softmax otherwise."""
    return torch.sigmoid if loss_type == "bce_loss" else (lambda z: torch.softmax(z, dim=1))


def upsample(x, size):
    """Bilinear, ``align_corners=False``, as every reference upsampling of logits and probabilities."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# ======================================================================================================
# The MiB family's terms (MiB utils/loss.py, train.py::Trainer.train)
#
# Logits z (B, K_t, H, W) already upsampled to the label size, K_old = the teacher's channel count,
# N_new = K_t − K_old. "mean_Ω" is the mean over ALL B·H·W pixels, ignored (255) pixels included with a loss
# of 0: the reference builds every classification loss with reduction='none' and then calls .mean()
# (MiB train.py::Trainer.train).
# ======================================================================================================

def check_old_channels(n_old, n_channels, what):
    if not 0 <= n_old <= n_channels:
        raise ValueError(f"{what}: the old class count must be within 0..{n_channels}, got {n_old}")


def ce_all_pixels(logits, labels, ignore_index=IGNORE_INDEX):
    """Softmax cross-entropy over all K_t channels, averaged over ALL pixels (MiB train.py::Trainer.train).

    ``L = mean_Ω CE(z, y)``, ignored pixels contributing 0 but counted in the B·H·W normaliser (unlike
    :func:`ce_with_ignore`, which divides by the valid pixels). Shapes: logits (B, C, H, W), labels
    (B, H, W). Used by FT, LwF, ILT, EWC, PI, RW and at step 0 of MiB."""
    # reference normaliser (MiB train.py::Trainer.train): reduction='none' then .mean(), ignored pixels included
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index, reduction="none").mean()


def unbiased_ce(logits, labels, n_old, ignore_index=IGNORE_INDEX):
    """MiB's unbiased cross-entropy (MiB utils/loss.py::UnbiasedCrossEntropy).

    With D = logsumexp over all K_t channels of z::

        log P̂_0 = logsumexp_{c < n_old} z_c − D      (background = background or any old class)
        log P̂_c = z_c − D                            for new classes c ≥ n_old
        L = mean_Ω −log P̂_{y'}, y' = 0 where y < n_old, else y; 0 at ignored pixels

    ``n_old`` = K_old (old channels, background included). At ``n_old == 0`` (step 0) this is
    :func:`ce_all_pixels`. Shapes: logits (B, K_t, H, W), labels (B, H, W). The caller's labels are not
    modified (MiB's "Fix UnbiasedCE" commit 1c58983)."""
    logits = logits.float()
    check_old_channels(n_old, logits.shape[1], "unbiased_ce")
    if n_old == 0:
        return ce_all_pixels(logits, labels, ignore_index)
    log_d = torch.logsumexp(logits, dim=1, keepdim=True)
    log_bg = torch.logsumexp(logits[:, :n_old], dim=1, keepdim=True) - log_d
    # compact channels: 0 = background-or-old, 1 + k = new class n_old + k
    log_p = torch.cat([log_bg, logits[:, n_old:] - log_d], dim=1)
    labels = labels.long()
    target = torch.where(labels == ignore_index, labels,
                         torch.where(labels < n_old, torch.zeros_like(labels), labels - n_old + 1))
    return F.nll_loss(log_p, target, ignore_index=ignore_index, reduction="none").mean()


def unbiased_kd(logits, old_logits, alpha=KD_ALPHA):
    """MiB's unbiased knowledge distillation (MiB utils/loss.py::UnbiasedKnowledgeDistillationLoss).

    K_old = ``old_logits.shape[1]``, q = softmax(alpha·z^old) over the K_old channels, D = logsumexp over
    all K_t student channels::

        log P̃_0 = logsumexp_{c ∈ {0} ∪ new} z_c − D     (student background absorbs the new classes)
        log P̃_c = z_c − D                               for 1 ≤ c < K_old
        L = − mean_Ω (1/K_old) [ q_0 log P̃_0 + Σ_{c=1}^{K_old−1} q_c log P̃_c ]

    All pixels (no mask). Shapes: logits (B, K_t, H, W), old_logits (B, K_old, H, W), K_old ≤ K_t."""
    logits = logits.float()
    n_old = old_logits.shape[1]
    check_old_channels(n_old, logits.shape[1], "unbiased_kd")
    q = torch.softmax(old_logits.float() * alpha, dim=1)
    log_d = torch.logsumexp(logits, dim=1)
    bg_and_new = torch.cat([logits[:, :1], logits[:, n_old:]], dim=1)
    log_bg = torch.logsumexp(bg_and_new, dim=1) - log_d
    log_old = logits[:, 1:n_old] - log_d[:, None]
    per_pixel = (q[:, 0] * log_bg + (q[:, 1:] * log_old).sum(dim=1)) / n_old
    return -per_pixel.mean()


# ======================================================================================================
# Maps of PLOP's Local POD and RCIL's pooled-cube distillation (PLOP train.py::features_distillation; RCIL
# forked it)
# ======================================================================================================

def layer_factors(n_maps, factor, last_factor):
    """The per-map weights λ_1..λ_n: ``factor`` for every map but the last, ``last_factor`` for the last one.

    PLOP's Local POD (PLOP train.py::features_distillation): λ_1..λ_5 = pod factor, λ_6 (collapsed small
    logits) = the "after" factor. RCIL's pooled-cube KD uses the same layout (RCIL
    train.py::features_distillation_spatial).
    """
    return [float(factor)] * (n_maps - 1) + [float(last_factor)]


def collapse_logits(new_small_logits, n_old):
    """The student's small logits collapsed to the teacher's K_old channels (PLOP train.py::features_distillation).

    ``new_small_logits``: (B, K_t, h, w) raw logits z'. Returns (B, K_old, h, w)::

        [z'_0 + Σ_{c ≥ K_old} z'_c, z'_1, …, z'_{K_old−1}]      (raw logits summed, "extra_channels: sum")
    """
    z = new_small_logits.float()
    background = z[:, :1] + z[:, n_old:].sum(dim=1, keepdim=True)
    return torch.cat([background, z[:, 1:n_old]], dim=1)


def check_map_pairs(name, old_maps, new_maps, factors, n_new):
    """Raise ValueError unless the teacher maps, student maps and factors of a distillation term ``name`` pair
    up (same count, at least one, equal shapes) and ``n_new`` ≥ 1 (the √(K_t/N_new) factor)."""
    if not len(old_maps) == len(new_maps) == len(factors) or not old_maps:
        raise ValueError(f"{name}: expected as many old maps, new maps and factors (at least one), got"
                         f" {len(old_maps)}, {len(new_maps)}, {len(factors)}")
    for index, (old, new) in enumerate(zip(old_maps, new_maps)):
        if old.shape != new.shape:
            raise ValueError(f"{name}: map {index} has teacher shape {tuple(old.shape)} but student shape"
                             f" {tuple(new.shape)} (collapse the student's logits first)")
    if n_new < 1:
        raise ValueError(f"{name}: n_new must be at least 1 (distillation runs at steps >= 1), got {n_new}")
