"""Class index: contents against np.unique, caching, invalidation, BARM's cls files, bad labels."""
import os

import numpy as np
import pytest
from PIL import Image

import datasets.class_index as ci
from datasets import ade, split_class_index, voc
from datasets.class_index import ClassIndex, cache_folder, label_presence
from utils.errors import UserError


def unique_values(path):
    return set(np.unique(np.asarray(Image.open(path))).tolist())


def test_index_matches_np_unique(synthetic_voc, tmp_path):
    samples, index = split_class_index("voc", synthetic_voc, "train", cache_dir=str(tmp_path), workers=2)
    assert index.ids == [s[0] for s in samples]
    for i in (0, 7, len(samples) - 1):
        assert set(index.classes(i)) == unique_values(samples[i][2])
    assert index.presence[:, voc.IGNORE_LABEL].all()  # every synthetic VOC label has a void border


def test_single_and_multi_process_builds_agree(synthetic_ade):
    samples = ade.list_split(synthetic_ade, "train")
    paths, ids = [s[2] for s in samples], [s[0] for s in samples]
    one = ci.build_index(paths, ids, workers=1, progress=False)
    two = ci.build_index(paths, ids, workers=2, progress=False)
    assert np.array_equal(one.presence, two.presence)
    assert one.presence[:, 151:].sum() == 0


def test_cache_is_reused_then_invalidated(voc_copy, monkeypatch):
    _, first = split_class_index("voc", voc_copy, "train", workers=1)
    cache = os.path.join(voc_copy, ".ciss_cache", "voc_train_class_index.npz")
    assert os.path.exists(cache)

    def no_build(*args, **kwargs):
        raise AssertionError("the index was rebuilt although nothing changed")

    monkeypatch.setattr(ci, "build_index", no_build)
    _, again = split_class_index("voc", voc_copy, "train", workers=1)
    assert np.array_equal(first.presence, again.presence)

    # change one label: the cache must be rebuilt and reflect the change
    samples = voc.list_split(voc_copy, "train")
    label_path = samples[3][2]
    label = np.asarray(Image.open(label_path)).copy()
    label[:4, :4] = 20
    Image.fromarray(label, mode="L").save(label_path)
    monkeypatch.undo()
    calls = []
    real_build = ci.build_index
    monkeypatch.setattr(ci, "build_index", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    _, rebuilt = split_class_index("voc", voc_copy, "train", workers=1)
    assert calls and 20 in rebuilt.classes(3)


def test_changed_file_list_rebuilds(voc_copy):
    _, before = split_class_index("voc", voc_copy, "train", workers=1)
    split = os.path.join(voc_copy, voc.SPLIT_DIR, "train_aug.txt")
    ids = open(split).read().split()
    with open(split, "w") as handle:
        handle.write("\n".join(ids[:50]))
    samples, after = split_class_index("voc", voc_copy, "train", workers=1)
    assert len(after) == 50 and after.ids == ids[:50]
    assert np.array_equal(after.presence, before.presence[:50])


def test_barm_cls_file_is_accepted(voc_copy, tmp_path):
    samples, built = split_class_index("voc", voc_copy, "train", workers=1, cache_dir=str(tmp_path / "built"))
    folder = tmp_path / "barm"
    folder.mkdir()
    with open(folder / "train_cls.txt", "w") as handle:
        for i, s in enumerate(samples):
            foreground = [c - 1 for c in built.classes(i) if c not in (0, 255)]
            handle.write(" ".join([s[0]] + [str(c) for c in foreground]) + "\n")
    _, barm = split_class_index("voc", voc_copy, "train", workers=1, cache_dir=str(folder))
    expected = built.presence.copy()
    expected[:, [0, 255]] = False  # BARM's files list neither background nor void
    assert np.array_equal(barm.presence, expected)


def test_cache_folder_choices(tmp_path, monkeypatch):
    assert cache_folder(str(tmp_path), str(tmp_path / "explicit")) == str(tmp_path / "explicit")
    assert cache_folder(str(tmp_path)) == os.path.join(str(tmp_path), ".ciss_cache")
    monkeypatch.setattr(ci.os, "access", lambda path, mode: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = cache_folder(str(tmp_path / "readonly"))
    assert folder.startswith(str(tmp_path / "xdg" / "ciss")) and os.path.isdir(folder)


def test_contains_helpers_on_a_hand_made_index():
    presence = np.zeros((3, 256), dtype=bool)
    presence[0, [0, 1]] = True
    presence[1, [0, 2, 255]] = True
    presence[2, [0, 1, 3]] = True
    index = ClassIndex(["a", "b", "c"], presence)
    assert index.contains_any([1]).tolist() == [True, False, True]
    assert index.contains_any([]).tolist() == [False, False, False]
    assert index.contains_only({0, 1, 2, 255}).tolist() == [True, True, False]
    assert index.counts()[[0, 1, 2, 3]].tolist() == [3, 2, 1, 1]


def test_corrupt_label_is_named(voc_copy):
    path = voc.list_split(voc_copy, "train")[5][2]
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match=os.path.basename(path)):
        split_class_index("voc", voc_copy, "train", workers=2)


def test_out_of_range_label_is_named(voc_copy):
    path = voc.list_split(voc_copy, "train")[2][2]
    label = np.asarray(Image.open(path)).copy()
    label[0, 0] = 21
    Image.fromarray(label, mode="L").save(path)
    with pytest.raises(UserError, match=r"values \[21\].*0\.\.20"):
        split_class_index("voc", voc_copy, "train", workers=1)


def test_rgb_label_is_refused(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(UserError, match="single-channel"):
        label_presence(str(path))
