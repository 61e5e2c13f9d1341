"""datasets/class_index.py: contents against np.unique, caching, invalidation, damaged caches, BARM's cls
files, bad labels."""
import logging
import os
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

import datasets.class_index as ci
from datasets import ade, split_class_index, voc
from datasets.class_index import ClassIndex, cache_folder, label_presence
from tests.helpers import unique_values
from utils.errors import UserError


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


# ---- damaged caches, no empty cache folder ------------------------------------------------------------

def _member_data_span(path, member):
    """Byte offsets ``(start, end)`` of ``member``'s stored data inside the zip (npz) file at ``path``."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
    start = info.header_offset + 30 + name_length + extra_length
    return start, start + info.compress_size


def damage_truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[:len(data) // 2])


def damage_flip(path):
    # flip bits of the last byte of the presence array: the file stays a zip, the member's CRC-32 fails
    _, end = _member_data_span(path, "presence.npy")
    data = bytearray(open(path, "rb").read())
    data[end - 1] ^= 0x5A
    with open(path, "wb") as handle:
        handle.write(bytes(data))


def damage_header(path):
    # a few bytes of the array header changed (the .npy magic string): not a valid array any more
    start, _ = _member_data_span(path, "presence.npy")
    data = bytearray(open(path, "rb").read())
    data[start + 1:start + 4] = b"XYZ"
    with open(path, "wb") as handle:
        handle.write(bytes(data))


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip, damage_header])
def test_damaged_cache_is_rebuilt_with_one_log_line(voc_copy, tmp_path, caplog, damage):
    cache_dir = str(tmp_path / "cache")
    _, first = split_class_index("voc", voc_copy, "train", cache_dir=cache_dir, workers=1)
    path = os.path.join(cache_dir, "voc_train_class_index.npz")
    damage(path)
    with pytest.raises(Exception):  # the damage is real: the file no longer loads as it was written
        with np.load(path) as data:
            np.unpackbits(data["presence"], axis=1)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _, again = split_class_index("voc", voc_copy, "train", cache_dir=cache_dir, workers=1)
    assert np.array_equal(again.presence, first.presence) and again.ids == first.ids
    records = [r for r in caplog.records if "class index" in r.getMessage() or "class-index" in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.WARNING and path in records[0].getMessage()
    assert "cannot be read" in records[0].getMessage()
    # the rebuilt cache is whole again: the next run reads it without building or logging
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _, third = split_class_index("voc", voc_copy, "train", cache_dir=cache_dir, workers=1)
    assert np.array_equal(third.presence, first.presence) and not caplog.records


@pytest.mark.parametrize("problem", ["corrupt", "out_of_range"])
@pytest.mark.parametrize("explicit_dir", [True, False])
def test_label_error_leaves_no_empty_cache_folder(voc_copy, tmp_path, problem, explicit_dir):
    path = voc.list_split(voc_copy, "train")[4][2]
    if problem == "corrupt":
        with open(path, "wb") as handle:
            handle.write(b"\x89PNG\r\n\x1a\n garbage")
    else:
        label = np.asarray(Image.open(path)).copy()
        label[1, 1] = 30
        Image.fromarray(label, mode="L").save(path)
    cache_dir = str(tmp_path / "cache" / "nested") if explicit_dir else None
    folder = cache_dir or os.path.join(voc_copy, ".ciss_cache")
    with pytest.raises(UserError, match=os.path.basename(path) if problem == "corrupt" else "30"):
        split_class_index("voc", voc_copy, "train", cache_dir=cache_dir, workers=2)
    assert not os.path.exists(folder)


def test_label_error_keeps_an_existing_cache_folder(voc_copy, tmp_path):
    # a folder that was there before (with the val index in it) is not touched
    cache_dir = str(tmp_path / "cache")
    split_class_index("voc", voc_copy, "val", cache_dir=cache_dir, workers=1)
    path = voc.list_split(voc_copy, "train")[0][2]
    with open(path, "wb") as handle:
        handle.write(b"not a png")
    with pytest.raises(UserError):
        split_class_index("voc", voc_copy, "train", cache_dir=cache_dir, workers=1)
    assert os.listdir(cache_dir) == ["voc_val_class_index.npz"]
