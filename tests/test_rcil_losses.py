"""RCIL's pooled-cube KD terms (RCIL train.py::features_distillation_spatial, features_distillation_channel) against
hand computations and explicit numpy loops."""
import math

import numpy as np
import pytest
import torch

from methods import losses, rcil


def avg_pool_numpy(x, k):
    """avg_pool2d of (B, C, H, W) with a k×k window, stride 1, k // 2 zeros on every side, divided by k²."""
    p = k // 2
    batch, channels, height, width = x.shape
    padded = np.zeros((batch, channels, height + 2 * p, width + 2 * p))
    padded[:, :, p:p + height, p:p + width] = x
    out_h, out_w = height + 2 * p - k + 1, width + 2 * p - k + 1
    out = np.zeros((batch, channels, out_h, out_w))
    for y in range(out_h):
        for x_ in range(out_w):
            out[:, :, y, x_] = padded[:, :, y:y + k, x_:x_ + k].sum(axis=(2, 3)) / (k * k)
    return out


def channel_pool_numpy(x):
    """Mean over channels c−1, c, c+1 (missing neighbours count as 0), always divided by 3."""
    out = np.zeros_like(x)
    channels = x.shape[1]
    for c in range(channels):
        for n in (c - 1, c, c + 1):
            if 0 <= n < channels:
                out[:, c] += x[:, n]
    return out / 3


def batch_mean_norm(a, b):
    return np.mean([math.sqrt(((a[i] - b[i]) ** 2).sum()) for i in range(a.shape[0])])


def spatial_numpy(old_maps, new_maps, factors, n_total, n_new, kernels):
    total = 0.0
    for old, new, factor in zip(old_maps, new_maps, factors):
        old, new = old.astype(np.float64) ** 2, new.astype(np.float64) ** 2
        d = sum(batch_mean_norm(avg_pool_numpy(old, k), avg_pool_numpy(new, k)) for k in kernels) / len(kernels)
        total += factor * math.sqrt(n_total / n_new) * d
    return total / len(old_maps)


def channel_numpy(old_maps, new_maps, factors, n_total, n_new):
    total = 0.0
    for old, new, factor in zip(old_maps, new_maps, factors):
        old, new = old.astype(np.float64) ** 2, new.astype(np.float64) ** 2
        total += factor * math.sqrt(n_total / n_new) * batch_mean_norm(channel_pool_numpy(old),
                                                                       channel_pool_numpy(new))
    return total / len(old_maps)


def random_maps(shapes, seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(np.float32) for shape in shapes]


def test_spatial_tiny_by_hand():
    old = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # squared: [[1, 4], [9, 16]]
    # kernel 2, padding 1 -> 3x3 outputs: window sums 1 5 4 / 10 30 20 / 9 25 16, divided by 4
    sums = [1, 5, 4, 10, 30, 20, 9, 25, 16]
    expected = math.sqrt(4 / 1) * math.sqrt(sum(s * s for s in sums)) / 4  # √(K_t/N_new) = 2
    result = rcil.pooled_cube_spatial([old], [torch.zeros_like(old)], [1.0], n_classes_total=4, n_new=1,
                                      kernels=(2,))
    assert result.item() == pytest.approx(expected, rel=1e-6)


def test_channel_tiny_by_hand():
    old = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)  # squared: 1, 4, 9
    # windows (0, 1, 4), (1, 4, 9), (4, 9, 0), always / 3
    expected = math.sqrt(2 / 1) * math.sqrt(5 ** 2 + 14 ** 2 + 13 ** 2) / 3
    result = rcil.pooled_cube_channel([old], [torch.zeros_like(old)], [1.0], n_classes_total=2, n_new=1)
    assert result.item() == pytest.approx(expected, rel=1e-6)


def test_spatial_against_explicit_loops_with_kernels_larger_than_the_map():
    # 8x8 and 5x5 maps: kernels 12..24 (and 8 for the 5x5 map) exceed the map; the output is still (W+1)²
    shapes = [(2, 3, 8, 8), (2, 2, 5, 5)]
    old_maps, new_maps = random_maps(shapes, 1), random_maps(shapes, 2)
    factors = [rcil.PCKD_FACTOR_VOC, rcil.PCKD_LAST_FACTOR_VOC]
    expected = spatial_numpy(old_maps, new_maps, factors, 6, 1, rcil.PCKD_SPATIAL_KERNELS)
    new_tensors = [torch.from_numpy(m).requires_grad_() for m in new_maps]
    result = rcil.pooled_cube_spatial([torch.from_numpy(m) for m in old_maps], new_tensors, factors,
                                      n_classes_total=6, n_new=1)
    assert result.dtype == torch.float32
    assert result.item() == pytest.approx(expected, rel=1e-5)
    result.backward()
    assert all(torch.isfinite(t.grad).all() for t in new_tensors)


def test_channel_against_explicit_loops():
    shapes = [(2, 3, 8, 8), (2, 5, 4, 4), (2, 1, 3, 3)]  # one map with a single channel: (0 + x + 0) / 3
    old_maps, new_maps = random_maps(shapes, 3), random_maps(shapes, 4)
    factors = [0.01, 0.01, 0.0005]
    expected = channel_numpy(old_maps, new_maps, factors, 7, 2)
    result = rcil.pooled_cube_channel([torch.from_numpy(m) for m in old_maps],
                                      [torch.from_numpy(m) for m in new_maps], factors, n_classes_total=7, n_new=2)
    assert result.item() == pytest.approx(expected, rel=1e-5)


def test_spatial_on_collapsed_logits_in_half_precision():
    # the logits map: the student (K_t = 5) is collapsed to K_old = 3 channels as in PLOP
    rng = np.random.default_rng(5)
    old = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    new = rng.normal(size=(2, 5, 4, 4)).astype(np.float32)
    collapsed = np.concatenate([new[:, :1] + new[:, 3:].sum(axis=1, keepdims=True), new[:, 1:3]], axis=1)
    expected = spatial_numpy([old], [collapsed], [0.0005], 5, 2, rcil.PCKD_SPATIAL_KERNELS)
    student = losses.collapse_logits(torch.from_numpy(new), n_old=3)
    result = rcil.pooled_cube_spatial([torch.from_numpy(old)], [student], [0.0005], 5, 2)
    assert result.item() == pytest.approx(expected, rel=1e-5)
    # bfloat16 inputs are computed in float32
    result = rcil.pooled_cube_spatial([torch.from_numpy(old).bfloat16()], [student.bfloat16()], [0.0005], 5, 2)
    assert result.dtype == torch.float32


@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_pool_equals_avg_pool_values_and_gradients(channels_last):
    # the separable depthwise filter against the reference's avg_pool2d (zero padding counted), every kernel
    # of the spatial term, maps smaller and larger than the kernels, both memory formats
    import torch.nn.functional as F
    generator = torch.Generator().manual_seed(6)
    for shape in [(2, 3, 9, 7), (1, 4, 30, 30)]:
        x = torch.rand(shape, generator=generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for kernel in rcil.PCKD_SPATIAL_KERNELS:
            weights = torch.rand(1, generator=generator)
            ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
            result = rcil._spatial_pool(ours, kernel)
            expected = F.avg_pool2d(ref, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
            assert result.shape == expected.shape
            torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-7)
            (weights * result.pow(2)).sum().backward()
            (weights * expected.pow(2)).sum().backward()
            torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_factors_per_dataset():
    assert rcil.pckd_factors("voc", rcil.PCKD_SPATIAL_MAPS) == [0.01] * 5 + [0.0005]  # logits get 0.0005
    assert rcil.pckd_factors("voc", rcil.PCKD_CHANNEL_MAPS) == [0.01] * 4 + [0.0005]  # x_pl gets 0.0005
    assert rcil.pckd_factors("ade", rcil.PCKD_SPATIAL_MAPS) == [5e-6] * 5 + [5e-7]
    assert rcil.pckd_factors("ade", rcil.PCKD_CHANNEL_MAPS) == [5e-6] * 4 + [5e-7]
    assert losses.collapse_logits is losses.collapse_logits


def test_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="factors"):
        rcil.pooled_cube_channel([torch.zeros(1, 3, 2, 2)], [torch.zeros(1, 3, 2, 2)], [1.0, 1.0], 4, 1)
