"""datasets/synthetic.py: the synthetic generator: SSUL saliency maps for the VOC layout, determinism, unchanged
images and labels."""
import os
import zlib

import numpy as np
import pytest
from PIL import Image

from datasets import SALIENCY_DIR, ade, saliency_path, voc
from datasets.synthetic import generate, render, render_saliency


def voc_samples(root):
    return voc.list_split(root, "train") + voc.list_split(root, "val")


def test_voc_gets_a_saliency_map_per_train_and_val_image(synthetic_voc):
    samples = voc_samples(synthetic_voc)
    assert sorted(os.listdir(os.path.join(synthetic_voc, SALIENCY_DIR))) == sorted(f"{s[0]}.png" for s in samples)
    for image_id, _, label_path in samples[::7]:
        with Image.open(saliency_path(synthetic_voc, image_id)) as saliency:
            assert saliency.mode == "L"
            values = np.asarray(saliency)
        assert values.shape == np.asarray(Image.open(label_path)).shape
        assert set(np.unique(values).tolist()) <= {0, 255}


def test_ade_gets_no_saliency_maps(synthetic_ade):
    assert not os.path.exists(os.path.join(synthetic_ade, SALIENCY_DIR))
    assert render_saliency("ade", 0, "train", 0, np.zeros((4, 4), dtype=np.uint8)) is None


def test_saliency_follows_the_objects(synthetic_voc):
    # salient on most object pixels (label != 0, void border included), rarely on the background,
    # with some missed object pixels and some salient background pixels (not a copy of the mask)
    fg_salient = fg_total = bg_salient = bg_total = 0
    for image_id, _, label_path in voc_samples(synthetic_voc):
        label = np.asarray(Image.open(label_path))
        salient = np.asarray(Image.open(saliency_path(synthetic_voc, image_id))) > 0
        foreground = label != 0
        fg_salient += int(salient[foreground].sum())
        fg_total += int(foreground.sum())
        bg_salient += int(salient[~foreground].sum())
        bg_total += int((~foreground).sum())
    hit, false_alarm = fg_salient / fg_total, bg_salient / bg_total
    assert 0.85 < hit < 0.95  # 10 % of the object pixels missed
    assert 0.01 < false_alarm < 0.05  # 3 % of the background marked
    # the correlation of the two binary maps is strongly positive
    p_fg = fg_total / (fg_total + bg_total)
    p_sal = (fg_salient + bg_salient) / (fg_total + bg_total)
    phi = (fg_salient / (fg_total + bg_total) - p_fg * p_sal) / np.sqrt(p_fg * (1 - p_fg) * p_sal * (1 - p_sal))
    assert phi > 0.8


def test_saliency_is_deterministic_and_per_image(tmp_path):
    one = generate("voc", str(tmp_path / "one"), n_train=4, n_val=2, size=48, seed=3, workers=1)
    two = generate("voc", str(tmp_path / "two"), n_train=4, n_val=2, size=48, seed=3, workers=2)
    assert one == two
    maps = []
    for image_id in one["train"] + one["val"]:
        a = np.asarray(Image.open(saliency_path(str(tmp_path / "one"), image_id)))
        b = np.asarray(Image.open(saliency_path(str(tmp_path / "two"), image_id)))
        assert np.array_equal(a, b)
        maps.append(a)
    # a function of (seed, split, i): image 0 of train and of val differ, another seed differs
    label = render("voc", 3, "train", 0, 48, with_image=False)[1]
    assert np.array_equal(render_saliency("voc", 3, "train", 0, label), maps[0])
    assert not np.array_equal(render_saliency("voc", 4, "train", 0, label), maps[0])
    assert not np.array_equal(render_saliency("voc", 3, "val", 0, label), maps[0])


@pytest.mark.parametrize("dataset,split,i,shape,label_crc", [
    # produced by the generator before the saliency maps existed: images and labels must not change
    ("voc", "train", 0, (62, 69, 3), 4004037018),
    ("voc", "val", 3, (53, 65, 3), 2806535965),
    ("ade", "train", 5, (55, 69, 3), 190256745),
])
def test_images_and_labels_are_unchanged(dataset, split, i, shape, label_crc):
    image, label = render(dataset, 0, split, i, 64)
    assert image.shape == shape and zlib.crc32(label.tobytes()) == label_crc
    assert np.array_equal(render(dataset, 0, split, i, 64, with_image=False)[1], label)


def test_generated_files_match_render(tmp_path):
    root = str(tmp_path / "ADE")
    ids = generate("ade", root, n_train=2, n_val=1, size=40, seed=1, workers=2)
    assert ids["train"] == ["ADE_train_00000001", "ADE_train_00000002"]
    label = np.asarray(Image.open(os.path.join(root, "annotations", ade.SPLIT_FOLDERS["train"],
                                               "ADE_train_00000002.png")))
    assert np.array_equal(label, render("ade", 1, "train", 1, 40, with_image=False)[1])
