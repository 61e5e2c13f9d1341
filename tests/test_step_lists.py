"""Overlap / disjoint image lists, the test lists, and the label lookup tables
(BARM utils/tasks.py::get_dataset_list, datasets/voc.py::gt_label_mapping; MiB dataset/utils.py::filter_images)."""
import numpy as np
import pytest
from PIL import Image

from datasets import step_image_ids, voc
from datasets.class_index import ClassIndex
from datasets.incremental import channel_order, label_lut, step_mask
from methods.barm import barm_lut
from utils.errors import UserError
from utils.tasks import get_task, list_tasks


def hand_index(class_sets):
    presence = np.zeros((len(class_sets), 256), dtype=bool)
    for row, classes in enumerate(class_sets):
        presence[row, list(classes)] = True
    return ClassIndex([f"img{i}" for i in range(len(class_sets))], presence)


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


def classes_of(path):
    return set(np.unique(np.asarray(Image.open(path))).tolist())


@pytest.mark.parametrize("task", ["15-1", "15-1_b", "10-1", "5-3"])
def test_lists_match_an_independent_computation(synthetic_voc, tmp_path, task):
    steps = get_task("voc", task)
    samples = voc.list_split(synthetic_voc, "train")
    label_sets = {s[0]: classes_of(s[2]) for s in samples}
    for t in range(len(steps)):
        new = set(steps[t]) - {0}
        seen = {c for s in steps[:t + 1] for c in s} | {0, 255}
        overlap = [i for i, cs in label_sets.items() if cs & new]
        disjoint = [i for i in overlap if label_sets[i] <= seen]
        assert step_image_ids("voc", synthetic_voc, task, t, True, cache_dir=str(tmp_path)) == overlap
        assert step_image_ids("voc", synthetic_voc, task, t, False, cache_dir=str(tmp_path)) == disjoint


def test_val_and_test_splits(synthetic_voc, tmp_path):
    val_ids = [s[0] for s in voc.list_split(synthetic_voc, "val")]
    assert step_image_ids("voc", synthetic_voc, "15-1", 2, True, split="test", cache_dir=str(tmp_path)) == val_ids
    step2 = step_image_ids("voc", synthetic_voc, "15-1", 2, True, split="val", cache_dir=str(tmp_path))
    samples = dict((s[0], s[2]) for s in voc.list_split(synthetic_voc, "val"))
    assert step2 == [i for i in val_ids if 17 in classes_of(samples[i])]


def test_unknown_task_and_step_out_of_range(synthetic_voc):
    with pytest.raises(UserError, match="unknown voc task"):
        step_image_ids("voc", synthetic_voc, "15-9x", 0, True)
    with pytest.raises(UserError, match="step 6 is out of range"):
        step_image_ids("voc", synthetic_voc, "15-1", 6, True)


@pytest.mark.parametrize("task", ["19-1", "15-5", "15-1", "10-1", "5-3", "15-1_b", "2-1"])
def test_synthetic_voc_separates_overlap_and_disjoint(synthetic_voc, tmp_path, task):
    steps = get_task("voc", task)
    lists = [(step_image_ids("voc", synthetic_voc, task, t, True, cache_dir=str(tmp_path)),
              step_image_ids("voc", synthetic_voc, task, t, False, cache_dir=str(tmp_path)))
             for t in range(len(steps))]
    assert all(len(d) > 0 for _, d in lists), "every step should have training images"
    assert any(o != d for o, d in lists)


@pytest.mark.parametrize("task", ["100-50", "100-10", "50-50", "100-5"])
def test_synthetic_ade_separates_overlap_and_disjoint(synthetic_ade, tmp_path, task):
    steps = get_task("ade", task)
    lists = [(step_image_ids("ade", synthetic_ade, task, t, True, cache_dir=str(tmp_path)),
              step_image_ids("ade", synthetic_ade, task, t, False, cache_dir=str(tmp_path)))
             for t in range(len(steps))]
    assert all(len(o) > 0 for o, _ in lists)
    assert any(o != d for o, d in lists)


def test_every_named_task_resolves():
    for dataset in ("voc", "ade"):
        for name in list_tasks(dataset):
            steps = get_task(dataset, name)
            assert steps[0][0] == 0


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


# ---- MiB/PLOP/RCIL/DKD test list: validation images with a seen class (MiB dataset/utils.py::filter_images) ----------

@pytest.mark.parametrize("task", ["15-1", "15-1_b", "10-1"])
def test_test_seen_split(synthetic_voc, tmp_path, task):
    steps = get_task("voc", task)
    samples = voc.list_split(synthetic_voc, "val")
    val_sets = [(s[0], classes_of(s[2])) for s in samples]
    sizes = []
    for t in range(len(steps)):
        seen = {c for s in steps[:t + 1] for c in s} - {0}
        expected = [i for i, cs in val_sets if cs & seen]
        for overlap in (True, False):  # the setting does not change the test list
            ids = step_image_ids("voc", synthetic_voc, task, t, overlap, split="test_seen", cache_dir=str(tmp_path))
            assert ids == expected
        sizes.append(len(expected))
    assert sizes == sorted(sizes)  # nested, growing lists
    if task != "15-1_b":  # natural orders: the step-0 list is a strict subset (15-1_b's base holds 20)
        assert sizes[0] < len(samples)
    # at the last step every class is seen: the images with any foreground class (here: all of them)
    assert sizes[-1] == sum(bool(cs - {0, 255}) for _, cs in val_sets)


def test_test_seen_on_a_hand_made_index(monkeypatch):
    import datasets
    steps = get_task("voc", "15-1")
    index = hand_index([{0, 255}, {0, 3}, {0, 16, 255}, {0, 17}, {0, 20}, {0, 18, 2}])
    samples = [(i, f"{i}.jpg", f"{i}.png") for i in index.ids]
    monkeypatch.setattr(datasets, "split_class_index", lambda *a, **k: (samples, index))
    keep = lambda step: [s[0] for s in datasets.step_samples("voc", "x", steps, step, True, "test_seen")]  # noqa: E731
    assert keep(0) == ["img1", "img5"]  # background / void alone is not a seen class
    assert keep(1) == ["img1", "img2", "img5"]
    assert keep(2) == ["img1", "img2", "img3", "img5"]
    assert keep(5) == ["img1", "img2", "img3", "img4", "img5"]


def test_split_names_and_files():
    from datasets import SPLITS, file_split
    assert SPLITS == ("train", "val", "test", "test_seen")
    assert [file_split(s) for s in SPLITS] == ["train", "val", "val", "val"]
    with pytest.raises(UserError, match="test_seen"):
        file_split("testseen")


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
