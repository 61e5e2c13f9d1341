"""Joint transforms (spec barm-ssul-kproba §5.4) and the incremental dataset item."""
import random

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from datasets import step_samples
from datasets.incremental import IncrementalSegmentation, label_lut
from datasets.transforms import (CenterCrop, RandomCrop, RandomHorizontalFlip, Resize, ToUint8Tensor,
                                 eval_transform, normalize, train_transform)
from utils.tasks import get_task


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


def test_dataset_item_maps_labels(synthetic_voc, tmp_path):
    steps = get_task("voc", "15-1")
    samples = step_samples("voc", synthetic_voc, steps, 1, True, "train", cache_dir=str(tmp_path))
    dataset = IncrementalSegmentation(samples, label_lut(steps, 1, "train"), eval_transform(64, True))
    image, label, image_id = dataset[0]
    assert image_id == samples[0][0]
    assert set(torch.unique(label).tolist()) <= {0, 16, 255}
    assert 16 in torch.unique(label).tolist() or len(dataset) == 0
    # at test time the natural order's table is the identity: the label is the raw label, transformed
    test_set = IncrementalSegmentation(samples, label_lut(steps, 1, "test"), eval_transform(64, True))
    raw = Image.open(samples[0][2]).convert("L")
    expected = eval_transform(64, True)(Image.open(samples[0][1]).convert("RGB"), raw)[1]
    assert torch.equal(test_set[0][1], expected)
    train_label = np.asarray(dataset[0][1])
    assert ((train_label == 16) == (expected.numpy() == 16)).all()
