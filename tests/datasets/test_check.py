"""datasets/check.py on a dataset of one's own: what the report says (the description, images per split, per step
and per class against counts made here from the label files), and bad input as one line with status 2."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from datasets import custom
from datasets.check import main
from datasets.synthetic import ID_STEP, SYNTHETIC_CLASSES, generate_custom
from utils.errors import USER_ERROR_EXIT_CODE


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("check") / "shapes")
    return root, generate_custom(root, n_images=15, size=40, seed=2, workers=1)


def images_per_label_id(root, ids):
    """How many of the images ``ids`` hold each label value (counted here, from the PNGs)."""
    counts = np.zeros(256, dtype=int)
    for image_id in ids:
        counts[np.unique(np.asarray(Image.open(os.path.join(root, "labels", image_id + ".png"))))] += 1
    return counts


def test_report_of_a_dataset_of_ones_own(shapes, tmp_path, capsys):
    root, ids = shapes
    main(["--dataset", "custom", "--data_root", root, "--task", "4-2", "--cache_dir", str(tmp_path), "--workers", "1"])
    out = capsys.readouterr().out
    assert f'{custom.description_path(os.path.abspath(root))}: "synthetic shapes", 7 classes, background label id 0,' \
           f" ignore value 255, seeded split (seed 2, validation fraction 0.2)" in out
    assert f"train: {len(ids['train'])} images, labels OK, image sizes match" in out
    assert f"val: {len(ids['val'])} images, labels OK, image sizes match" in out
    assert "task 4-2: 2 steps, classes per step [5, 2]" in out
    train, val = images_per_label_id(root, ids["train"]), images_per_label_id(root, ids["val"])
    rows = [line.split(maxsplit=2) for line in out.splitlines() if line[:5].strip().isdigit() and len(line) > 30]
    table = {int(r[0]): r for r in rows if len(r[2].split()) >= 3}
    for c, name in enumerate(SYNTHETIC_CLASSES):
        cls, label, rest = table[c]
        assert int(label) == c * ID_STEP and rest.rsplit(maxsplit=2)[0] == name
        assert [int(v) for v in rest.rsplit(maxsplit=2)[1:]] == [train[c * ID_STEP], val[c * ID_STEP]]
    # step 1 of 4-2 (classes 5, 6 = label ids 50, 60) trains on the images holding either, overlap or not
    step1 = next(line.split() for line in out.splitlines() if line.split()[:2] == ["1", "5,6"])
    holding = sum(1 for i in ids["train"] if {50, 60} & set(np.unique(np.asarray(
        Image.open(os.path.join(root, "labels", i + ".png")))).tolist()))
    assert int(step1[2]) == int(step1[3]) == holding


def test_bad_input_is_one_line_with_status_2(shapes, tmp_path, capsys):
    root = str(tmp_path / "bad")
    shutil.copytree(shapes[0], root, ignore=shutil.ignore_patterns(".ciss_cache"))
    label = os.path.join(root, "labels", shapes[1]["val"][0] + ".png")
    size = Image.open(label).size
    Image.fromarray(np.full(size[::-1], 33, dtype=np.uint8), mode="L").save(label)
    with pytest.raises(SystemExit) as caught:
        main(["--dataset", "custom", "--data_root", root, "--workers", "1"])
    assert caught.value.code == USER_ERROR_EXIT_CODE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: label ") and label in lines[0] and "[33]" in lines[0]
