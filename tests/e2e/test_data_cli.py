"""End to end: the data command lines (``python -m datasets.synthetic``, ``python -m datasets.check``): the
synthetic generator, the data check, and one-line errors with status 2."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from datasets import voc
from tests.helpers import REPO


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_synthetic_command_is_deterministic(tmp_path):
    for name in ("a", "b"):
        result = run("-m", "datasets.synthetic", "--dataset", "ade", "--root", str(tmp_path / name),
                     "--n_train", "6", "--n_val", "2", "--size", "48", "--workers", "1")
        assert result.returncode == 0, result.stderr
    a = sorted(os.listdir(tmp_path / "a" / "annotations" / "training"))
    assert a == [f"ADE_train_{i:08d}.png" for i in range(1, 7)]
    for name in a:
        first = np.asarray(Image.open(tmp_path / "a" / "annotations" / "training" / name))
        second = np.asarray(Image.open(tmp_path / "b" / "annotations" / "training" / name))
        assert (first == second).all() and first.max() <= 150


def test_check_prints_steps_and_classes(synthetic_voc, tmp_path):
    result = run("-m", "datasets.check", "--dataset", "voc", "--data_root", synthetic_voc, "--task", "15-1",
                 "--cache_dir", str(tmp_path), "--verify_images")
    assert result.returncode == 0, result.stderr
    assert "train: 120 images, labels OK (the full voc train split has 10582)" in result.stdout
    assert "every image decodes" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line[:4].strip().isdigit()]
    assert [r[0] for r in rows[:6]] == ["0", "1", "2", "3", "4", "5"]
    assert "person" in result.stdout


def test_missing_data_folder(tmp_path):
    assert_user_error(run("-m", "datasets.check", "--data_root", str(tmp_path / "nothing")),
                      str(tmp_path / "nothing"), "VOC2012")


def test_missing_split_file(voc_copy):
    os.remove(os.path.join(voc_copy, voc.SPLIT_DIR, "val.txt"))
    assert_user_error(run("-m", "datasets.check", "--data_root", voc_copy), "val.txt")


def test_image_without_label(voc_copy):
    label = voc.list_split(voc_copy, "train")[4][2]
    os.remove(label)
    assert_user_error(run("-m", "datasets.check", "--data_root", voc_copy), "has no label", os.path.basename(label))


def test_corrupt_png(voc_copy):
    label = voc.list_split(voc_copy, "val")[1][2]
    with open(label, "r+b") as handle:
        handle.truncate(40)
    assert_user_error(run("-m", "datasets.check", "--data_root", voc_copy), "cannot decode label", label)


def test_corrupt_image(voc_copy):
    image = voc.list_split(voc_copy, "train")[0][1]
    with open(image, "wb") as handle:
        handle.write(b"not a jpeg")
    assert_user_error(run("-m", "datasets.check", "--data_root", voc_copy, "--verify_images", "--workers", "1"),
                      "cannot decode", image)


def test_label_values_out_of_range(voc_copy):
    label = voc.list_split(voc_copy, "train")[7][2]
    values = np.asarray(Image.open(label)).copy()
    values[1, 1] = 42
    Image.fromarray(values, mode="L").save(label)
    assert_user_error(run("-m", "datasets.check", "--data_root", voc_copy), "[42]", "0..20")


def test_unknown_task(synthetic_voc, tmp_path):
    assert_user_error(run("-m", "datasets.check", "--data_root", synthetic_voc, "--task", "15-x",
                          "--cache_dir", str(tmp_path)), "unknown voc task '15-x'", "15-1_b")


def test_unreadable_task_file(synthetic_voc, tmp_path):
    path = tmp_path / "order.json"
    path.write_text("[[0, 1], [2]")
    assert_user_error(run("-m", "datasets.check", "--data_root", synthetic_voc, "--task_file", str(path),
                          "--cache_dir", str(tmp_path)), "cannot read task file", str(path))


@pytest.mark.parametrize("args, fragment", [
    (["--n_train", "0"], "--n_train"),
])
def test_synthetic_bad_arguments(tmp_path, args, fragment):
    assert_user_error(run("-m", "datasets.synthetic", "--root", str(tmp_path / "x"), *args), fragment)
