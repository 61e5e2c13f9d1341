"""RCIL: representation compensation and pooled-cube knowledge distillation (methods spec §4.10).

RCIL trains a dual-branch network (a second 3×3 convolution per block and a second ASPP, mixed by random
gates) whose branches are merged into the frozen one at the start of each step; its loss at step t ≥ 1 is
MiB's unbiased CE + 100 · unbiased KD (spec §4.8) plus the pooled-cube KD (PCKD): a spatial term comparing
average-pooled squared maps at six kernel sizes and a channel term comparing squared maps averaged over
windows of three channels (§4.10).

This module holds the PCKD terms as pure functions of tensors; the student's small logits are collapsed to
the teacher's channels as in PLOP (:func:`methods.plop.collapse_logits`). Shapes use the notation of
spec §0: B images, K_t current classes, N_new classes added at this step.
"""
import math

import torch
import torch.nn.functional as F

# collapse_logits is re-exported: RCIL collapses the student's small logits exactly as PLOP (spec §4.10)
from methods.plop import check_map_pairs, collapse_logits, layer_factors  # noqa: F401

# PCKD weights (methods spec §4.10, §5; hard-coded in the reference, --pod_factor is ignored, spec §9 RCIL 2):
# (every map but the last, the last map). Spatial: ℓ = 1..5 / ℓ = 6 (collapsed small logits);
# channel: ℓ = 1..4 / ℓ = 5 (x_pl). The same pair serves both terms.
PCKD_FACTOR_VOC = 0.01
PCKD_LAST_FACTOR_VOC = 0.0005
PCKD_FACTOR_ADE = 5e-6
PCKD_LAST_FACTOR_ADE = 5e-7
PCKD_FACTORS = {"voc": (PCKD_FACTOR_VOC, PCKD_LAST_FACTOR_VOC), "ade": (PCKD_FACTOR_ADE, PCKD_LAST_FACTOR_ADE)}
PCKD_SPATIAL_KERNELS = (4, 8, 12, 16, 20, 24)  # avg-pool kernel sizes of the spatial term
PCKD_CHANNEL_WINDOW = 3  # channels averaged by the channel term (one zero channel of padding each side)
PCKD_SPATIAL_MAPS = 6  # stages mod2..mod5, x_pl, small logits
PCKD_CHANNEL_MAPS = 5  # stages mod2..mod5, x_pl (logits excluded)


def pckd_factors(dataset, n_maps):
    """The per-map weights λ_1..λ_n of a PCKD term on ``dataset`` ("voc" or "ade"): the dataset's feature factor
    for every map but the last, its last-map factor for the last one (methods spec §4.10). Call it with
    :data:`PCKD_SPATIAL_MAPS` for the spatial term and :data:`PCKD_CHANNEL_MAPS` for the channel term."""
    factor, last_factor = PCKD_FACTORS[dataset]
    return layer_factors(n_maps, factor, last_factor)


def _spatial_pool(x, kernel):
    """AP_k: avg_pool2d, kernel k×k, stride 1, padding k // 2 (k/2 for the reference's even kernels), with the
    zero padding counted in the average; output (B, C, H + 2·(k//2) − k + 1, W + 2·(k//2) − k + 1)."""
    return F.avg_pool2d(x, kernel_size=kernel, stride=1, padding=kernel // 2, count_include_pad=True)


def _channel_pool(x):
    """CP: the mean of each window of 3 consecutive channels, stride 1, one zero channel added on each side,
    always divided by 3; output (B, C, H, W)."""
    padded = F.pad(x, (0, 0, 0, 0, 1, 1))
    return (padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]) / PCKD_CHANNEL_WINDOW


def _per_sample_distance(old, new):
    """mean_b ‖old_b − new_b‖₂ over each sample's flattened elements (Frobenius norm, batch mean)."""
    return torch.linalg.vector_norm((old - new).reshape(old.shape[0], -1), ord=2, dim=-1).mean()


def pooled_cube_spatial(old_maps, new_maps, factors, n_classes_total, n_new, kernels=PCKD_SPATIAL_KERNELS):
    """RCIL's spatial pooled-cube KD (methods spec §4.10, ``features_distillation_spatial``).

    ``old_maps`` / ``new_maps``: lists of L teacher / student maps of equal shapes (B, C_ℓ, H_ℓ, W_ℓ) (RCIL: the
    four post-activation stage outputs, x_pl, and the small logits with the student collapsed by
    :func:`collapse_logits`); ``factors``: λ_ℓ (:func:`pckd_factors`); ``n_classes_total``: K_t; ``n_new``:
    N_new. Maps are squared first; AP_k = avg_pool2d(k×k, stride 1, padding k/2, zero padding counted)::

        D_ℓ = (1/|kernels|) Σ_k mean_b ‖AP_k(A_ℓ²)_b − AP_k(A'_ℓ²)_b‖₂
        L_sp = (1/L) Σ_ℓ λ_ℓ · √(K_t / N_new) · D_ℓ

    A kernel larger than the map is fine (its padding still makes the output (W + 1)²). Returns a float32 scalar.
    """
    check_map_pairs("pooled_cube_spatial", old_maps, new_maps, factors, n_new)
    schedule = math.sqrt(n_classes_total / n_new)
    total = old_maps[0].new_zeros((), dtype=torch.float32)
    for old, new, factor in zip(old_maps, new_maps, factors):
        old_sq, new_sq = old.float().pow(2), new.float().pow(2)
        distance = sum(_per_sample_distance(_spatial_pool(old_sq, k), _spatial_pool(new_sq, k)) for k in kernels)
        total = total + factor * schedule * distance / len(kernels)
    return total / len(old_maps)


def pooled_cube_channel(old_maps, new_maps, factors, n_classes_total, n_new):
    """RCIL's channel pooled-cube KD (methods spec §4.10, ``features_distillation_channel``).

    ``old_maps`` / ``new_maps``: lists of L teacher / student maps of equal shapes (B, C_ℓ, H_ℓ, W_ℓ) (RCIL: the
    four post-activation stage outputs and x_pl — the logits are not used by this term); ``factors``: λ_ℓ
    (:func:`pckd_factors`); ``n_classes_total``: K_t; ``n_new``: N_new. Maps are squared first; CP averages
    windows of 3 consecutive channels (stride 1, one zero channel each side, always divided by 3)::

        D_ℓ = mean_b ‖CP(A_ℓ²)_b − CP(A'_ℓ²)_b‖₂
        L_ch = (1/L) Σ_ℓ λ_ℓ · √(K_t / N_new) · D_ℓ

    Returns a float32 scalar.
    """
    check_map_pairs("pooled_cube_channel", old_maps, new_maps, factors, n_new)
    schedule = math.sqrt(n_classes_total / n_new)
    total = old_maps[0].new_zeros((), dtype=torch.float32)
    for old, new, factor in zip(old_maps, new_maps, factors):
        distance = _per_sample_distance(_channel_pool(old.float().pow(2)), _channel_pool(new.float().pow(2)))
        total = total + factor * schedule * distance
    return total / len(old_maps)
