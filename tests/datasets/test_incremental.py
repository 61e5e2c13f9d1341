"""datasets/incremental.py: the step rule on hand-made class indexes, the label lookup tables (BARM
datasets/voc.py::gt_label_mapping, SSUL-M memory labels) and the incremental dataset item with its extra per-sample
maps."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from datasets import saliency_path, step_samples
from datasets.incremental import IncrementalSegmentation, channel_order, label_lut, step_mask
from datasets.transforms import eval_transform, mib_train_transform, train_transform
from methods.barm import barm_lut
from tests.helpers import hand_index
from utils.errors import UserError
from utils.tasks import get_task


def test_rules_on_a_hand_made_index():
    steps = get_task("voc", "15-1")
    index = hand_index([
        {0, 1, 255},      # base only
        {0, 16},          # step 1 only
        {0, 16, 3},       # step 1 with an old class
        {0, 16, 18},      # step 1 with a future class
        {0, 18, 255},     # step 3 only
        {0},              # background only: never used
    ])
    keep = lambda step, overlap: np.flatnonzero(step_mask(index, steps, step, overlap)).tolist()  # noqa: E731
    assert keep(0, True) == [0, 2]
    assert keep(0, False) == [0]
    assert keep(1, True) == [1, 2, 3]
    assert keep(1, False) == [1, 2]
    assert keep(3, True) == [3, 4]
    assert keep(3, False) == [3, 4]


def test_disjoint_rule_is_correct_for_shuffled_orders():
    # 15-1_b: step 0 holds 20 (among others), step 1 adds 17, step 2 adds 3.
    steps = get_task("voc", "15-1_b")
    index = hand_index([{0, 17, 20}, {0, 17, 3}, {0, 17}])
    assert np.flatnonzero(step_mask(index, steps, 1, overlap=False)).tolist() == [0, 2]
    # BARM's rule (old = range(1, 17)) would keep image 1 (future class 3) and drop image 0 (old class 20).
    barm_old = set(range(1, steps[1][0])) | {17, 0, 255}
    barm = [i for i in range(3) if set(index.classes(i)) <= barm_old]
    assert barm == [1, 2]


# ---- label lookup tables ------------------------------------------------------------------------------

def test_lut_train_and_val_keep_only_current_classes():
    steps = get_task("voc", "15-1")
    for split in ("train", "val"):
        lut = label_lut(steps, 2, split, barm_lut)
        assert lut[17] == 17
        assert lut[0] == 0 and lut[255] == 255
        assert lut[16] == 0 and lut[1] == 0 and lut[18] == 0 and lut[20] == 0  # old and future → background
        assert lut[21] == 0  # values outside the dataset are masked like any non-current value


def test_lut_test_is_the_channel_order():
    steps = get_task("voc", "15-1")
    lut = label_lut(steps, 2, "test", barm_lut)
    assert lut[:21].tolist() == list(range(21))
    assert lut[255] == 255 and lut[21] == 255 and lut[100] == 255


def test_lut_for_a_shuffled_order():
    steps = get_task("voc", "15-1_b")  # step 0: [0, 12, 9, 20, 7, ...], step 1: [17], step 2: [3]
    test = label_lut(steps, 1, "test", barm_lut)
    assert test[0] == 0 and test[12] == 1 and test[9] == 2 and test[20] == 3 and test[11] == 15
    assert test[17] == 16 and test[3] == 17 and test[10] == 20
    train1 = label_lut(steps, 1, "train", barm_lut)
    assert train1[17] == 16 and train1[12] == 0 and train1[3] == 0
    train0 = label_lut(steps, 0, "train", barm_lut)
    assert train0[12] == 1 and train0[17] == 0 and train0[255] == 255
    order = channel_order(steps)
    assert sorted(order[:21].tolist()) == list(range(21))


def test_lut_rejects_unknown_split():
    steps = get_task("voc", "15-1")
    with pytest.raises(ValueError):
        label_lut(steps, 0, "validation", barm_lut)


# ---- label policies: registry, callables, SSUL-M memory labels ----------------------------------------

def test_lut_memory_keeps_current_and_previous_classes():
    # SSUL-M memory labels (SSUL datasets/voc.py::__init__): current and all previous classes kept, future → 0,
    # 255 stays
    steps = get_task("voc", "15-1")  # step 2 adds 17
    lut = label_lut(steps, 2, "memory", barm_lut)
    assert lut[:18].tolist() == list(range(18))
    assert lut[18:21].tolist() == [0, 0, 0] and lut[255] == 255 and lut[21] == 0 and lut[100] == 0
    shuffled = get_task("voc", "15-1_b")  # step 0: [0, 12, 9, 20, 7, ...], step 1: [17], step 2: [3]
    lut = label_lut(shuffled, 1, "memory", barm_lut)
    assert lut[12] == 1 and lut[9] == 2 and lut[20] == 3 and lut[17] == 16  # channel order
    assert lut[3] == 0 and lut[10] == 0 and lut[255] == 255  # future classes of steps 2.. → background
    assert lut[0] == 0
    # step 0: the memory table is the training table
    assert np.array_equal(label_lut(steps, 0, "memory", barm_lut), label_lut(steps, 0, "train", barm_lut))


def test_lut_accepts_a_callable_policy():
    steps = get_task("voc", "15-1")
    calls = []

    def everything_ignored(policy_steps, step, split):
        calls.append((step, split))
        table = np.full(256, 255, dtype=np.int64)
        table[0] = 0
        return table

    lut = label_lut(steps, 3, "val", everything_ignored)
    assert calls == [(3, "val")] and lut.dtype == np.uint8
    assert lut[0] == 0 and (lut[1:] == 255).all()
    with pytest.raises(ValueError, match="256"):
        label_lut(steps, 0, "train", lambda *a: np.zeros(10, dtype=np.uint8))


# ---- the dataset item ---------------------------------------------------------------------------------

def test_dataset_item_maps_labels(synthetic_voc, tmp_path):
    steps = get_task("voc", "15-1")
    samples = step_samples("voc", synthetic_voc, steps, 1, True, "train", cache_dir=str(tmp_path))
    dataset = IncrementalSegmentation(samples, label_lut(steps, 1, "train", barm_lut), eval_transform(64, True))
    image, label, extras, image_id = dataset[0]
    assert image_id == samples[0][0] and extras == {}
    assert set(torch.unique(label).tolist()) <= {0, 16, 255}
    assert 16 in torch.unique(label).tolist() or len(dataset) == 0
    # at test time the natural order's table is the identity: the label is the raw label, transformed
    test_set = IncrementalSegmentation(samples, label_lut(steps, 1, "test", barm_lut), eval_transform(64, True))
    raw = Image.open(samples[0][2]).convert("L")
    expected = eval_transform(64, True)(Image.open(samples[0][1]).convert("RGB"), raw)[1]
    assert torch.equal(test_set[0][1], expected)
    train_label = np.asarray(dataset[0][1])
    assert ((train_label == 16) == (expected.numpy() == 16)).all()


# ---- the dataset item with extra maps -----------------------------------------------------------------

def test_dataset_extras_follow_the_label(synthetic_voc, tmp_path):
    steps = get_task("voc", "15-1")
    samples = step_samples("voc", synthetic_voc, steps, 1, True, "train", cache_dir=str(tmp_path))
    label_paths = {s[0]: s[2] for s in samples}
    extra_maps = {"raw_label": label_paths.__getitem__, "saliency": lambda i: saliency_path(synthetic_voc, i)}
    # the test table of the natural order is the identity, so the label and the raw label extra must agree
    for name, transform in (("train", train_transform(48)), ("mib", mib_train_transform(48))):
        dataset = IncrementalSegmentation(samples, label_lut(steps, 1, "test", barm_lut), transform,
                                          extra_maps=extra_maps)
        for i in range(3):
            random.seed(i)
            image, label, extras, image_id = dataset[i]
            assert sorted(extras) == ["raw_label", "saliency"] and image_id == samples[i][0]
            assert torch.equal(extras["raw_label"], label), name
            assert extras["saliency"].shape == label.shape and extras["saliency"].dtype == torch.uint8
            assert set(torch.unique(extras["saliency"]).tolist()) <= {0, 255}
            # without the extras, the same seed gives the same image and label
            random.seed(i)
            plain = IncrementalSegmentation(samples, label_lut(steps, 1, "test", barm_lut), transform)[i]
            assert torch.equal(plain[0], image) and torch.equal(plain[1], label) and plain[2] == {}


def test_collate_keeps_an_empty_extras_dict(synthetic_voc, tmp_path):
    steps = get_task("voc", "15-1")
    samples = step_samples("voc", synthetic_voc, steps, 0, True, "train", cache_dir=str(tmp_path))[:4]
    plain = IncrementalSegmentation(samples, label_lut(steps, 0, "train", barm_lut), eval_transform(32, True))
    images, labels, extras, ids = default_collate([plain[i] for i in range(4)])
    assert extras == {} and images.shape == (4, 3, 32, 32) and list(ids) == [s[0] for s in samples]
    with_maps = IncrementalSegmentation(samples, label_lut(steps, 0, "train", barm_lut), eval_transform(32, True),
                                        extra_maps={"saliency": lambda i: saliency_path(synthetic_voc, i)})
    batch = next(iter(DataLoader(with_maps, batch_size=4)))
    assert batch[2]["saliency"].shape == (4, 32, 32) and batch[2]["saliency"].dtype == torch.uint8


def test_missing_or_bad_extra_map_is_a_user_error(synthetic_voc, tmp_path):
    steps = get_task("voc", "15-1")
    samples = step_samples("voc", synthetic_voc, steps, 0, True, "train", cache_dir=str(tmp_path))[:1]
    lut = label_lut(steps, 0, "train", barm_lut)
    missing = str(tmp_path / "nowhere" / "x.png")
    dataset = IncrementalSegmentation(samples, lut, eval_transform(32, True),
                                      extra_maps={"saliency": lambda i: missing})
    with pytest.raises(UserError, match=r"saliency map .*nowhere/x\.png is missing: expected an 8-bit PNG"):
        dataset[0]
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    dataset.extra_maps = {"saliency": lambda i: str(garbage)}
    with pytest.raises(UserError, match=r"cannot decode saliency map .*garbage\.png.*expected an 8-bit PNG"):
        dataset[0]
    wide = tmp_path / "wide.png"
    Image.new("I;16", (8, 8)).save(wide)
    dataset.extra_maps = {"saliency": lambda i: str(wide)}
    with pytest.raises(UserError, match=r"wide\.png has image mode I;16: expected an 8-bit PNG"):
        dataset[0]
    small = tmp_path / "small.png"
    Image.new("L", (5, 4)).save(small)
    dataset.extra_maps = {"saliency": lambda i: str(small)}
    with pytest.raises(UserError, match=r"small\.png is 5x4 but image .* expected the same size"):
        dataset[0]
