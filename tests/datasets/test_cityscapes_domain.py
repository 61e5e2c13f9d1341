"""Cityscapes domain-incremental data (PLOP dataset/cityscapes_domain.py::CityscapesSegmentationDomain, run.py::
get_dataset, tasks.py): the pool, the per-step splits and test sets on a tree with the public per-city image counts
(empty files: only the listing matters), the label map and the geometry of the transforms, each against values
written out here or computed independently of ciss's code."""
import math
import os
import random

import numpy as np
import pytest
from PIL import Image

from datasets import cityscapes_domain, step_image_ids, step_samples
from datasets.incremental import label_lut, open_label
from datasets.transforms import eval_transform, resized_crop_box
from methods import get_method
from utils.errors import UserError
from utils.tasks import DOMAIN_CLASSES, DOMAIN_COUNTS, get_domains, get_task, list_tasks

DATASET = "cityscapes_domain"
# the public gtFine per-city image counts, by domain id (PLOP dataset/cityscapes_domain.py::city_to_id)
CITY_IDS = {"aachen": 0, "bremen": 1, "darmstadt": 2, "erfurt": 3, "hanover": 4, "krefeld": 5, "strasbourg": 6,
            "tubingen": 7, "weimar": 8, "bochum": 9, "cologne": 10, "dusseldorf": 11, "hamburg": 12, "jena": 13,
            "monchengladbach": 14, "stuttgart": 15, "ulm": 16, "zurich": 17, "frankfurt": 18, "lindau": 19,
            "munster": 20}
COUNTS = {"aachen": 174, "bremen": 316, "darmstadt": 85, "erfurt": 109, "hanover": 196, "krefeld": 99,
          "strasbourg": 365, "tubingen": 144, "weimar": 142, "bochum": 96, "cologne": 154, "dusseldorf": 221,
          "hamburg": 248, "jena": 119, "monchengladbach": 94, "stuttgart": 196, "ulm": 95, "zurich": 122,
          "frankfurt": 267, "lindau": 59, "munster": 174}
VAL_CITIES = ("frankfurt", "lindau", "munster")
# the official cityscapesScripts labelIds -> trainIds table (labels.py), written out
OFFICIAL_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                      26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# train / val / test sizes per step (the spec's simulation with the public counts)
SIZES_11_5 = [(1504, 376, 376), (702, 176, 552), (573, 144, 695)]
TRAIN_11_1 = [1504, 176, 198, 95, 75, 156, 76, 97, 213, 47, 139]
TEST_11_1 = [376, 421, 470, 494, 513, 552, 571, 595, 649, 661, 695]
# images of the last step's reference test set that some step of the task trained on
LEAKS = {"11-5": 496, "11-1": 501, "1-1": 541}


@pytest.fixture(scope="module")
def public_tree(tmp_path_factory):
    """Empty image and label files named as Cityscapes', with the public per-city counts."""
    root = tmp_path_factory.mktemp("cityscapes_public")
    for city, count in COUNTS.items():
        split = "val" if city in VAL_CITIES else "train"
        images = root / "leftImg8bit" / split / city
        labels = root / "gtFine" / split / city
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for j in range(count):
            (images / f"{city}_000000_{j:06d}_leftImg8bit.png").touch()
            (labels / f"{city}_000000_{j:06d}_gtFine_labelIds.png").touch()
    return str(root)


def expected_pool():
    """(city, frame) in the reference's order: sorted train paths (cities alphabetical), then sorted val paths."""
    train = sorted(c for c in COUNTS if c not in VAL_CITIES)
    return [(c, j) for c in train for j in range(COUNTS[c])] + [(c, j) for c in VAL_CITIES for j in range(COUNTS[c])]


def ids(tree, task, step, split, **kwargs):
    return step_image_ids(DATASET, tree, task, step, overlap=True, split=split, **kwargs)


def pool_positions(tree):
    return {f"{c}_000000_{j:06d}": i for i, (c, j) in enumerate(expected_pool())}


# ---- 1. the pool --------------------------------------------------------------------------------------------
def test_pool_order_and_domains(public_tree):
    pool = cityscapes_domain.list_pool(public_tree)
    expected = expected_pool()
    assert len(pool) == 3475
    assert [entry[0] for entry in pool] == [f"{c}_000000_{j:06d}" for c, j in expected]
    assert [entry[3] for entry in pool] == [CITY_IDS[c] for c, _ in expected]
    assert pool[0][0] == "aachen_000000_000000" and expected[174][0] == "bochum"
    assert pool[0][2].endswith(os.path.join("gtFine", "train", "aachen", "aachen_000000_000000_gtFine_labelIds.png"))
    assert [c for c, _ in expected[-3:]] == ["munster"] * 3


# ---- 3. the seeded shuffle ------------------------------------------------------------------------------------
def test_numpy_legacy_shuffle_vectors():
    """The generator the reference shuffles with: fresh RandomState(1), in-place shuffle of a list."""
    ten, twenty = list(range(10)), list(range(20))
    np.random.RandomState(1).shuffle(ten)
    np.random.RandomState(1).shuffle(twenty)
    assert ten == [2, 9, 6, 4, 0, 3, 1, 7, 8, 5]
    assert twenty == [3, 16, 6, 10, 2, 14, 4, 17, 7, 1, 13, 0, 19, 18, 9, 15, 8, 12, 11, 5]


def test_shuffled_pool_indices(public_tree):
    positions = pool_positions(public_tree)
    train = [positions[i] for i in ids(public_tree, "11-5", 0, "train")]
    held_out = [positions[i] for i in ids(public_tree, "11-5", 0, "val")]
    assert train[:8] == [2029, 2839, 1108, 650, 102, 1807, 1753, 282]
    assert held_out[-5:] == [1126, 2764, 1565, 235, 1530]
    assert [positions[i] for i in ids(public_tree, "1-1", 0, "train")][:8] == [93, 114, 19, 69, 53, 135, 126, 14]


def test_train_fraction_is_four_fifths():
    assert all(int(0.8 * n) == 4 * n // 5 for n in range(100_000))


# ---- 2. sizes of every step ------------------------------------------------------------------------------------
def sizes(tree, task, step):
    return tuple(len(ids(tree, task, step, split)) for split in ("train", "val", "test"))


def test_sizes_11_5(public_tree):
    assert [sizes(public_tree, "11-5", t) for t in range(3)] == SIZES_11_5


def test_sizes_11_1(public_tree):
    train = [len(ids(public_tree, "11-1", t, "train")) for t in range(11)]
    test = [len(ids(public_tree, "11-1", t, "test")) for t in range(11)]
    assert train == TRAIN_11_1 and test == TEST_11_1
    assert sizes(public_tree, "11-1", 0) == SIZES_11_5[0]


def test_sizes_1_1(public_tree):
    assert sizes(public_tree, "1-1", 0) == (139, 35, 35)
    assert sizes(public_tree, "1-1", 20) == (139, 35, 695)
    for t, city in enumerate(CITY_IDS):
        n = COUNTS[city]
        assert len(ids(public_tree, "1-1", t, "train")) == 4 * n // 5, city


# ---- 5. invariants: the test sets --------------------------------------------------------------------------------
def test_step0_test_is_step0_val_and_final_test_is_shared(public_tree):
    for task in ("11-5", "11-1", "1-1"):
        assert ids(public_tree, task, 0, "test") == ids(public_tree, task, 0, "val")
        assert ids(public_tree, task, 0, "test_seen") == ids(public_tree, task, 0, "test")
    finals = [set(ids(public_tree, task, len(get_domains(DATASET, task)) - 1, "test")) for task in ("11-5", "11-1",
                                                                                                      "1-1")]
    assert finals[0] == finals[1] == finals[2] and len(finals[0]) == 695


@pytest.mark.parametrize("task", ["11-5", "11-1", "1-1"])
def test_reference_test_leaks_training_images_and_held_out_test_does_not(public_tree, task):
    last = len(get_domains(DATASET, task)) - 1
    trained = {i for t in range(last + 1) for i in ids(public_tree, task, t, "train")}
    assert len(set(ids(public_tree, task, last, "test")) & trained) == LEAKS[task]
    held_out = ids(public_tree, task, last, "test", held_out_test=True)
    assert not set(held_out) & trained
    assert held_out == [i for t in range(last + 1) for i in ids(public_tree, task, t, "val")]


# ---- tasks ----------------------------------------------------------------------------------------------------
def test_task_table():
    assert list_tasks(DATASET) == ["1-1", "11-1", "11-5", "offline"]
    assert get_domains(DATASET, "11-5") == [list(range(11)), list(range(11, 16)), list(range(16, 21))]
    assert get_domains(DATASET, "11-1") == [list(range(11))] + [[d] for d in range(11, 21)]
    assert get_domains(DATASET, "1-1") == [[d] for d in range(21)]
    assert get_domains(DATASET, "offline") == [list(range(21))]
    # one classifier over the 19 classes: every class at step 0, none added later
    assert get_task(DATASET, "11-5") == [list(range(19)), [], []]
    assert get_domains("voc", "15-1") is None
    with pytest.raises(UserError, match="unknown cityscapes_domain task '15-1'"):
        get_domains(DATASET, "15-1")
    with pytest.raises(UserError, match="adds domains"):
        get_task(DATASET, "11-5", task_file="order.json")


def test_cities_and_counts_match_the_reference_ids():
    assert {city: i for i, city in enumerate(cityscapes_domain.CITIES)} == CITY_IDS
    assert cityscapes_domain.CITY_COUNTS == COUNTS


# ---- 6. the label map ----------------------------------------------------------------------------------------------
def test_label_map_against_the_official_table(tmp_path):
    raw = np.array([list(range(34)) + [255]], dtype=np.uint8)
    table = cityscapes_domain.label_table()
    mapped = table[raw][0]
    expected = [OFFICIAL_TRAIN_IDS.get(v, 255) for v in range(34)] + [255]
    assert mapped.tolist() == expected
    assert sorted(OFFICIAL_TRAIN_IDS.values()) == list(range(19))
    # through a label file and a method's label policy (the same at every step and split)
    path = tmp_path / "x_gtFine_labelIds.png"
    Image.fromarray(raw).save(path)
    steps = get_task(DATASET, "11-5")
    for method in ("ft", "plop"):
        policy = get_method(method, dataset=DATASET).label_policy
        for step, split in ((0, "train"), (1, "train"), (2, "val"), (2, "test")):
            lut = label_lut(steps, step, split, policy)
            assert np.asarray(open_label(str(path), lut))[0].tolist() == expected


# ---- 8, 9. geometry ---------------------------------------------------------------------------------------------------
def test_random_resized_crop_on_cityscapes_mostly_falls_back():
    """Box accepted iff s <= r/2 (s ~ U(0.5, 2) the area fraction, ln r ~ U(ln 3/4, ln 4/3)), so one try succeeds with
    p = (e^a - 1 - a) / (3 * 2a), a = ln(4/3), and 10 tries all fail with (1 - p)^10 ≈ 0.765."""
    a = math.log(4 / 3)
    p = (math.exp(a) - 1 - a) / (3 * 2 * a)
    expected = (1 - p) ** 10
    random.seed(0)
    draws = 20000
    boxes = [resized_crop_box(2048, 1024) for _ in range(draws)]
    fallback = (0, 341, 1024, 1365)  # (top, left, h, w): centred 1365 x 1024 box
    rate = sum(box == fallback for box in boxes) / draws
    assert abs(rate - expected) < 0.015 and abs(expected - 0.765) < 0.002


def test_eval_transform_scores_the_centre_of_the_half_resolution_image():
    """Resize(512) of 2048 x 1024 gives 1024 x 512 and CenterCrop(512) keeps original columns [512, 1536)."""
    columns = (np.arange(2048) // 16).astype(np.uint8)
    label = Image.fromarray(np.tile(columns, (1024, 1)))
    image = Image.new("RGB", (2048, 1024))
    _, out = eval_transform(512, True)(image, label)
    out = np.asarray(out)
    assert out.shape == (512, 512)
    assert out[0, 0] == 512 // 16 and out[0, -1] == 1535 // 16


# ---- errors ---------------------------------------------------------------------------------------------------------
def test_unknown_city_and_missing_label_are_user_errors(tmp_path):
    (tmp_path / "leftImg8bit" / "train" / "paris").mkdir(parents=True)
    (tmp_path / "gtFine" / "train").mkdir(parents=True)
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    (tmp_path / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(UserError, match="unknown city 'paris'"):
        cityscapes_domain.list_pool(str(tmp_path))
    os.rmdir(tmp_path / "leftImg8bit" / "train" / "paris")
    (tmp_path / "leftImg8bit" / "train" / "ulm").mkdir()
    (tmp_path / "leftImg8bit" / "train" / "ulm" / "ulm_000000_000001_leftImg8bit.png").touch()
    with pytest.raises(UserError, match="has no label: expected .*ulm_000000_000001_gtFine_labelIds.png"):
        cityscapes_domain.list_pool(str(tmp_path))
    with pytest.raises(UserError, match="not a directory"):
        cityscapes_domain.list_pool(str(tmp_path / "nowhere"))


def test_step_samples_need_the_domains(public_tree):
    with pytest.raises(ValueError, match="domains"):
        step_samples(DATASET, public_tree, get_task(DATASET, "11-5"), 0, True, "train")


def test_the_task_tables_counts_are_the_layouts():
    """utils/tasks.py may not import the datasets (it is the floor below): its class and domain counts of
    cityscapes_domain must be the layout's (19 train ids, 21 cities)."""
    assert DOMAIN_CLASSES[DATASET] == cityscapes_domain.NUM_CLASSES == 19
    assert DOMAIN_COUNTS[DATASET] == len(cityscapes_domain.CITIES) == 21
