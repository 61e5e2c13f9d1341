"""utils/tasks.py: the task table, class lists written out from BARM utils/tasks.py, MiB and PLOP tasks.py and
DKD data_loader/task.py; task files and step ranges."""
import json

import pytest

from utils.errors import UserError
from utils.tasks import check_step, classes_per_step, get_task, list_tasks, load_task_file, natural_task, task_name


def sizes(dataset, task):
    return [len(s) for s in get_task(dataset, task)]


@pytest.mark.parametrize("task, expected", [
    ("offline", [21]), ("joint", [21]), ("19-1", [20, 1]), ("19-1b", [20, 1]), ("15-5", [16, 5]),
    ("15-1", [16, 1, 1, 1, 1, 1]), ("15-5s", [16, 1, 1, 1, 1, 1]), ("10-1", [11] + [1] * 10),
    ("10-5", [11, 5, 5]), ("10-10", [11, 10]), ("10-5-5", [11, 5, 5]), ("5-5", [6, 5, 5, 5]),
    ("5-3", [6, 3, 3, 3, 3, 3]), ("5-1", [6] + [1] * 15), ("2-2", [3] + [2] * 9), ("2-1", [3] + [1] * 18),
])
def test_voc_step_sizes(task, expected):
    assert sizes("voc", task) == expected


@pytest.mark.parametrize("task, expected", [
    ("offline", [151]), ("joint", [151]), ("100-50", [101, 50]), ("100-10", [101] + [10] * 5),
    ("100-5", [101] + [5] * 10), ("50-50", [51, 50, 50]), ("50", [51, 50, 50]),
    ("50-20", [51, 20, 20, 20, 20, 20]), ("100-50b", [101, 50]), ("100-10b", [101] + [10] * 5),
    ("50b", [51, 50, 50]), ("100-50c", [101, 50]), ("100-10c", [101] + [10] * 5), ("50c", [51, 50, 50]),
])
def test_ade_step_sizes(task, expected):
    assert sizes("ade", task) == expected


def test_first_and_last_classes_of_natural_tasks():
    assert get_task("voc", "15-1")[0] == list(range(16))
    assert get_task("voc", "15-1")[1:] == [[16], [17], [18], [19], [20]]
    assert get_task("voc", "19-1") == [list(range(20)), [20]]
    assert get_task("voc", "5-3")[1] == [6, 7, 8] and get_task("voc", "5-3")[-1] == [18, 19, 20]
    assert get_task("voc", "2-2")[0] == [0, 1, 2] and get_task("voc", "2-2")[-1] == [19, 20]
    assert get_task("voc", "10-5")[1] == [11, 12, 13, 14, 15]
    assert get_task("ade", "100-10")[1] == list(range(101, 111))
    assert get_task("ade", "100-5")[-1] == [146, 147, 148, 149, 150]
    assert get_task("ade", "50-20")[3] == list(range(91, 111))
    assert get_task("ade", "50-50")[2][0] == 101 and get_task("ade", "50-50")[2][-1] == 150


def test_19_1b_moves_class_5_to_the_last_step():
    steps = get_task("voc", "19-1b")
    assert steps[1] == [5]
    assert 5 not in steps[0] and steps[0][0] == 0 and steps[0][-1] == 20


def test_shuffled_orders():
    b = get_task("voc", "15-1_b")
    assert b[0] == [0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11]
    assert b[1:] == [[17], [3], [6], [18], [10]]
    w = get_task("voc", "15-1_w")
    assert w[0] == [0, 1, 2, 12, 14, 13, 19, 18, 7, 11, 20, 8, 4, 9, 16, 10]
    assert w[1:] == [[3], [15], [6], [5], [17]]
    assert get_task("voc", "15-1_m")[1:] == [[5], [11], [20], [16], [19]]
    assert get_task("voc", "15-5s_k") == get_task("voc", "15-1_k")
    letters = [t for t in list_tasks("voc") if t.startswith("15-1_")]
    assert len(letters) == 22
    for name in letters:  # every shuffled order is a permutation of the 21 VOC classes
        assert sorted(c for s in get_task("voc", name) for c in s) == list(range(21))


def test_ade_b_and_c_orders_are_complements():
    b = get_task("ade", "100-50b")
    assert b[1][:4] == [2, 4, 7, 11] and b[1][-1] == 146
    assert sorted(b[0] + b[1]) == list(range(151)) and b[0] == sorted(b[0])
    assert get_task("ade", "100-10b")[0] == b[0]
    assert sorted(c for s in get_task("ade", "100-10b")[1:] for c in s) == b[1]
    fifty_b = get_task("ade", "50b")
    assert fifty_b[2] == b[1] and fifty_b[1][:3] == [3, 5, 6] and len(fifty_b[0]) == 51
    c = get_task("ade", "100-50c")
    assert c[1][:3] == [2, 3, 4] and sorted(c[0] + c[1]) == list(range(151))
    assert get_task("ade", "100-10c")[1] == [3, 4, 7, 18, 39, 64, 73, 101, 113, 137]
    assert get_task("ade", "50c")[1][:3] == [1, 6, 8]
    for name in ("100-10b", "50b", "100-10c", "50c"):
        assert sorted(x for s in get_task("ade", name) for x in s) == list(range(151))


def test_natural_names_and_remainder():
    assert get_task("voc", "15-2") == [list(range(16)), [16, 17], [18, 19], [20]]
    assert get_task("voc", "12-3") == [list(range(13)), [13, 14, 15], [16, 17, 18], [19, 20]]
    assert get_task("ade", "130-20") == [list(range(131)), list(range(131, 151))]
    assert get_task("voc", "10-4-6") == [list(range(11)), [11, 12, 13, 14], [15, 16, 17, 18, 19, 20]]
    assert natural_task("voc", "15-1_b") is None
    with pytest.raises(UserError, match="add up"):
        get_task("voc", "10-4-4")
    with pytest.raises(UserError, match="X-Y"):
        get_task("voc", "20-1")


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UserError) as err:
        get_task("voc", "fifteen")
    message = str(err.value)
    assert "15-1_b" in message and "19-1" in message and "X-Y" in message and "\n" not in message
    with pytest.raises(UserError, match=r"expected one of (\w+, )*ade, (\w+, )*voc"):
        get_task("cityscapes", "15-1")


def test_get_task_returns_fresh_lists():
    steps = get_task("voc", "15-1")
    steps[0].append(99)
    assert 99 not in get_task("voc", "15-1")[0]


def test_task_file_list_and_dict(tmp_path):
    as_list = tmp_path / "order.json"
    as_list.write_text(json.dumps([[0, 3, 1, 2], [5, 4], [6]]))
    assert get_task("voc", "ignored", task_file=str(as_list)) == [[0, 3, 1, 2], [5, 4], [6]]
    as_dict = tmp_path / "dict.json"
    as_dict.write_text(json.dumps({"1": [5, 4], "0": [0, 3, 1, 2]}))
    assert load_task_file("voc", str(as_dict)) == [[0, 3, 1, 2], [5, 4]]
    assert task_name("15-1", str(as_list)) == "order" and task_name("15-1") == "15-1"


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read task file"),
    (json.dumps([[1, 0], [2]]), "start with background"),
    (json.dumps([[0, 1], [1]]), "more than once"),
    (json.dumps([[0, 1], [21]]), "outside"),
    (json.dumps([[0, 1], []]), "non-empty"),
    (json.dumps({"0": [0, 1], "2": [2]}), "without gaps"),
    (json.dumps({"a": [0]}), "step numbers"),
])
def test_bad_task_files(tmp_path, content, message):
    path = tmp_path / "task.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_task_file("voc", str(path))


def test_missing_task_file(tmp_path):
    with pytest.raises(UserError, match="cannot read task file"):
        get_task("voc", "15-1", task_file=str(tmp_path / "none.json"))


def test_step_range_and_counts():
    steps = get_task("voc", "15-1")
    check_step(steps, 5)
    with pytest.raises(UserError, match="0..5"):
        check_step(steps, 6)
    with pytest.raises(UserError):
        check_step(steps, -1)
    assert classes_per_step(steps, 2) == [16, 1, 1]
    assert classes_per_step(get_task("ade", "100-10")) == [101, 10, 10, 10, 10, 10]


def test_every_named_task_resolves():
    for dataset in ("voc", "ade"):
        for name in list_tasks(dataset):
            steps = get_task(dataset, name)
            assert steps[0][0] == 0


# ---- a dataset of one's own: its number of classes is given (datasets.get_layout(...).NUM_CLASSES) ------------
def test_any_dataset_with_its_number_of_classes():
    assert get_task("custom", "4-2", num_classes=7) == [[0, 1, 2, 3, 4], [5, 6]]
    assert get_task("custom", "2-2", num_classes=7) == [[0, 1, 2], [3, 4], [5, 6]]
    assert get_task("custom", "3-1-2", num_classes=7) == [[0, 1, 2, 3], [4], [5, 6]]
    assert get_task("custom", "offline", num_classes=7) == [[0, 1, 2, 3, 4, 5, 6]]
    assert get_task("custom", "joint", num_classes=3) == [[0, 1, 2]]
    assert list_tasks("custom", num_classes=7) == ["joint", "offline"]


def test_any_dataset_needs_its_number_of_classes():
    with pytest.raises(UserError, match="unknown dataset 'custom'"):
        get_task("custom", "4-2")
    with pytest.raises(UserError, match="1 <= X < 6"):
        get_task("custom", "6-1", num_classes=7)
    with pytest.raises(UserError, match="expected at least 2"):
        get_task("custom", "offline", num_classes=1)
    with pytest.raises(UserError, match="unknown custom task '15-1b'"):
        get_task("custom", "15-1b", num_classes=7)


def test_task_file_of_any_dataset(tmp_path):
    path = tmp_path / "order.json"
    path.write_text(json.dumps([[0, 6, 1], [3, 2], [5, 4]]))
    assert get_task("custom", "ignored", task_file=str(path), num_classes=7) == [[0, 6, 1], [3, 2], [5, 4]]
    path.write_text(json.dumps([[0, 7]]))
    with pytest.raises(UserError, match="outside custom's 0..6"):
        load_task_file("custom", str(path), num_classes=7)
