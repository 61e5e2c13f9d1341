"""Loss terms of the reference implementations, as plain functions of tensors (no hidden state).

Shapes: logits ``(B, C, H, W)``; labels ``(B, H, W)`` integer class indices with 255 = ignore. Every
function computes in float32 whatever the input dtype (AMP-safe). Spec references are to
``barm-ssul-kproba.md``.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = 255

# BARM's loss weights (spec §4.4: co_bg, co_tn, co_p, co_oc in the reference code)
BARM_W_TRI = 5.0
BARM_W_FD = 4.0
BARM_W_GKD = 1.0
BARM_W_BGA_CE = 1.0
BARM_PSEUDO_THRESH = 0.7
BGA_CE_EPS = 1e-8  # the reference's denominator epsilon of the background-adaptation CE
TRI_EPS = 1e-8  # added here: the reference divides by the background-pixel count without one (spec §10.16)


def bce_with_ignore(logits, labels, ignore_index=IGNORE_INDEX):
    """BARM's ``BCEWithLogitsLossWithIgnoreIndex`` (spec §4.4): one-hot targets over the C channels, per
    pixel the sum over channels of BCE, averaged over the pixels whose label is not ``ignore_index``."""
    logits = logits.float()
    valid = labels != ignore_index
    target = F.one_hot(torch.where(valid, labels, 0).long(), logits.shape[1]).permute(0, 3, 1, 2).float()
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=1)
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1)


def ce_with_ignore(logits, labels, ignore_index=IGNORE_INDEX):
    """Softmax cross-entropy averaged over the non-ignored pixels (``ce_loss``; BARM's ``focal_loss`` has
    gamma 0 and equals it)."""
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index)


CRITERIA = {"bce_loss": bce_with_ignore, "ce_loss": ce_with_ignore, "focal_loss": ce_with_ignore}


def activation(loss_type):
    """Per-pixel class scores the reference uses with ``loss_type``: sigmoid for BCE, softmax otherwise."""
    return torch.sigmoid if loss_type == "bce_loss" else (lambda z: torch.softmax(z, dim=1))


def upsample(x, size):
    """Bilinear, ``align_corners=False``, as every reference upsampling of logits and probabilities."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def barm_pseudo_labels(prev_logits_up, labels, thresh=BARM_PSEUDO_THRESH, loss_type="bce_loss"):
    """BARM's pseudo-labels (spec §4.4.2): on ground-truth background pixels only, the teacher's most
    confident class replaces 0 when it is a foreground class scoring at least ``thresh``."""
    scores, predicted = activation(loss_type)(prev_logits_up.float()).max(dim=1)
    relabel = (labels == 0) & (predicted > 0) & (scores >= thresh)
    return torch.where(relabel, predicted.to(labels.dtype), labels)


def bga_ce_loss(residual, fg_mask):
    """Background-adaptation CE (spec §4.4.5): BCE(r, 0) averaged over current-foreground pixels."""
    residual = residual.float()
    loss = F.binary_cross_entropy_with_logits(residual, torch.zeros_like(residual), reduction="none")
    return (loss * fg_mask).sum() / (fg_mask.sum() + BGA_CE_EPS)


def tri_bg_loss(residual, bg_mask):
    """Background-adaptation triplet-like term (spec §4.4.5): mean over background pixels of
    ``max(0, (σ(r) − 1)² − σ(r)²)``, pushing the residual to be non-negative there."""
    prob = torch.sigmoid(residual.float())
    loss = torch.clamp((prob - 1) ** 2 - prob ** 2, min=0)
    return (loss * bg_mask).sum() / (bg_mask.sum() + TRI_EPS)


def feature_distillation(features, prev_features, bg_mask):
    """Background feature distillation (spec §4.4.6): Σ_i MSE(M·f_i, M·f'_i), each a mean over all
    elements (masked zeros included)."""
    total = features[0].new_zeros((), dtype=torch.float32)
    for f, g in zip(features, prev_features):
        total = total + F.mse_loss(f.float() * bg_mask, g.float() * bg_mask)
    return total


def group_kd(heads, prev_heads):
    """Group knowledge distillation (spec §4.4.7): Σ_i Σ_c mean_{b,x,y} BCE(Z_i[:, c], σ(Z'_i[:, c]))."""
    total = heads[0].new_zeros((), dtype=torch.float32)
    for z, z_prev in zip(heads, prev_heads):
        loss = F.binary_cross_entropy_with_logits(z.float(), torch.sigmoid(z_prev.float()), reduction="none")
        total = total + loss.mean(dim=(0, 2, 3)).sum()
    return total


def barm_loss(logits, features, prev_logits, prev_features, labels, num_new, pseudo_thresh=BARM_PSEUDO_THRESH,
              loss_type="bce_loss", w_tri=BARM_W_TRI, w_fd=BARM_W_FD, w_gkd=BARM_W_GKD, w_bga_ce=BARM_W_BGA_CE):
    """BARM's incremental-step loss with ``--pseudo`` (spec §4.4, steps 1-8).

    ``logits``/``features`` and ``prev_logits``/``prev_features`` are the raw outputs of the student and of
    the teacher at feature resolution (features hold ``prev_heads`` and ``ear_feats``); ``labels`` are at
    image resolution; ``num_new`` is the number of classes of the current step. Returns ``(terms,
    pseudo_labels)`` where ``terms`` has ``total``, ``std``, ``tri_bg``, ``fd``, ``gkd`` and ``bga_ce``::

        total = std + w_tri·tri_bg + w_fd·fd + w_gkd·gkd + w_bga_ce·bga_ce
    """
    size = labels.shape[-2:]
    logits_up = upsample(logits.float(), size)
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
