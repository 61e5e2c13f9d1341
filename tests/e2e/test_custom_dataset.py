"""End to end on a dataset of one's own (``--dataset custom``): a synthetic folder with 7 classes of its own names
and non-contiguous label ids, task 4-2, BARM and MiB, overlap and disjoint, on CPU with resnet18 (49-pixel crops,
one epoch). ``--test`` on the saved checkpoints gives every step's metrics exactly, the results and the report name
the user's classes, and a bad label stops the run before its first step with one line naming the file. A dataset
without background (channel 0 reserved) runs MiB and SSUL, and its results give the means without channel 0."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import train
from datasets.synthetic import SYNTHETIC_CLASSES, generate_custom
from engine.cli import parse_args
from reports.runs import load_run
from reports.tables import write_report
from utils.errors import USER_ERROR_EXIT_CODE

TASK = "4-2"
CROP = "49"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """One generated dataset for the module: 20 images (16 train, 4 val by the seeded split)."""
    root = str(tmp_path_factory.mktemp("custom") / "shapes")
    generate_custom(root, n_images=20, size=48, seed=5, workers=1)
    return root


def argv(data_root, ckpt, method, setting, *extra):
    return ["--data_root", data_root, "--ckpt_dir", str(ckpt), "--method", method, "--dataset", "custom",
            "--task", TASK, *(["--overlap"] if setting == "overlap" else []), "--backbone", "resnet18",
            "--no_pretrained", "--crop_size", CROP, "--batch_size", "4", "--num_workers", "0", "--crop_val",
            "--val_batch_size", "8", "--lr_policy", "poly", "--lr", "0.01", "--train_epoch", "1",
            "--val_interval", "0", "--clean", "--device", "cpu", *extra]


def results(ckpt, method, setting, step, evaluated=False):
    parts = ("eval", f"crop{CROP}") if evaluated else ()
    path = os.path.join(str(ckpt), method, TASK, setting, *parts, f"step{step}", "results.json")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def runs(shapes, tmp_path_factory):
    """BARM and MiB, overlap and disjoint, both steps, then ``--test`` of each."""
    ckpt = tmp_path_factory.mktemp("custom_runs")
    for method in ("barm", "mib"):
        for setting in ("overlap", "disjoint"):
            train.run(parse_args(argv(shapes, ckpt, method, setting)))
            train.run(parse_args(argv(shapes, ckpt, method, setting, "--test")))
    return ckpt


@pytest.mark.parametrize("method", ["barm", "mib"])
@pytest.mark.parametrize("setting", ["overlap", "disjoint"])
def test_test_reproduces_every_step_and_names_the_classes(runs, method, setting):
    for step, channels in ((0, 5), (1, 7)):
        trained, tested = results(runs, method, setting, step), results(runs, method, setting, step, evaluated=True)
        assert trained["dataset"] == "custom" and trained["classes"] == [[0, 1, 2, 3, 4], [5, 6]][:step + 1]
        assert trained["class_names"] == list(SYNTHETIC_CLASSES[:channels])
        assert tested["confusion_matrix"] == trained["confusion_matrix"], (method, setting, step)
        assert tested["summary"] == trained["summary"] and tested["Class IoU"] == trained["Class IoU"]


def test_report_names_the_users_classes(runs, tmp_path):
    folders = [os.path.join(str(runs), method, TASK, "overlap") for method in ("barm", "mib")]
    written = write_report([load_run(f) for f in folders], str(tmp_path / "report"), allow_mixed=True, plots=False)
    with open(written["report.md"] if "report.md" in written else os.path.join(str(tmp_path / "report"), "report.md"),
              encoding="utf-8") as handle:
        report = handle.read()
    for name in SYNTHETIC_CLASSES[1:]:
        assert name in report, name


def test_bad_label_stops_before_the_first_step(shapes, tmp_path, capsys):
    root = str(tmp_path / "bad")
    shutil.copytree(shapes, root, ignore=shutil.ignore_patterns(".ciss_cache"))
    label = os.path.join(root, "labels", sorted(os.listdir(os.path.join(root, "labels")))[-1])
    values = np.asarray(Image.open(label)).copy()
    values[0, 0] = 77
    Image.fromarray(values, mode="L").save(label)
    with pytest.raises(SystemExit) as caught:
        train.main(argv(root, tmp_path / "ckpt", "barm", "overlap"))
    assert caught.value.code == USER_ERROR_EXIT_CODE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: label ") and label in lines[0], lines
    assert "[77]" in lines[0] and "dataset.json" in lines[0]
    assert not os.path.exists(tmp_path / "ckpt" / "barm" / TASK / "overlap" / "step0")


# ---- a dataset without background: channel 0 is reserved, no pixel is labelled with it ---------------------------
NO_BG_CLASSES = SYNTHETIC_CLASSES[1:]  # six classes of their own, none of them a background


@pytest.fixture(scope="module")
def no_background_runs(tmp_path_factory):
    """MiB and SSUL (its unknown class) on a dataset with ``"background": null``: classes 1..6, task 4-2 (step 0:
    the reserved channel 0 and classes 1-4, step 1: classes 5-6), both steps, then ``--test``."""
    root = str(tmp_path_factory.mktemp("custom_nobg") / "shapes")
    generate_custom(root, n_images=20, size=48, seed=6, class_names=NO_BG_CLASSES, background=False, workers=1)
    ckpt = tmp_path_factory.mktemp("custom_nobg_runs")
    for method in ("mib", "ssul"):
        train.run(parse_args(argv(root, ckpt, method, "overlap")))
        train.run(parse_args(argv(root, ckpt, method, "overlap", "--test")))
    return ckpt


@pytest.mark.parametrize("method", ["mib", "ssul"])
def test_no_background_dataset_runs_and_leaves_the_reserved_channel_out(no_background_runs, method):
    for step, channels in ((0, 5), (1, 7)):
        trained = results(no_background_runs, method, "overlap", step)
        tested = results(no_background_runs, method, "overlap", step, evaluated=True)
        assert trained["class_names"] == ["background", *NO_BG_CLASSES[:channels - 1]]
        assert tested["confusion_matrix"] == trained["confusion_matrix"] and tested["summary"] == trained["summary"]
        # no ground-truth pixel in the reserved channel (the four validation images need not hold every class)
        confusion = np.asarray(trained["confusion_matrix"], dtype=np.float64)
        assert confusion.shape == (channels, channels) and confusion[0].sum() == 0 and confusion[1:].sum() > 0
        # the means without channel 0, from the confusion matrix by the IoU's definition, in the run's convention
        # (MiB's and SSUL's: a class without ground truth is left out; BARM's: it counts as 0)
        skip_absent = trained["convention"]["exclude_absent"]
        union = [confusion[c].sum() + confusion[:, c].sum() - confusion[c, c] for c in range(channels)]
        iou = [None if skip_absent and not confusion[c].sum() else confusion[c, c] / union[c] if union[c] else 0.0
               for c in range(channels)]

        def mean(values):
            return float(np.mean([v for v in values if v is not None]))

        summary = trained["summary"]
        assert summary["mIoU_nobg"] == pytest.approx(mean(iou[1:]), abs=1e-6)
        assert summary["mIoU_old_nobg"] == pytest.approx(mean(iou[1:5]), abs=1e-6)
        if step == 1:
            old, new = mean(iou[1:5]), mean(iou[5:])
            assert summary["mIoU_new"] == pytest.approx(new, abs=1e-6)
            assert summary["hIoU_nobg"] == pytest.approx(2 * old * new / (old + new) if old + new else 0.0, abs=1e-6)


# ---- every other class-incremental method, with ciss's generic defaults ------------------------------------------
OTHER_METHODS = {"kproba": (), "ssul": (), "ssul-m": ("--mem_size", "2"), "dkd": (), "dkd-m": ("--mem_size", "2"),
                 "rcil": (), "plop": (), "ft": (), "lwf": (), "lwf-mc": (), "ilt": (), "ewc": (), "pi": (), "rw": ()}


@pytest.mark.parametrize("name", sorted(OTHER_METHODS))
def test_every_method_runs_on_a_dataset_of_ones_own(shapes, tmp_path, name):
    """Steps 0 and 1 of 4-2 (overlap) with the method's generic defaults for a dataset no reference ran, then
    ``--test`` gives both steps' confusion matrices exactly."""
    method = name.removesuffix("-m") if name in ("ssul-m", "dkd-m") else name
    extra = (*OTHER_METHODS[name], "--subpath", name)
    train.run(parse_args(argv(shapes, tmp_path, method, "overlap", *extra)))
    train.run(parse_args(argv(shapes, tmp_path, method, "overlap", *extra, "--test")))
    for step, channels in ((0, 5), (1, 7)):
        trained = results(tmp_path, name, "overlap", step)
        tested = results(tmp_path, name, "overlap", step, evaluated=True)
        assert trained["method"] == method and trained["class_names"] == list(SYNTHETIC_CLASSES[:channels])
        assert len(trained["confusion_matrix"]) == channels
        assert tested["confusion_matrix"] == trained["confusion_matrix"], name
