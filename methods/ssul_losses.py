"""SSUL's numerics as plain functions of tensors: the unknown label, the head transfer, pseudo-labels, the loss,
the prediction and SSUL-M's memory candidates (SSUL main.py::main, datasets/voc.py::__getitem__,
utils/memory.py::memory_sampling_balanced); the method is ``methods/ssul.py``.

Logits stay at feature resolution in ciss; SSUL upsampled them inside its model, so every function here that
needs them at label resolution upsamples them first (bilinear, align_corners False). ciss labels are channel
positions of the concatenated class order (0 = background, 255 = ignore); with ``--unknown`` they are shifted
by one on the training split (channel k+1 = class k) and background pixels become unknown 0 where the
saliency map is positive (VOC) or everywhere (ADE).
"""
import torch

from methods import losses, memory
from utils.errors import UserError

IGNORE_INDEX = losses.IGNORE_INDEX
UNKNOWN_LABEL = 0  # label / channel of the unknown class with --unknown
SHIFTED_BACKGROUND = 1  # the background's label / channel with --unknown
SALIENCY = "saliency"  # name of the saliency map among a batch's extras (VOC with --unknown)

# pseudo-labels (SSUL main.py::main; THRESH in SSUL run.sh)
SSUL_PSEUDO_THRESH = 0.7  # --pseudo_thresh default and the scripts' THRESH
SSUL_FG_IDX_UNKNOWN = 1  # fg_idx with --unknown: labels ≤ 1 (unknown, background) can be relabelled
SSUL_FG_IDX_PLAIN = 0  # fg_idx without --unknown
# learning-rate factors at t > 0 with --freeze (SSUL main.py::main)
SSUL_NEW_LR_FACTOR = 1.0  # new head at --lr
SSUL_UNKNOWN_LR_FACTOR = 1.0  # with --unknown: unknown head at --lr
SSUL_BG_LR_FACTOR = 1e-4  # with --unknown: background head at --lr × 1e−4


def fg_index(unknown):
    """SSUL's ``fg_idx`` (SSUL main.py::main): 1 with ``--unknown`` (channels 0 unknown, 1 background), else 0."""
    return SSUL_FG_IDX_UNKNOWN if unknown else SSUL_FG_IDX_PLAIN


def unknown_labels(labels, saliency=None):
    """SSUL's unknown relabelling of training labels (SSUL datasets/voc.py::__getitem__,
    datasets/ade.py::__getitem__).

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
    """SSUL's ``--w_transfer`` (SSUL main.py::main): initialise the new head entry from the unknown entry, in place.

    ``head``: an ``SSULHead`` with ``unknown=True`` already grown to step ``step`` ≥ 1, so that its entries are
    [unknown, background, n_0 − 1, n_1, …, n_t] and the new entry is ``head.head[step + 2]`` (the last one).
    The new entry receives the unknown entry's (``head.head[0]``) 3x3 conv weight, BN weight, bias,
    running_mean and running_var, and every output channel c of its 1x1 conv gets the unknown entry's single
    1x1 filter and bias::

        W_new[c] = W_unk[0],  b_new[c] = b_unk[0]   for c = 0 … n_t − 1

    Unlike BARM's ear copy (BARM trainer/trainer.py::Trainer.init_ckpt), the BN running statistics are copied
    too. ``num_batches_tracked`` is not copied (SSUL loaded every key but this one from the old checkpoint; it
    only matters for BN momentum None). All other entries are untouched.
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


def trainable_heads(head, step, unknown=True, bg_lr_factor=SSUL_BG_LR_FACTOR):
    """What SSUL trains at step ``step`` ≥ 1 with ``--freeze`` (SSUL main.py::main), as ``[(module, lr factor), …]``.

    Everything not listed (backbone, ASPP, the other head entries, and the whole previous model) is frozen
    (``requires_grad = False``). The learning rate of a group is ``--lr × factor``:

    * ``head.head[-1]`` (new classes): factor 1;
    * with ``unknown``: ``head.head[0]`` (unknown): factor 1, and ``head.head[1]`` (background): factor
      ``bg_lr_factor`` (1e−4).

    The order is SSUL's parameter-group order. ``--bn_freeze`` still puts every BN, including those of these
    entries, on running statistics with frozen affine parameters. Step 0 (and t > 0 without ``--freeze``) is not
    covered: there SSUL trains everything in two groups, backbone ``SSUL_BACKBONE_LR0`` and classifier
    ``SSUL_CLASSIFIER_LR0`` (absolute learning rates, ``--lr`` unused).
    """
    if step < 1:
        raise ValueError(f"trainable_heads describes SSUL's frozen steps t >= 1, got step {step}")
    groups = [(head.head[-1], SSUL_NEW_LR_FACTOR)]
    if unknown:
        groups += [(head.head[0], SSUL_UNKNOWN_LR_FACTOR), (head.head[1], bg_lr_factor)]
    return groups


def ssul_pseudo_labels(old_logits_up, labels, thresh=SSUL_PSEUDO_THRESH, fg_idx=SSUL_FG_IDX_UNKNOWN,
                       loss_type="bce_loss"):
    """SSUL's pseudo-labels (SSUL main.py::main).

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
    """SSUL's prediction (SSUL main.py): labels (B, H, W) from logits (B, C, h, w) at feature resolution.

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
    """SSUL's training loss (SSUL main.py::main): the criterion on upsampled logits, over all channels.

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


def training_labels(labels, saliency=None, is_memory=None, unshifted_memory=False):
    """SSUL's training targets of a batch with ``--unknown`` (SSUL datasets/voc.py::__getitem__, main.py::main),
    before pseudo-labels.

    ``labels``: (B, H, W) ciss label positions (memory samples through the "memory" label split: current and
    previous classes kept); ``saliency``: (B, H, W) or None (ADE); ``is_memory``: (B,) bool, the samples that
    came from SSUL-M's memory, or None::

        y' = unknown_labels(y, saliency)     for every sample (current and memory alike)
        y' = y                               for memory samples when ``unshifted_memory``

    ``unshifted_memory`` reproduces SSUL's off-by-one (SSUL datasets/voc.py::__getitem__): SSUL shifted only
    its ``train`` split, so a memory pixel of class k was supervised on channel k (class k − 1) and memory
    background on the unknown channel. By default memory samples get the same shift and unknown rule as the
    current ones (their saliency map included), which is what the unknown label means (docs/differences.md).
    """
    shifted = unknown_labels(labels, saliency)
    if unshifted_memory and is_memory is not None:
        # quirk (SSUL datasets/voc.py::__getitem__, --memory_labels_unshifted): memory labels stay unshifted,
        # as SSUL's memory split
        shifted = torch.where(is_memory.view(-1, *([1] * (labels.dim() - 1))), labels, shifted)
    return shifted


def memory_candidates(batches, teacher=None, unknown=True, loss_type="bce_loss"):
    """SSUL-M's candidate records (SSUL utils/memory.py::memory_sampling_balanced): ``[[image id, old classes
    present], …]`` in batch order.

    ``batches``: :class:`methods.base.Batch` objects over step t−1's training list (val transform: resize and
    centre crop), labels in ciss positions through step t−1's training split (its classes kept, the rest 0);
    ``teacher``: the step t−1 model (eval mode) at t > 1, None at t = 1. Per image: with ``unknown`` the labels
    are shifted (:func:`unknown_labels`, saliency included); at t > 1 the teacher pseudo-labels them with the
    hard-coded threshold 0.7 (:func:`ssul_pseudo_labels`, fg_idx as in training); the record's classes are
    :func:`methods.memory.image_classes` of the result, in unshifted positions (background, unknown and 255
    removed), through :func:`methods.memory.collect_candidates`. Runs without gradients, in fp32, as SSUL's.
    """
    fg_idx = fg_index(unknown)
    # quirk (SSUL utils/memory.py::memory_sampling_balanced): this pass uses the softmax only for ce_loss (the
    # sigmoid for focal_loss), whereas training uses the sigmoid for bce_loss only
    activation_type = "ce_loss" if loss_type == "ce_loss" else "bce_loss"

    def relabel(batch):
        labels = unknown_labels(batch.labels, batch.extras.get(SALIENCY)) if unknown else batch.labels
        if teacher is None:
            return labels
        logits = teacher(batch.images)[0]
        return ssul_pseudo_labels(losses.upsample(logits.float(), labels.shape[-2:]), labels,
                                  memory.SSUL_MEMORY_PSEUDO_THRESH, fg_idx, activation_type)

    with torch.no_grad():
        return memory.collect_candidates(batches, relabel, shifted=unknown)
