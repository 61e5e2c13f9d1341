"""DKD's loss terms, prediction rule and memory pseudo-labels as plain functions of tensors (DKD
models/loss.py, trainer/trainer_voc.py, utils/memory.py::memory_sampling_balanced); the method is
``methods/dkd.py``.

DKD's model (:mod:`network.dkd`) has sigmoid outputs and no background channel: channel 0 is an auxiliary
classifier, channel p ≥ 1 is the class at position p of the concatenated class order. Labels are channel
positions as well (0 = background, 255 = void): for natural orders these are DKD's raw ids, and shuffled
orders work too. With K_old = number of outputs of the step t−1 model (1 at step 0: the aux channel alone) and
K_t = outputs now, the current classes are channels K_old..K_t−1, the old classes channels 1..K_old−1.

Every loss is BCE-with-logits per element, averaged over the B·H·W positions of each class (void pixels
included), then summed over classes (DKD's ``.mean(dim=[0, 2, 3]).sum()``). Logits "_up" are upsampled
bilinearly (align_corners=False) to the label size, as DKD's model does; the positive / negative parts stay at
feature resolution. Every function computes in float32 whatever the input dtype.
"""
import torch
import torch.nn.functional as F

from methods.losses import upsample

BACKGROUND = 0

# Loss weights at step t ≥ 1 (DKD configs/config_{voc,ade}.json ``hyperparameter``); step 0 uses mBCE + AC
W_MBCE = 1.0
W_KD = 5.0
W_DKD_POS = 5.0
W_DKD_NEG = 5.0
W_AC = 1.0

MEMORY_PSEUDO_THRESHOLD = 0.9  # DKD-M's teacher pseudo-labels at t > 1 (DKD utils/memory.py)

# Inference (DKD trainer/trainer_voc.py::_test): a pixel is background unless some non-aux sigmoid exceeds this
PREDICTION_THRESHOLD = 0.5


def _check_same_shape(name, student, teacher):
    if student.shape != teacher.shape:
        raise ValueError(f"{name}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")


def _class_sum_of_means(loss):
    """Σ_c mean_{b,y,x} of an elementwise loss (B, C, H, W): DKD's ``.mean(dim=[0, 2, 3]).sum()``."""
    return loss.mean(dim=(0, 2, 3)).sum()


def mbce_loss(new_logits_up, labels, new_class_ids, pos_weight):
    """DKD's weighted BCE on the current classes (DKD models/loss.py::WBCELoss).

    Args:
        new_logits_up: (B, N, H, W) logits of the current step's classifier (model channels K_old..K_t−1),
            upsampled to the label size.
        labels: (B, H, W) labels as channel positions, 255 = void.
        new_class_ids: N label values, the class of each channel of ``new_logits_up`` in order (normally
            ``range(K_old, K_t)``; at step 0 ``range(1, K_0)``).
        pos_weight: w, a number or a tensor of N per-class values.

    With y_c = 1[label = new_class_ids[c]] — background, old-class, void (255) and any other pixels are
    negatives for every current class (DKD models/loss.py::WBCELoss: void is never masked out)::

        BCE_w(x, y) = −[w·y·log σ(x) + (1 − y)·log(1 − σ(x))]
        L_mbce = Σ_c mean_{B,H,W} BCE_w(z_c, y_c)

    Returns a float32 scalar.
    """
    logits = new_logits_up.float()
    ids = torch.as_tensor(list(new_class_ids), dtype=torch.long, device=logits.device)
    if logits.dim() != 4 or ids.numel() != logits.shape[1]:
        raise ValueError(f"mbce_loss: {ids.numel()} class ids for logits of shape {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],) + logits.shape[2:]:
        raise ValueError(f"mbce_loss: labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    target = (labels.long().unsqueeze(1) == ids.view(1, -1, 1, 1)).float()
    weight = torch.as_tensor(pos_weight, dtype=torch.float32, device=logits.device).expand(ids.numel())
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight.view(-1, 1, 1), reduction="none")
    return _class_sum_of_means(loss)


def _sigmoid_distillation(student, teacher):
    """Σ_c mean_{B,H,W} BCE(student_c, σ(teacher_c)) in float32 (DKD's ``KDLoss`` with sigmoid targets)."""
    target = torch.sigmoid(teacher.float())
    return _class_sum_of_means(F.binary_cross_entropy_with_logits(student.float(), target, reduction="none"))


def kd_loss(old_logits_up_student, old_logits_up_teacher):
    """DKD's KD on the old classes (DKD models/loss.py)::

        L_kd = Σ_{c old} mean_{B,H,W} BCE(z_c, σ(z^old_c))
             = Σ_c mean −[σ(z^old_c)·log σ(z_c) + (1 − σ(z^old_c))·log(1 − σ(z_c))]

    Args: the student's logits of channels 1..K_old−1 and the teacher's channels 1..K_old−1 (the aux channel
    of both excluded), each (B, K_old − 1, H, W), upsampled to the label size. Returns a float32 scalar.
    """
    _check_same_shape("kd_loss", old_logits_up_student, old_logits_up_teacher)
    return _sigmoid_distillation(old_logits_up_student, old_logits_up_teacher)


def dkd_loss(parts, parts_old):
    """DKD's decomposed KD on one sign (DKD models/loss.py): L_dkd± = Σ_{c old} mean_{B,h,w} BCE(P_c, σ(P^old_c)).

    Args: ``parts`` = the student's ``pos_logits`` (or ``neg_logits``) of the old classes, i.e. its first
    K_old − 1 part channels; ``parts_old`` = the teacher's (all its part channels); each (B, K_old − 1, h, w)
    at feature resolution. Call it once with the positive and once with the negative parts. Returns a
    float32 scalar.
    """
    _check_same_shape("dkd_loss", parts, parts_old)
    return _sigmoid_distillation(parts, parts_old)


def ac_loss(aux_logits_up):
    """DKD's auxiliary-classifier loss (DKD models/loss.py): L_ac = mean_{B,H,W} BCE(z_aux, 0)
    = mean −log(1 − σ(z_aux)); ``aux_logits_up`` is channel 0, (B, 1, H, W). Returns a float32 scalar."""
    logits = aux_logits_up.float()
    return _class_sum_of_means(F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none"))


def dkd_loss_terms(logits, features, labels, num_old, logits_old=None, features_old=None, pos_weight=1.0,
                   w_mbce=W_MBCE, w_kd=W_KD, w_dkd_pos=W_DKD_POS, w_dkd_neg=W_DKD_NEG, w_ac=W_AC):
    """DKD's training loss as named terms (DKD models/loss.py, trainer/trainer_voc.py).

    Args:
        logits: (B, K_t, h, w) student logits at feature resolution (channel 0 = aux).
        features: the student's features, with ``pos_logits`` / ``neg_logits`` (B, K_t − 1, h, w) when a
            teacher is given.
        labels: (B, H, W) channel positions, 255 = void (masked labels: old classes already 0).
        num_old: K_old, outputs of the step t−1 model (1 at step 0).
        logits_old, features_old: the teacher's outputs (B, K_old, h, w) and parts (B, K_old − 1, h, w);
            None at step 0.
        pos_weight: mBCE pos_weight (:func:`default_pos_weight`).

    Logits are upsampled to the label size first; then::

        step 0:  total = w_mbce·L_mbce + w_ac·L_ac
        t ≥ 1:   total = w_mbce·L_mbce + w_kd·L_kd + w_dkd_pos·L_dkd+ + w_dkd_neg·L_dkd− + w_ac·L_ac

    with L_mbce on channels K_old..K_t−1 (:func:`mbce_loss`), L_kd on channels 1..K_old−1 (:func:`kd_loss`),
    L_dkd± on the first K_old − 1 parts (:func:`dkd_loss`), L_ac on channel 0 (:func:`ac_loss`). Returns a
    dict of float32 scalars: ``total``, ``mbce``, ``ac`` and, with a teacher, ``kd``, ``dkd_pos``, ``dkd_neg``.
    """
    num_outputs = logits.shape[1]
    if not 1 <= num_old < num_outputs:
        raise ValueError(f"dkd_loss_terms: num_old must be in [1, {num_outputs}), got {num_old}")
    if (logits_old is None) != (num_old == 1):
        raise ValueError("dkd_loss_terms: a teacher is needed exactly when num_old > 1 (steps t ≥ 1)")
    logits_up = upsample(logits.float(), labels.shape[-2:])
    terms = {
        "mbce": mbce_loss(logits_up[:, num_old:], labels, range(num_old, num_outputs), pos_weight),
        "ac": ac_loss(logits_up[:, :1]),
    }
    total = w_mbce * terms["mbce"] + w_ac * terms["ac"]
    if logits_old is not None:
        if logits_old.shape[1] != num_old:
            raise ValueError(f"dkd_loss_terms: the teacher has {logits_old.shape[1]} outputs, expected {num_old}")
        old_up = upsample(logits_old.float(), labels.shape[-2:])
        terms["kd"] = kd_loss(logits_up[:, 1:num_old], old_up[:, 1:])
        terms["dkd_pos"] = dkd_loss(features["pos_logits"][:, :num_old - 1], features_old["pos_logits"])
        terms["dkd_neg"] = dkd_loss(features["neg_logits"][:, :num_old - 1], features_old["neg_logits"])
        total = total + w_kd * terms["kd"] + w_dkd_pos * terms["dkd_pos"] + w_dkd_neg * terms["dkd_neg"]
    terms["total"] = total
    return terms


def dkd_predict(logits, size=None, threshold=PREDICTION_THRESHOLD):
    """DKD's prediction rule (DKD trainer/trainer_voc.py::_test): labels as channel positions.

    ``logits`` (B, K, h, w) are upsampled to ``size`` (bilinear, align_corners=False; None keeps h × w) —
    the logits, not the probabilities, as DKD's model upsamples its output — then, in float32, s = σ(z)::

        pred = 1 + argmax_{c ≥ 1} s_c          (aux channel 0 never predicted; ties → lowest channel)
        pred = 0 where no c ≥ 1 has s_c > threshold

    The argmax is taken on σ(z), not on z, as in DKD: logits whose sigmoids round to the same float32 value
    (e.g. both ≳ 17) tie and the lower channel wins. Returns (B, H, W) int64.
    """
    if logits.shape[1] < 2:
        raise ValueError(f"dkd_predict: needs the aux channel and at least one class, got {logits.shape[1]} channels")
    logits = logits.float()
    if size is not None and tuple(size) != tuple(logits.shape[-2:]):
        logits = upsample(logits, tuple(size))
    scores = torch.sigmoid(logits)[:, 1:]
    pred = scores.argmax(dim=1) + 1
    return torch.where((scores > threshold).any(dim=1), pred, torch.zeros_like(pred))


def dkd_memory_pseudo_labels(logits, labels, threshold=MEMORY_PSEUDO_THRESHOLD):
    """DKD-M's pseudo-labels of a memory candidate at t > 1 (DKD utils/memory.py::memory_sampling_balanced).

    ``logits`` (B, K, h, w): the step t−1 model's logits at feature resolution (channel 0 = aux); ``labels``
    (B, H, W): the masked step t−1 labels of the same crops. The logits are upsampled to H × W (as DKD's model
    does), then in float32 with s = σ(z)::

        ŷ = 1 + argmax_{c ≥ 1} s_c,   m = max_{c ≥ 1} s_c
        y' = ŷ  where y = 0 and m ≥ threshold,   else y

    Void (255) and labelled pixels are kept. Returns int64 (B, H, W).
    """
    scores = torch.sigmoid(upsample(logits.float(), tuple(labels.shape[-2:])))[:, 1:]
    best, predicted = scores.max(dim=1)
    relabel = (labels == BACKGROUND) & (best >= threshold)
    return torch.where(relabel, predicted + 1, labels.long())
