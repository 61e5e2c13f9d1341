"""SSUL / SSUL-M: semantic segmentation with an unknown label (spec barm-ssul-kproba §12).

* Model: the ``SSULHead`` (one Sequential(3x3 conv, BN, ReLU, 1x1 conv) entry per step); with ``--unknown``
  the entries have [1 (unknown), 1 (background), n_0 − 1, n_1, …] outputs (§12.1). Logits stay at feature
  resolution in ciss; SSUL upsampled them inside its model, so every function here that needs them at label
  resolution upsamples them first (bilinear, align_corners False).
* Labels (§12.2): ciss labels are channel positions of the concatenated class order (0 = background,
  255 = ignore). With ``--unknown`` they are shifted by one on the training split (channel k+1 = class k) and
  background pixels become unknown 0 where the saliency map is positive (VOC) or everywhere (ADE).
* Step t ≥ 1 with ``--freeze`` (§12.3): only the new head, the unknown head (lr) and the background head
  (lr·1e−4) train; ``--w_transfer`` copies the unknown head into the new one; pseudo-labels from the
  previous model (σ, threshold 0.7, on labels ≤ fg_idx); loss ``bce_with_ignore`` over all channels.
* Prediction (§12.2, §7.2): upsample logits, σ, unknown probability added to the background, argmax.
* SSUL-M memory: :mod:`methods.memory` (§12.4).

This module holds the numerics as plain functions and named constants (the method class comes later).
"""
from dataclasses import dataclass

import torch

from methods import losses
from utils.errors import UserError

IGNORE_INDEX = losses.IGNORE_INDEX
UNKNOWN_LABEL = 0  # label / channel of the unknown class with --unknown (§12.2)
SHIFTED_BACKGROUND = 1  # the background's label / channel with --unknown (§12.2)

SSUL_PSEUDO_THRESH = 0.7  # --pseudo_thresh default and the scripts' THRESH (§12.3, §12.5)
SSUL_FG_IDX_UNKNOWN = 1  # fg_idx with --unknown: labels ≤ 1 (unknown, background) can be relabelled (§12.3)
SSUL_FG_IDX_PLAIN = 0  # fg_idx without --unknown (§12.3)

# learning rates (§12.3)
SSUL_BACKBONE_LR0 = 0.001  # step 0, and t > 0 without --freeze: backbone (hard-coded in SSUL)
SSUL_CLASSIFIER_LR0 = 0.01  # step 0, and t > 0 without --freeze: classifier (hard-coded in SSUL)
SSUL_NEW_LR_FACTOR = 1.0  # t > 0 with --freeze: new head at --lr
SSUL_UNKNOWN_LR_FACTOR = 1.0  # t > 0 with --freeze --unknown: unknown head at --lr
SSUL_BG_LR_FACTOR = 1e-4  # t > 0 with --freeze --unknown: background head at --lr × 1e−4

# validation cadence (§12.3): every max(100, total_itrs // 100) iterations
SSUL_VAL_INTERVAL_MIN = 100
SSUL_VAL_INTERVAL_DIVISOR = 100


@dataclass(frozen=True)
class SSULSetting:
    """One published SSUL / SSUL-M recipe (spec §12.5, the SSUL README)."""
    epochs: int
    batch_size: int
    lr: float
    lr_policy: str
    mem_size: int  # SSUL-M's memory size (SSUL: 0)


# Published settings (§12.5): VOC from the README (run.sh uses batch 16); ADE from the README
SSUL_PUBLISHED = {
    "voc": SSULSetting(epochs=50, batch_size=32, lr=0.01, lr_policy="poly", mem_size=100),
    "ade": SSULSetting(epochs=100, batch_size=24, lr=0.05, lr_policy="warm_poly", mem_size=300),
}


def fg_index(unknown):
    """SSUL's ``fg_idx`` (spec §12.3): 1 with ``--unknown`` (channels 0 unknown, 1 background), else 0."""
    return SSUL_FG_IDX_UNKNOWN if unknown else SSUL_FG_IDX_PLAIN


def validation_interval(total_iterations):
    """SSUL's validation cadence (spec §12.3): ``max(100, total_iterations // 100)`` iterations."""
    return max(SSUL_VAL_INTERVAL_MIN, int(total_iterations) // SSUL_VAL_INTERVAL_DIVISOR)


def total_iterations(epochs, n_images, batch_size):
    """SSUL's ``total_itrs = epochs × ⌊N / batch⌋`` (spec §12.3; the train loader drops the last batch)."""
    return int(epochs) * (int(n_images) // int(batch_size))


def unknown_labels(labels, saliency=None):
    """SSUL's unknown relabelling of training labels (spec §12.2).

    ``labels``: integer tensor of any shape, typically (B, H, W) or (H, W), with 255 = ignore.
    ``saliency``: same shape (VOC's saliency map after the joint transforms), or ``None`` (ADE)::

        y' = 255        where y = 255
        y' = y + 1      elsewhere          (background 0 → 1, class k → k + 1)
        y' = 0          where y' = 1 and (saliency > 0, or everywhere when saliency is None)

    Returns a tensor of the labels' dtype and shape.
    """
    if saliency is not None and tuple(saliency.shape) != tuple(labels.shape):
        raise UserError(f"saliency map of shape {tuple(saliency.shape)} does not match its label map of shape "
                        f"{tuple(labels.shape)}: expected the same size")
    ignore = labels == IGNORE_INDEX
    shifted = torch.where(ignore, torch.full_like(labels, IGNORE_INDEX), labels + 1)
    unknown = shifted == SHIFTED_BACKGROUND
    if saliency is not None:
        unknown = unknown & (saliency > 0)
    return torch.where(unknown, torch.full_like(shifted, UNKNOWN_LABEL), shifted)


def _entry_layers(entry):
    """(3x3 conv, BN, 1x1 conv) of one ``SSULHead`` entry: Sequential(conv3x3, BN, ReLU, conv1x1)."""
    return entry[0], entry[1], entry[3]


@torch.no_grad()
def transfer_unknown_head(head, step):
    """SSUL's ``--w_transfer`` (spec §12.3): initialise the new head entry from the unknown entry, in place.

    ``head``: an ``SSULHead`` with ``unknown=True`` already grown to step ``step`` ≥ 1, so that its entries are
    [unknown, background, n_0 − 1, n_1, …, n_t] and the new entry is ``head.head[step + 2]`` (the last one).
    The new entry receives the unknown entry's (``head.head[0]``) 3x3 conv weight, BN weight, bias,
    running_mean and running_var, and every output channel c of its 1x1 conv gets the unknown entry's single
    1x1 filter and bias::

        W_new[c] = W_unk[0],  b_new[c] = b_unk[0]   for c = 0 … n_t − 1

    Unlike BARM's ear copy (§4.3), the BN running statistics are copied too. ``num_batches_tracked`` is not
    copied (SSUL loaded every key but this one from the old checkpoint; it only matters for BN momentum None).
    All other entries are untouched.
    """
    if not getattr(head, "unknown", False):
        raise ValueError("transfer_unknown_head needs an SSULHead built with unknown=True")
    if step < 1 or len(head.head) != step + 3:
        raise ValueError(f"transfer_unknown_head: step {step} needs an SSULHead with {step + 3} entries "
                         f"(unknown, background, step 0 classes, one per step 1..{step}), got {len(head.head)}")
    conv_u, bn_u, cls_u = _entry_layers(head.head[0])
    conv_n, bn_n, cls_n = _entry_layers(head.head[step + 2])
    conv_n.weight.copy_(conv_u.weight)
    bn_n.weight.copy_(bn_u.weight)
    bn_n.bias.copy_(bn_u.bias)
    bn_n.running_mean.copy_(bn_u.running_mean)
    bn_n.running_var.copy_(bn_u.running_var)
    cls_n.weight.copy_(cls_u.weight.expand_as(cls_n.weight))  # every output channel gets the single filter
    cls_n.bias.copy_(cls_u.bias.expand_as(cls_n.bias))


def trainable_heads(head, step, unknown=True):
    """What SSUL trains at step ``step`` ≥ 1 with ``--freeze`` (spec §12.3), as ``[(module, lr factor), …]``.

    Everything not listed (backbone, ASPP, the other head entries, and the whole previous model) is frozen
    (``requires_grad = False``). The learning rate of a group is ``--lr × factor``:

    * ``head.head[-1]`` (new classes): factor 1;
    * with ``unknown``: ``head.head[0]`` (unknown): factor 1, and ``head.head[1]`` (background): factor 1e−4.

    The order is SSUL's parameter-group order. ``--bn_freeze`` still puts every BN, including those of these
    entries, on running statistics with frozen affine parameters. Step 0 (and t > 0 without ``--freeze``) is not
    covered: there SSUL trains everything in two groups, backbone ``SSUL_BACKBONE_LR0`` and classifier
    ``SSUL_CLASSIFIER_LR0`` (absolute learning rates, ``--lr`` unused).
    """
    if step < 1:
        raise ValueError(f"trainable_heads describes SSUL's frozen steps t >= 1, got step {step}")
    groups = [(head.head[-1], SSUL_NEW_LR_FACTOR)]
    if unknown:
        groups += [(head.head[0], SSUL_UNKNOWN_LR_FACTOR), (head.head[1], SSUL_BG_LR_FACTOR)]
    return groups


def ssul_pseudo_labels(old_logits_up, labels, thresh=SSUL_PSEUDO_THRESH, fg_idx=SSUL_FG_IDX_UNKNOWN,
                       loss_type="bce_loss"):
    """SSUL's pseudo-labels (spec §12.3).

    ``old_logits_up``: (B, C_old, H, W) previous-model logits at label resolution (C_old includes the unknown
    channel with ``--unknown``); ``labels``: (B, H, W) in the training label space (shifted with unknown)::

        P' = σ(O')  (softmax for non-BCE losses),  ŷ = argmax_c P'_c,  s = max_c P'_c
        y_ps = ŷ  where y ≤ fg_idx and ŷ > fg_idx and s ≥ thresh,  else y

    255 is never relabelled (255 > fg_idx); with unknown both unknown (0) and background (1) pixels can be.
    """
    scores, predicted = losses.activation(loss_type)(old_logits_up.float()).max(dim=1)
    relabel = (labels <= fg_idx) & (predicted > fg_idx) & (scores >= thresh)
    return torch.where(relabel, predicted.to(labels.dtype), labels)


def ssul_predict(logits, size, unknown=True, loss_type="bce_loss"):
    """SSUL's prediction (spec §12.2, §7.2): labels (B, H, W) from logits (B, C, h, w) at feature resolution.

    Logits are upsampled to ``size`` (bilinear, align_corners False) first, as SSUL's model did, then::

        P = σ(O)  (softmax for non-BCE losses)
        with unknown:  P_1 ← P_1 + P_0, drop channel 0     (so class k is channel k again)
        ŷ = argmax_c P_c
    """
    probs = losses.activation(loss_type)(losses.upsample(logits.float(), size))
    if unknown:
        probs = torch.cat([probs[:, 1:2] + probs[:, 0:1], probs[:, 2:]], dim=1)
    return probs.argmax(dim=1)


def ssul_loss(logits, labels, old_logits=None, thresh=SSUL_PSEUDO_THRESH, fg_idx=SSUL_FG_IDX_UNKNOWN,
              loss_type="bce_loss"):
    """SSUL's training loss (spec §12.3): the criterion on upsampled logits, over all channels.

    ``logits``: (B, C, h, w) student logits at feature resolution; ``labels``: (B, H, W); ``old_logits``: the
    previous model's logits at feature resolution (``--pseudo`` at t ≥ 1) or ``None``. Returns ``(terms,
    targets)`` with ``terms = {"total", "std"}`` (no distillation, no auxiliary term)::

        total = std = criterion(up(O), y_ps)     y_ps = ssul_pseudo_labels(up(O'), y)  (or y without old_logits)
    """
    size = labels.shape[-2:]
    targets = labels
    if old_logits is not None:
        with torch.no_grad():
            targets = ssul_pseudo_labels(losses.upsample(old_logits.float(), size), labels, thresh, fg_idx,
                                         loss_type)
    std = losses.CRITERIA[loss_type](losses.upsample(logits.float(), size), targets)
    return {"total": std, "std": std}, targets
