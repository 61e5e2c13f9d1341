"""Loss terms of the reference implementations, as plain functions of tensors (no hidden state).

Shapes: logits ``(B, C, H, W)``; labels ``(B, H, W)`` integer class indices with 255 = ignore. Every
function computes in float32 whatever the input dtype (AMP-safe). Citations name the reference repository,
file and function (``REPO path/file.py::Function``).
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = 255

# BARM's loss weights (co_bg, co_tn, co_p, co_oc in BARM trainer/trainer.py::Trainer.train_episode)
BARM_W_TRI = 5.0
BARM_W_FD = 4.0
BARM_W_GKD = 1.0
BARM_W_BGA_CE = 1.0
BARM_PSEUDO_THRESH = 0.7
BGA_CE_EPS = 1e-8  # the reference's denominator epsilon of the background-adaptation CE
# TRI_EPS is added here: BARM trainer/trainer.py::Trainer.train_episode divides by the background-pixel
# count without one (docs/differences.md)
TRI_EPS = 1e-8
FOCAL_ALPHA = 1.0  # BARM utils/loss.py::build_criterion: FocalLoss(alpha=1, gamma=0)
FOCAL_GAMMA = 0.0


def bce_with_ignore(logits, labels, ignore_index=IGNORE_INDEX):
    """BARM's BCE criterion (BARM utils/loss.py::BCEWithLogitsLossWithIgnoreIndex): one-hot targets over the
    C channels, per pixel the sum over channels of BCE, averaged over the pixels whose label is not
    ``ignore_index``."""
    return _masked_mean(_one_hot_bce_per_pixel(logits, labels, ignore_index), labels != ignore_index)


def _softplus(x):
    """``log(1 + e^x)`` as ``max(x, 0) + log(1 + e^{-|x|})``: the per-pixel sums it feeds agree with
    ``F.softplus`` to ~1e-9 relative and its gradient is σ(x), but it runs twice as fast on CPUs where
    ``log1p`` (used by ``F.softplus`` and BCE-with-logits) is not vectorised."""
    return F.relu(x) + torch.log(1 + torch.exp(-x.abs()))


def _one_hot_bce_per_pixel(logits, labels, ignore_index=IGNORE_INDEX):
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


def barm_pseudo_labels(prev_logits_up, labels, thresh=BARM_PSEUDO_THRESH, loss_type="bce_loss"):
    """BARM's pseudo-labels (BARM trainer/trainer.py::Trainer.train_episode): on ground-truth background
    pixels only, the teacher's most confident class replaces 0 when it is a foreground class scoring at least
    ``thresh``."""
    scores, predicted = activation(loss_type)(prev_logits_up.float()).max(dim=1)
    relabel = (labels == 0) & (predicted > 0) & (scores >= thresh)
    return torch.where(relabel, predicted.to(labels.dtype), labels)


def bga_ce_loss(residual, fg_mask):
    """Background-adaptation CE (BARM trainer/trainer.py::Trainer.train_episode): BCE(r, 0) averaged over
    current-foreground pixels."""
    residual = residual.float()
    loss = F.binary_cross_entropy_with_logits(residual, torch.zeros_like(residual), reduction="none")
    return (loss * fg_mask).sum() / (fg_mask.sum() + BGA_CE_EPS)


def tri_bg_loss(residual, bg_mask):
    """Background-adaptation triplet-like term (BARM trainer/trainer.py::Trainer.train_episode): mean over
    background pixels of ``max(0, (σ(r) − 1)² − σ(r)²)``, pushing the residual to be non-negative there."""
    prob = torch.sigmoid(residual.float())
    loss = torch.clamp((prob - 1) ** 2 - prob ** 2, min=0)
    return (loss * bg_mask).sum() / (bg_mask.sum() + TRI_EPS)


def feature_distillation(features, prev_features, bg_mask):
    """Background feature distillation (BARM trainer/trainer.py::Trainer.train_episode): Σ_i MSE(M·f_i, M·f'_i),
    each a mean over all elements (masked zeros included)."""
    total = features[0].new_zeros((), dtype=torch.float32)
    for f, g in zip(features, prev_features):
        total = total + F.mse_loss(f.float() * bg_mask, g.float() * bg_mask)
    return total


def group_kd(heads, prev_heads):
    """Group knowledge distillation (BARM trainer/trainer.py::Trainer.train_episode):
    Σ_i Σ_c mean_{b,x,y} BCE(Z_i[:, c], σ(Z'_i[:, c]))."""
    total = heads[0].new_zeros((), dtype=torch.float32)
    for z, z_prev in zip(heads, prev_heads):
        loss = F.binary_cross_entropy_with_logits(z.float(), torch.sigmoid(z_prev.float()), reduction="none")
        total = total + loss.mean(dim=(0, 2, 3)).sum()
    return total


def barm_loss(logits, features, prev_logits, prev_features, labels, num_new, pseudo_thresh=BARM_PSEUDO_THRESH,
              loss_type="bce_loss", w_tri=BARM_W_TRI, w_fd=BARM_W_FD, w_gkd=BARM_W_GKD, w_bga_ce=BARM_W_BGA_CE,
              pseudo_labels=None):
    """BARM's incremental-step loss with ``--pseudo`` (BARM trainer/trainer.py::Trainer.train_episode).

    ``logits``/``features`` and ``prev_logits``/``prev_features`` are the raw outputs of the student and of
    the teacher at feature resolution (features hold ``prev_heads`` and ``ear_feats``); ``labels`` are at
    image resolution; ``num_new`` is the number of classes of the current step. ``pseudo_labels`` (B, H, W):
    the targets of ``std`` when given (KProBA's rule, KProBA trainer/trainer.py::generate_pseudo_labels: then
    ``pseudo_thresh`` is not used), else BARM's :func:`barm_pseudo_labels` from ``prev_logits``; the masks of
    ``tri_bg``, ``fd`` and ``bga_ce`` always come from ``labels`` (BARM trainer/trainer.py::Trainer.train_episode,
    unchanged in KProBA). Returns ``(terms, pseudo_labels)`` where ``terms`` has ``total``, ``std``, ``tri_bg``,
    ``fd``, ``gkd`` and ``bga_ce``::

        total = std + w_tri·tri_bg + w_fd·fd + w_gkd·gkd + w_bga_ce·bga_ce
    """
    size = labels.shape[-2:]
    logits_up = upsample(logits.float(), size)
    if pseudo_labels is not None:
        if tuple(pseudo_labels.shape) != tuple(labels.shape):
            raise ValueError(f"barm_loss: pseudo_labels of shape {tuple(pseudo_labels.shape)}, expected the labels'"
                             f" shape {tuple(labels.shape)}")
        pseudo = pseudo_labels
    else:
        with torch.no_grad():
            pseudo = barm_pseudo_labels(upsample(prev_logits.float(), size), labels, pseudo_thresh, loss_type)
    n_channels = logits.shape[1]
    # PB-BCE: old foreground classes detached; background and new classes keep their gradient
    adapted = torch.cat([logits_up[:, :1], logits_up[:, 1:n_channels - num_new].detach(),
                         logits_up[:, n_channels - num_new:]], dim=1)
    std = CRITERIA[loss_type](adapted, pseudo)

    feature_size = logits.shape[-2:]
    small = F.interpolate(labels[:, None].float(), size=feature_size, mode="nearest")  # nearest, as the reference
    fg_mask = ((small != 0) & (small != IGNORE_INDEX)).float()
    bg_mask = (small == 0).float()
    residual = features["prev_heads"][-1][:, :1]
    old = len(prev_features["prev_heads"])
    terms = {
        "std": std,
        "tri_bg": tri_bg_loss(residual, bg_mask),
        "fd": feature_distillation(features["ear_feats"][:old], prev_features["ear_feats"], bg_mask),
        "gkd": group_kd(features["prev_heads"][:old], prev_features["prev_heads"]),
        "bga_ce": bga_ce_loss(residual, fg_mask),
    }
    terms["total"] = (terms["std"] + w_tri * terms["tri_bg"] + w_fd * terms["fd"] + w_gkd * terms["gkd"]
                      + w_bga_ce * terms["bga_ce"])
    return terms, pseudo


# ======================================================================================================
# MiB family: FT, LwF, LwF-MC, ILT, EWC, PI, RW, MiB (MiB utils/loss.py, train.py::Trainer.train)
#
# Notation: logits z (B, K_t, H, W) already upsampled to the label size, K_old = the teacher's channel
# count, N_new = K_t − K_old. "mean_Ω" is the mean over ALL B·H·W pixels, ignored (255) pixels included
# with a loss of 0: the reference builds every classification loss with reduction='none' and then calls
# .mean() (MiB train.py::Trainer.train).
# ======================================================================================================

# Default loss weights at steps t ≥ 1, from MiB argparser.py.
LWF_W_KD = 100.0  # LwF: CE + 100·KD
ILT_W_KD = 100.0  # ILT: CE + 100·KD + 100·MSE(mod5)
ILT_W_DE = 100.0
LWFMC_W_ICARL = 10.0  # LwF-MC: BCE + 10·icarl_distillation, itself already ×K_old
MIB_W_KD = 10.0  # MiB: UNCE + 10·UNKD
KD_ALPHA = 1.0  # --alpha: teacher logits are multiplied by it before the softmax

# Parameter regularisers (MiB utils/regularizer.py): L = L_task + λ·R. λ (reg_importance) is MiB's value;
# the PLOP/RCIL argparsers use 100 for all three.
EWC_IMPORTANCE = 500.0
EWC_ALPHA = 0.9  # EMA factor of the "Fisher" update F ← α·g² + (1 − α)·F
PI_IMPORTANCE = 500.0
RW_IMPORTANCE = 100.0
RW_ALPHA = 0.9
RW_ITERATIONS = 10  # the RW score is updated every reg_iterations iterations


def _check_old_channels(n_old, n_channels, what):
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
    _check_old_channels(n_old, logits.shape[1], "unbiased_ce")
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
    _check_old_channels(n_old, logits.shape[1], "unbiased_kd")
    q = torch.softmax(old_logits.float() * alpha, dim=1)
    log_d = torch.logsumexp(logits, dim=1)
    bg_and_new = torch.cat([logits[:, :1], logits[:, n_old:]], dim=1)
    log_bg = torch.logsumexp(bg_and_new, dim=1) - log_d
    log_old = logits[:, 1:n_old] - log_d[:, None]
    per_pixel = (q[:, 0] * log_bg + (q[:, 1:] * log_old).sum(dim=1)) / n_old
    return -per_pixel.mean()


def kd_old_channels(logits, old_logits, alpha=KD_ALPHA):
    """LwF's / ILT's distillation (MiB utils/loss.py::KnowledgeDistillationLoss).

    The first K_old = ``old_logits.shape[1]`` student channels are renormalised by a log-softmax over
    those channels only (log p̃), q = softmax(alpha·z^old)::

        L = − mean_Ω (1/K_old) Σ_{c<K_old} q_c log p̃_c

    The 1/K_old class mean is why LwF's weight is 100. Shapes: logits (B, K_t, H, W), old_logits
    (B, K_old, H, W)."""
    logits = logits.float()
    n_old = old_logits.shape[1]
    _check_old_channels(n_old, logits.shape[1], "kd_old_channels")
    log_p = torch.log_softmax(logits[:, :n_old], dim=1)
    q = torch.softmax(old_logits.float() * alpha, dim=1)
    return -(q * log_p).mean(dim=1).mean()


def bce_all_pixels(logits, labels, ignore_index=IGNORE_INDEX):
    """LwF-MC's classification loss (MiB utils/loss.py::BCEWithLogitsLossWithIgnoreIndex with reduction
    'none' then .mean()), used at every step including step 0.

    One-hot target over all K_t channels (background channel 0 a normal class)::

        ℓ(p) = Σ_{c<K_t} BCEwl(z_c(p), [y(p) = c]),  ℓ(p) = 0 where y(p) = 255;   L = mean_Ω ℓ

    Unlike BARM's :func:`bce_with_ignore` the mean is over ALL pixels. Shapes: logits (B, K_t, H, W),
    labels (B, H, W)."""
    return (_one_hot_bce_per_pixel(logits, labels, ignore_index) * (labels != ignore_index)).mean()


def icarl_distillation(logits, old_logits):
    """LwF-MC's distillation before its weight (MiB train.py)::

        L = K_old · mean_{b, c<K_old, h, w} BCEwl(z_c, σ(z^old_c))

    (a BCE mean over B·K_old·H·W turned into a class sum by the factor K_old). The caller multiplies by
    ``LWFMC_W_ICARL`` (10). Shapes: logits (B, K_t, H, W), old_logits (B, K_old, H, W)."""
    n_old = old_logits.shape[1]
    _check_old_channels(n_old, logits.shape[1], "icarl_distillation")
    loss = F.binary_cross_entropy_with_logits(logits.float()[:, :n_old], torch.sigmoid(old_logits.float()))
    return n_old * loss


def feature_mse(features, old_features):
    """ILT's feature distillation (MiB train.py::Trainer): ``nn.MSELoss()`` between the student's and the
    teacher's ``body`` (mod5 output, (B, 2048, h, w)), a mean over all elements."""
    return F.mse_loss(features.float(), old_features.float())
