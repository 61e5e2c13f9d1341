"""datasets/custom.py: the description (defaults, class order, label-id table against hand-written expectations),
the seeded split against an independent computation, labels read through the table (class index and label
lookup tables), the cache invalidated by an edited description, and every bad input as one line naming its file."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from datasets import check_data, custom, get_layout, label_values, split_class_index, step_samples
from datasets.incremental import IncrementalSegmentation, channel_order, label_lut
from datasets.synthetic import ID_STEP, SYNTHETIC_CLASSES, generate_custom
from utils.errors import UserError, one_line

IGNORE = 255


def write_folder(root, description, labels, sizes=None, image_ext=".png"):
    """A dataset folder: ``labels`` {id: uint8 array}, images of the same size (or ``sizes[id]``), and the
    description."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "labels"), exist_ok=True)
    for image_id, label in labels.items():
        height, width = (sizes or {}).get(image_id, label.shape)
        Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(
            os.path.join(root, "images", image_id + image_ext))
        Image.fromarray(np.asarray(label, dtype=np.uint8), mode="L").save(os.path.join(root, "labels", image_id + ".png"))
    write_description(root, description)
    return str(root)


def write_description(root, description):
    with open(os.path.join(root, custom.DESCRIPTION_FILE), "w", encoding="utf-8") as handle:
        json.dump(description, handle)


# label ids 0 (background), 5 ("sky"), 9 ("car"): classes listed out of id order, ignore value 200
HAND = {"name": "hand", "classes": [{"id": 5, "name": "sky"}, {"id": 0, "name": "ground"}, {"id": 9, "name": "car"}],
        "ignore_index": 200, "background": 0, "image_ext": ".png", "train_list": "train.txt", "val_list": "val.txt"}
HAND_LABELS = {
    "a": np.array([[0, 5], [9, 200]]),
    "b": np.array([[0, 0], [5, 5]]),
    "c": np.array([[9, 9], [9, 0]]),
}


@pytest.fixture
def hand(tmp_path):
    root = write_folder(tmp_path / "hand", HAND, HAND_LABELS)
    for split, ids in (("train", ["a", "b"]), ("val", ["c"])):
        with open(os.path.join(root, f"{split}.txt"), "w", encoding="utf-8") as handle:
            handle.write("\n".join(ids) + "\n")
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The synthetic dataset of one's own (7 classes, label ids 0, 10, ..., 60), read-only."""
    root = str(tmp_path_factory.mktemp("shapes") / "shapes")
    generate_custom(root, n_images=20, size=48, seed=3, workers=1)
    return root


@pytest.fixture
def shapes_copy(shapes, tmp_path):
    root = str(tmp_path / "shapes")
    shutil.copytree(shapes, root, ignore=shutil.ignore_patterns(".ciss_cache"))
    return root


# ---- the description -----------------------------------------------------------------------------------------
def test_defaults_fill_what_the_description_leaves_out():
    settings = custom.parse_description("d.json", {"classes": [{"id": 0, "name": "background"}, {"id": 1, "name": "x"}]})
    assert settings["classes"] == [(0, "background"), (1, "x")]
    assert (settings["ignore_index"], settings["background"], settings["images"], settings["labels"]) == (
        255, 0, "images", "labels")
    assert (settings["image_ext"], settings["label_ext"], settings["train_list"], settings["val_list"]) == (
        ".jpg", ".png", None, None)
    assert (settings["split_seed"], settings["val_fraction"]) == (0, 0.2)


def test_background_first_then_the_classes_as_listed(hand):
    layout = get_layout("custom", hand)
    assert layout.ORDER == [0, 5, 9]
    assert layout.CLASS_NAMES == ("ground", "sky", "car") and layout.NUM_CLASSES == 3
    expected = np.full(256, IGNORE, dtype=np.uint8)
    expected[0], expected[5], expected[9] = 0, 1, 2  # ignore 200 -> 255, like every undescribed value
    assert np.array_equal(layout.LABEL_MAP, expected)
    assert layout.LABEL_VALUES.allowed == (0, 5, 9, 200)


def test_without_background_class_0_is_reserved():
    order = custom.class_order([(3, "a"), (1, "b")], None)
    assert order == [None, 3, 1]
    table = custom.label_table(order, ignore_index=None)
    expected = np.full(256, IGNORE, dtype=np.uint8)
    expected[3], expected[1] = 1, 2
    assert np.array_equal(table, expected)


def test_layout_is_read_again_when_the_description_changes(hand):
    assert get_layout("custom", hand).CLASS_NAMES[1] == "sky"
    edited = {**HAND, "classes": [{"id": 5, "name": "cloud"}, *HAND["classes"][1:]]}
    write_description(hand, edited)
    os.utime(os.path.join(hand, custom.DESCRIPTION_FILE), ns=(1, 1))
    assert get_layout("custom", hand).CLASS_NAMES[1] == "cloud"


# ---- the seeded split -----------------------------------------------------------------------------------------
def test_seeded_split_matches_an_independent_computation():
    ids = [f"im{i:03d}" for i in range(23)]
    train, val = custom.seeded_split(ids, seed=4, val_fraction=0.3)
    # independently: rank by the integer value of SHA-256("4/<id>"), the first round(0.3 * 23) = 7 validate
    ranks = sorted(range(len(ids)), key=lambda i: int.from_bytes(hashlib.sha256(f"4/{ids[i]}".encode()).digest(),
                                                                  "big"))
    chosen = sorted(ranks[:7])
    assert val == [ids[i] for i in chosen]
    assert train == [ids[i] for i in range(len(ids)) if i not in chosen]
    assert custom.seeded_split(ids, seed=5, val_fraction=0.3)[1] != val


def test_seeded_split_keeps_one_image_on_each_side():
    assert [len(part) for part in custom.seeded_split(["a", "b"], 0, 0.99)] == [1, 1]
    assert [len(part) for part in custom.seeded_split(["a", "b", "c"], 0, 0.01)] == [2, 1]
    with pytest.raises(UserError, match="at least 2"):
        custom.seeded_split(["a"], 0, 0.5)


def test_a_folder_without_lists_is_split_by_the_seed(shapes):
    layout = get_layout("custom", shapes)
    ids = sorted(name[:-4] for name in os.listdir(os.path.join(shapes, "images")))
    train, val = custom.seeded_split(ids, 3, 0.2)
    assert [s[0] for s in layout.list_split(shapes, "train")] == train
    assert [s[0] for s in layout.list_split(shapes, "val")] == val and len(val) == 4


# ---- labels through the table ---------------------------------------------------------------------------------
def test_class_index_records_class_ids(hand, tmp_path):
    samples, index = split_class_index("custom", hand, "train", cache_dir=str(tmp_path / "cache"), workers=1)
    assert [s[0] for s in samples] == ["a", "b"]
    assert index.classes(0) == [0, 1, 2, IGNORE]  # a: 0, 5, 9, 200 -> 0, 1, 2, 255
    assert index.classes(1) == [0, 1]  # b: 0, 5


def test_label_lookup_table_goes_through_class_ids(hand):
    steps = [[0, 2], [1]]  # class 2 (car, label 9) at step 0, class 1 (sky, label 5) at step 1

    def channels(steps, step, split):
        return channel_order(steps)

    lut = label_lut(steps, 1, "test", channels, label_values("custom", hand))
    assert (lut[0], lut[9], lut[5], lut[200]) == (0, 1, 2, IGNORE)
    dataset = IncrementalSegmentation([("a", os.path.join(hand, "images", "a.png"),
                                        os.path.join(hand, "labels", "a.png"))], lut, lambda image, label: (image, label))
    _, label, _, _ = dataset[0]
    assert np.asarray(label).tolist() == [[0, 2], [1, IGNORE]]


def test_the_test_split_is_every_validation_image(hand, tmp_path):
    samples = step_samples("custom", hand, [[0, 1], [2]], 0, True, "test", cache_dir=str(tmp_path))
    assert [s[0] for s in samples] == ["c"]


def test_an_edited_description_rebuilds_the_index(hand, tmp_path):
    cache = str(tmp_path / "cache")
    check_data("custom", hand, cache)
    write_description(hand, {**HAND, "classes": HAND["classes"][:2]})  # label 9 no longer described
    with pytest.raises(UserError, match="labels.a.png holds values \\[9\\]"):
        check_data("custom", hand, cache)


# ---- bad inputs: one line naming the file ---------------------------------------------------------------------
def one_line_error(call):
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert one_line(message) == message, message
    return message


def test_label_value_outside_the_description(hand, tmp_path):
    Image.fromarray(np.array([[0, 7], [5, 5]], dtype=np.uint8), mode="L").save(os.path.join(hand, "labels", "b.png"))
    message = one_line_error(lambda: check_data("custom", hand, str(tmp_path)))
    assert os.path.join(hand, "labels", "b.png") in message and "[7]" in message
    assert custom.DESCRIPTION_FILE in message


def test_image_and_label_of_different_sizes(tmp_path):
    root = write_folder(tmp_path / "d", {**HAND, "train_list": None, "val_list": None}, HAND_LABELS, sizes={"b": (3, 2)})
    message = one_line_error(lambda: check_data("custom", root, str(tmp_path / "cache")))
    assert os.path.join(root, "images", "b.png") in message and "2x3" in message


def test_missing_label_file(hand, tmp_path):
    os.remove(os.path.join(hand, "labels", "c.png"))
    message = one_line_error(lambda: check_data("custom", hand, str(tmp_path)))
    assert os.path.join(hand, "labels", "c.png") in message


def test_listed_image_missing(hand, tmp_path):
    os.remove(os.path.join(hand, "images", "a.png"))
    message = one_line_error(lambda: check_data("custom", hand, str(tmp_path)))
    assert os.path.join(hand, "images", "a.png") in message


def test_missing_list_file(hand, tmp_path):
    os.remove(os.path.join(hand, "val.txt"))
    assert os.path.join(hand, "val.txt") in one_line_error(lambda: check_data("custom", hand, str(tmp_path)))


def test_missing_description(tmp_path):
    os.makedirs(tmp_path / "empty")
    message = one_line_error(lambda: get_layout("custom", str(tmp_path / "empty")))
    assert os.path.join(str(tmp_path / "empty"), custom.DESCRIPTION_FILE) in message


def test_unreadable_description(tmp_path):
    os.makedirs(tmp_path / "d")
    (tmp_path / "d" / custom.DESCRIPTION_FILE).write_text("{not json")
    assert custom.DESCRIPTION_FILE in one_line_error(lambda: get_layout("custom", str(tmp_path / "d")))


CLASSES = [{"id": 0, "name": "background"}, {"id": 3, "name": "car"}]
BAD = [
    ({"classes": CLASSES + [{"id": 4, "name": "car"}]}, "duplicate class names ['car']"),
    ({"classes": CLASSES + [{"id": 3, "name": "bus"}]}, "duplicate class ids [3]"),
    ({"classes": CLASSES, "ignore_index": 3}, '"ignore_index" 3 is also the id of class \'car\''),
    ({"classes": CLASSES, "background": 7}, '"background" is 7'),
    ({"classes": CLASSES, "background": None}, "a class is named 'background'"),
    ({"classes": CLASSES + [{"id": 256, "name": "x"}]}, "expected a label value 0..255"),
    ({"classes": CLASSES, "train_list": "train.txt"}, '"train_list" and "val_list" go together'),
    ({"classes": CLASSES, "val_fraction": 1}, '"val_fraction" is 1'),
    ({"classes": CLASSES, "split_seed": -1}, '"split_seed" is -1'),
    ({"classes": CLASSES, "colour": "red"}, "unknown keys ['colour']"),
    ({"classes": []}, '"classes" must be a non-empty list'),
    ({"classes": [{"id": 0}]}, "class entry"),
    ({"name": "x"}, 'no "classes"'),
]


@pytest.mark.parametrize("content, fragment", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_description(tmp_path, content, fragment):
    os.makedirs(tmp_path / "d")
    write_description(str(tmp_path / "d"), content)
    message = one_line_error(lambda: get_layout("custom", str(tmp_path / "d")))
    assert message.startswith(os.path.join(str(tmp_path / "d"), custom.DESCRIPTION_FILE)) and fragment in message


def test_unknown_dataset_folder_needs_data_root():
    assert "--data_root" in one_line_error(lambda: get_layout("custom"))


# ---- the synthetic dataset of one's own -----------------------------------------------------------------------
def test_synthetic_dataset_is_described_and_deterministic(shapes, tmp_path):
    again = str(tmp_path / "again")
    generate_custom(again, n_images=20, size=48, seed=3, workers=2)
    layout = get_layout("custom", shapes)
    assert layout.CLASS_NAMES == SYNTHETIC_CLASSES and layout.ORDER == [k * ID_STEP for k in range(7)]
    described = set(layout.LABEL_VALUES.allowed)
    for name in sorted(os.listdir(os.path.join(shapes, "labels"))):
        first = np.asarray(Image.open(os.path.join(shapes, "labels", name)))
        assert np.array_equal(first, np.asarray(Image.open(os.path.join(again, "labels", name))))
        assert set(np.unique(first).tolist()) <= described


def test_synthetic_lists_are_the_seeded_split(tmp_path):
    root = str(tmp_path / "listed")
    ids = generate_custom(root, n_images=10, size=40, seed=1, lists=True, workers=1)
    layout = get_layout("custom", root)
    assert [s[0] for s in layout.list_split(root, "val")] == ids["val"]
    assert layout.settings["train_list"] == "train.txt"


def test_no_background_description(shapes_copy):
    with open(custom.description_path(shapes_copy), encoding="utf-8") as handle:
        description = json.load(handle)
    description.update(background=None, classes=[{**c, "name": "grass"} if c["id"] == 0 else c
                                                 for c in description["classes"]])
    write_description(shapes_copy, description)
    layout = get_layout("custom", shapes_copy)
    assert layout.NUM_CLASSES == 8 and layout.CLASS_NAMES[:2] == (custom.BACKGROUND_NAME, "grass")
    assert layout.LABEL_MAP[0] == 1 and layout.LABEL_MAP[60] == 7 and layout.ORDER[0] is None



def test_synthetic_command_writes_a_checkable_folder(tmp_path, capsys):
    from datasets.synthetic import main
    root = str(tmp_path / "cli")
    main(["--dataset", "custom", "--root", root, "--n_train", "6", "--n_val", "2", "--size", "40", "--workers", "1",
          "--classes", "sea,ship,gull", "--no_background", "--lists"])
    assert "wrote a synthetic dataset of 3 classes" in capsys.readouterr().out
    layout = get_layout("custom", root)
    assert layout.CLASS_NAMES == (custom.BACKGROUND_NAME, "sea", "ship", "gull") and layout.ORDER[0] is None
    assert [len(layout.list_split(root, split)) for split in ("train", "val")] == [6, 2]
    check_data("custom", root, str(tmp_path / "cache"))
