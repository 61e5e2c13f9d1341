"""datasets/__init__.py: the overlap / disjoint image lists of every step, the validation and test lists (BARM
utils/tasks.py::get_dataset_list; MiB dataset/utils.py::filter_images), split names and the --num_workers default."""
import os

import numpy as np
import pytest
from PIL import Image

from datasets import step_image_ids, voc
from tests.helpers import hand_index
from utils.errors import UserError
from utils.tasks import get_task


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


# ---- the --num_workers default -------------------------------------------------------------------------

@pytest.mark.parametrize("cpus, processes, expected", [
    (1, 1, 0),    # one CPU: load in the training process
    (2, 1, 1),    # not 4 on 2 cores (the DataLoader would warn on every loader)
    (3, 1, 2),
    (5, 1, 4),
    (64, 1, 4),   # never more than BARM's 4
    (16, 8, 1),   # 8 processes share 16 CPUs: 2 each, one of them for the training process
    (16, 4, 3),
    (4, 8, 0),    # fewer CPUs than processes
])
def test_default_num_workers(monkeypatch, cpus, processes, expected):
    from datasets import default_num_workers
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert default_num_workers(processes) == expected
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))  # torchrun's count, used by default
    assert default_num_workers() == expected


def test_default_num_workers_does_not_make_the_loader_warn(recwarn):
    import torch
    from torch.utils.data import DataLoader

    from datasets import default_num_workers
    workers = default_num_workers(1)
    loader = DataLoader(torch.zeros(4), num_workers=workers)
    loader.check_worker_number_rationality()
    assert not [w for w in recwarn if "worker" in str(w.message)]
    assert workers <= max(0, len(os.sched_getaffinity(0)) - 1)
