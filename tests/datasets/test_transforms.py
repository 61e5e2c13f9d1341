"""datasets/transforms.py: joint transforms (BARM utils/ext_transforms.py; MiB family: MiB
dataset/transform.py) and extra per-sample maps."""
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from datasets.transforms import (CenterCrop, RandomCrop, RandomHorizontalFlip, RandomResizedCrop, Resize, ToUint8Tensor,
                                 eval_transform, mib_train_transform, normalize, resized_crop_box, train_transform)


def pair(width, height, value=7):
    image = Image.fromarray(np.full((height, width, 3), 200, dtype=np.uint8))
    label = Image.fromarray(np.full((height, width), value, dtype=np.uint8), mode="L")
    return image, label


def test_padding_is_zero_on_image_and_label():
    image, label = pair(10, 6)
    random.seed(0)
    out_image, out_label = RandomCrop(16)(image, label)
    img, lbl = np.asarray(out_image), np.asarray(out_label)
    assert img.shape == (16, 16, 3) and lbl.shape == (16, 16)
    # width 10 < 16: pad int((1+16-10)/2) = 3 on all sides -> 16x12; height 12 < 16: pad 2 -> 20x16
    # the 16x16 crop therefore holds the padding rows/columns, which are 0 in both image and label
    assert set(np.unique(lbl)) == {0, 7}
    assert ((lbl == 0) == (img.sum(axis=2) == 0)).all()
    assert (lbl == 7).sum() == 10 * 6


def test_padding_amounts_follow_the_reference():
    image, label = pair(10, 30)
    random.seed(1)
    _, out = RandomCrop(16)(image, label)
    # width 10 -> padded by 3 on all four sides: 16 x 36, so columns are exactly [pad 3 | 10 | pad 3]
    lbl = np.asarray(out)
    assert lbl.shape == (16, 16)
    assert (lbl[:, 3:13] != 0).any(axis=0).all() and not (lbl[:, :3] != 0).any() and not (lbl[:, 13:] != 0).any()


def test_crop_size_and_same_output_under_the_same_seed():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, size=(90, 120, 3), dtype=np.uint8))
    label = Image.fromarray(rng.integers(0, 21, size=(90, 120), dtype=np.uint8), mode="L")
    transform = train_transform(64)
    random.seed(3)
    a = transform(image, label)
    random.seed(3)
    b = transform(image, label)
    random.seed(4)
    c = transform(image, label)
    assert a[0].shape == (3, 64, 64) and a[1].shape == (64, 64)
    assert a[0].dtype == torch.uint8 and a[1].dtype == torch.uint8
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_flip_moves_image_and_label_together():
    image = Image.fromarray(np.tile(np.arange(8, dtype=np.uint8)[None, :, None], (4, 1, 3)))
    label = Image.fromarray(np.tile(np.arange(8, dtype=np.uint8)[None, :], (4, 1)), mode="L")
    flipped = RandomHorizontalFlip(p=1.0)(image, label)
    assert np.asarray(flipped[1])[0].tolist() == list(range(7, -1, -1))
    assert (np.asarray(flipped[0])[..., 0] == np.asarray(flipped[1])).all()
    kept = RandomHorizontalFlip(p=0.0)(image, label)
    assert np.asarray(kept[1])[0].tolist() == list(range(8))


def test_scale_uses_nearest_for_labels():
    label_values = np.zeros((20, 20), dtype=np.uint8)
    label_values[:, 10:] = 15
    label_values[0, 0] = 255
    image, label = Image.new("RGB", (20, 20)), Image.fromarray(label_values, mode="L")
    random.seed(0)
    for _ in range(5):
        _, out = train_transform(16).transforms[0](image, label)
        assert set(np.unique(np.asarray(out))) <= {0, 15, 255}


def test_eval_resize_and_center_crop():
    image, label = pair(120, 80)
    resized = Resize(64)(image, label)
    assert resized[0].size == (96, 64) and resized[1].size == (96, 64)  # shorter side 64, longer int(64*120/80)
    cropped = CenterCrop(64)(*resized)
    assert cropped[0].size == (64, 64)
    out = eval_transform(64, crop_val=True)(image, label)
    assert out[0].shape == (3, 64, 64) and out[1].shape == (64, 64)
    full = eval_transform(64, crop_val=False)(image, label)
    assert full[0].shape == (3, 80, 120)


def test_normalize_equals_torchvision_on_the_cpu():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, size=(9, 11, 3), dtype=np.uint8))
    expected = TF.normalize(TF.to_tensor(image), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    ours = normalize(ToUint8Tensor()(image, image.convert("L"))[0][None])[0]
    assert torch.equal(ours, expected)


# ---- extra per-sample maps (SSUL saliency) ------------------------------------------------------------

def coordinate_pair(width, height):
    """Image with R = x, G = y, B = 0; label = x; extra = y (so every output pixel says where it came from)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.uint8)
    image = Image.fromarray(np.stack([xx, yy, np.zeros_like(xx)], axis=2))
    return image, Image.fromarray(xx, mode="L"), Image.fromarray(yy, mode="L")


TRANSFORMS = {
    "barm_train": lambda: train_transform(48),
    "mib_train": lambda: mib_train_transform(48),
    "eval_crop": lambda: eval_transform(48, True),
    "eval_full": lambda: eval_transform(48, False),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_extras_are_transformed_exactly_like_the_label(name):
    rng = np.random.default_rng(5)
    for seed, (width, height) in enumerate([(70, 50), (30, 20), (40, 90)]):  # larger and smaller than 48
        image = Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8))
        values = rng.integers(0, 21, size=(height, width), dtype=np.uint8)
        values[values == 0] = 9  # no 0 in the label, so that padding (0) is visible
        label = Image.fromarray(values, mode="L")
        other = Image.fromarray(np.where(values > 10, 255, 1).astype(np.uint8), mode="L")
        random.seed(seed)
        plain = TRANSFORMS[name]()(image, label)
        random.seed(seed)
        out = TRANSFORMS[name]()(image, label, label.copy(), other)
        assert len(plain) == 2 and len(out) == 4
        # the extras draw no random numbers: image and label are bit-identical with or without them
        assert torch.equal(plain[0], out[0]) and torch.equal(plain[1], out[1])
        assert out[2].dtype == torch.uint8 and torch.equal(out[2], out[1])  # a copy of the label stays one
        # the second map: padding 0 exactly where the label is padded, elsewhere its own two values
        assert torch.equal(out[3] == 0, out[1] == 0)
        expected_other = torch.where(out[1] > 10, 255, 1).to(torch.uint8)
        assert torch.equal(out[3][out[1] != 0], expected_other[out[1] != 0])


def test_padding_of_extras_is_zero():
    image, label = pair(10, 6)
    extra = Image.fromarray(np.full((6, 10), 200, dtype=np.uint8), mode="L")
    random.seed(0)
    _, out_label, out_extra = RandomCrop(16)(image, label, extra)
    lbl, ext = np.asarray(out_label), np.asarray(out_extra)
    assert ext.shape == (16, 16) and set(np.unique(ext)) == {0, 200}
    assert ((ext == 0) == (lbl == 0)).all() and (ext == 200).sum() == 10 * 6


def test_flip_moves_extras_with_the_image():
    image, label, extra = coordinate_pair(8, 4)
    _, flipped_label, flipped_extra = RandomHorizontalFlip(p=1.0)(image, label, extra)
    assert np.asarray(flipped_label)[0].tolist() == list(range(7, -1, -1))
    assert (np.asarray(flipped_extra) == np.arange(4)[:, None]).all()  # y is unchanged by a horizontal flip


# ---- MiB-family RandomResizedCrop (MiB dataset/transform.py) -------------------------------------------

def test_mib_train_transform_sizes_and_alignment():
    image, label, extra = coordinate_pair(120, 90)
    transform = mib_train_transform(64)
    for seed in range(20):
        random.seed(seed)
        out_image, out_label, out_extra = transform(image, label, extra)
        assert out_image.shape == (3, 64, 64) and out_label.shape == (64, 64) and out_extra.shape == (64, 64)
        assert out_image.dtype == out_label.dtype == out_extra.dtype == torch.uint8
        # bilinear image vs nearest label: the coordinates they encode agree within a pixel or two
        # (the box is at most 120 px wide, so one output pixel covers < 2 input pixels)
        assert (out_image[0].int() - out_label.int()).abs().max() <= 3
        assert (out_image[1].int() - out_extra.int()).abs().max() <= 3
        # the label's x range is a box of the image: within [0, 119]; the extra's y range within [0, 89]
        assert out_label.max() <= 119 and out_extra.max() <= 89


def test_mib_flip_is_horizontal_and_joint():
    image, label, extra = coordinate_pair(60, 60)
    flips = 0
    for seed in range(40):
        random.seed(seed)
        _, out_label, out_extra = mib_train_transform(32)(image, label, extra)
        x = out_label.int()
        # x decreases along rows when flipped, increases otherwise; y always increases down the columns
        flipped = bool((x[:, 0] > x[:, -1]).all())
        assert flipped or bool((x[:, 0] < x[:, -1]).all())
        assert bool((out_extra[0].int() <= out_extra[-1].int()).all())
        flips += flipped
    assert 8 <= flips <= 32  # p = 0.5 over 40 draws


def test_resized_crop_box_distribution():
    width, height = 400, 300
    random.seed(0)
    boxes = [resized_crop_box(width, height) for _ in range(3000)]
    fractions, aspects = [], []
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width  # inside the image
        fractions.append(h * w / (width * height))
        aspects.append(w / h)
    fractions, aspects = np.array(fractions), np.array(aspects)
    # area fraction drawn from U(0.5, 2.0) and kept only when the box fits: within [0.5, 1] up to rounding
    assert fractions.min() >= 0.5 - 0.01 and fractions.max() <= 1.0
    assert fractions.min() < 0.52 and fractions.max() > 0.97
    # aspect drawn log-uniformly in [3/4, 4/3]: within it up to rounding, both ends reached, centred in log
    assert aspects.min() >= 0.75 - 0.01 and aspects.max() <= 4 / 3 + 0.01
    assert aspects.min() < 0.77 and aspects.max() > 1.3
    assert len({(t, l) for t, l, _, _ in boxes}) > 1000  # the position is drawn too


def test_resized_crop_box_attempts_and_fallback_rate():
    # square image: an attempt (f ~ U(0.5, 2), log r ~ U(−a, a), a = log 4/3) fits iff f <= min(r, 1/r), so
    # P(fit) = ((1 − e^−a)/a − 1/2)/1.5 = 0.2460 (rounding aside) and all 10 attempts fail with probability
    # (1 − 0.2460)^10 = 0.0594, when the fallback returns the whole image
    side, draws = 400, 4000
    a = np.log(4 / 3)
    fallback = (1 - ((1 - np.exp(-a)) / a - 0.5) / 1.5) ** 10
    random.seed(1)
    boxes = [resized_crop_box(side, side) for _ in range(draws)]
    whole = sum(box == (0, 0, side, side) for box in boxes) / draws
    assert abs(whole - fallback) < 4 * np.sqrt(fallback * (1 - fallback) / draws)  # 4 sigma
    # 1 attempt instead of 10 would give 75 % whole images, 9 attempts 8 %: both outside the band
    # by symmetry of the square, the log aspect of the accepted boxes is centred on 0
    aspects = np.log([w / h for _, _, h, w in boxes])
    assert abs(aspects.mean()) < 4 * aspects.std() / np.sqrt(draws)


def test_resized_crop_box_accepts_the_first_fitting_attempt():
    # an attempt draws uniform(area fraction), uniform(log aspect) and, if it fits, randint(top), randint(left)
    random.seed(11)
    draws = [(random.uniform(0.5, 2.0), random.uniform(np.log(3 / 4), np.log(4 / 3))) for _ in range(10)]
    width, height = 200, 160
    for n, (fraction, log_aspect) in enumerate(draws):
        w = int(round(np.sqrt(width * height * fraction * np.exp(log_aspect))))
        h = int(round(np.sqrt(width * height * fraction / np.exp(log_aspect))))
        if w <= width and h <= height:
            break
    random.seed(11)
    for _ in range(n):
        random.uniform(0, 1), random.uniform(0, 1)  # the rejected attempts
    random.uniform(0, 1), random.uniform(0, 1)
    top, left = random.randint(0, height - h), random.randint(0, width - w)
    random.seed(11)
    assert resized_crop_box(width, height) == (top, left, h, w)


@pytest.mark.parametrize("width,height,expected", [
    # too wide (aspect 20): no attempt fits (h >= sqrt(0.5·1000·50 / (4/3)) = 137 > 50), so the centred
    # box of aspect 4/3 spanning the height: h = 50, w = round(50·4/3) = 67, left = (1000 − 67) // 2 = 466
    (1000, 50, (0, 466, 50, 67)),
    # too tall: w = 50, h = round(50 / (3/4)) = 67, top = (1000 − 67) // 2 = 466
    (50, 1000, (466, 0, 67, 50)),
])
def test_resized_crop_box_fallback_on_extreme_aspects(width, height, expected):
    for seed in range(10):
        random.seed(seed)
        assert resized_crop_box(width, height) == expected


def test_resized_crop_fallback_resizes_the_centre_box():
    image, label, extra = coordinate_pair(250, 20)  # aspect 12.5: always the fallback box (h 20, w 27)
    random.seed(0)
    out_image, out_label, out_extra = RandomResizedCrop(40)(image, label, extra)
    # the box is columns (250 − 27) // 2 = 111 .. 137 and all 20 rows, resized to 40x40
    out_label, out_extra = np.asarray(out_label), np.asarray(out_extra)
    assert out_label.min() == 111 and out_label.max() == 137
    assert out_extra.min() == 0 and out_extra.max() == 19
    assert out_image.size == (40, 40) and out_label.shape == (40, 40)
