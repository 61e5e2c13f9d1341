"""The task table: which classes each incremental step introduces (BARM utils/tasks.py, MiB tasks.py).

A task is a list of steps; each step is a list of dataset class ids. Step 0 starts with background 0, and
the concatenation of the steps is the model's channel order. Every task of the reference repositories is
listed by name (with the names the other repositories use as aliases); any other ``"X-Y"`` name resolves
to the natural order (see :func:`natural_task`), and a JSON file can define any custom order
(:func:`load_task_file`).

A dataset other than VOC and ADE (a dataset of the user's own, described by its data folder) has no named
tasks but "offline"; its number of classes is not known here (this module does not read data folders): the
caller passes it as ``num_classes`` (``datasets.get_layout(dataset, data_root).NUM_CLASSES``).
"""
import json
import os
import re

from utils.errors import UserError

NUM_CLASSES = {"voc": 21, "ade": 151}  # background / ADE "other" (0) included

# Domain-incremental datasets: every step trains and scores the same classes; a task adds domains (PLOP/RCIL
# tasks.py, "cityscapes_domain"). Their class table is one step holding every class, later steps adding none.
DOMAIN_CLASSES = {"cityscapes_domain": 19}  # Cityscapes train ids 0..18, no background class
DOMAIN_COUNTS = {"cityscapes_domain": 21}  # cities, ids of PLOP dataset/cityscapes_domain.py::city_to_id


def _span(first, last):
    """Inclusive range of class ids, as the reference code's ``range(first, last + 1)``."""
    return list(range(first, last + 1))


def _chunks(first, last, size):
    return [_span(s, min(s + size - 1, last)) for s in range(first, last + 1, size)]


def _with_base(new_steps, num_classes):
    """Step 0 = every class (with background) not introduced later, ascending; then ``new_steps``."""
    later = {c for step in new_steps for c in step}
    return [[c for c in range(num_classes) if c not in later]] + [list(step) for step in new_steps]


# The 22 shuffled 15-1 orders of SSUL/BARM/DKD (PLOP calls them 15-5s_b ... 15-5s_w): step-0 classes in
# channel order (background 0 prepended below), then the five classes added one per step.
_SHUFFLED_15_1 = {
    "b": ([12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11], [17, 3, 6, 18, 10]),
    "c": ([13, 19, 15, 17, 9, 8, 5, 20, 4, 3, 10, 11, 18, 16, 7], [12, 14, 6, 1, 2]),
    "d": ([15, 3, 2, 12, 14, 18, 20, 16, 11, 1, 19, 8, 10, 7, 17], [6, 5, 13, 9, 4]),
    "e": ([7, 5, 3, 9, 13, 12, 14, 19, 10, 2, 1, 4, 16, 8, 17], [15, 18, 6, 11, 20]),
    "f": ([7, 13, 5, 11, 9, 2, 15, 12, 14, 3, 20, 1, 16, 4, 18], [8, 6, 10, 19, 17]),
    "g": ([7, 5, 9, 1, 15, 18, 14, 3, 20, 10, 4, 19, 11, 17, 16], [12, 8, 6, 2, 13]),
    "h": ([12, 9, 19, 6, 4, 10, 5, 18, 14, 15, 16, 3, 8, 7, 11], [13, 2, 20, 17, 1]),
    "i": ([13, 10, 15, 8, 7, 19, 4, 3, 16, 12, 14, 11, 5, 20, 6], [2, 18, 9, 17, 1]),
    "j": ([1, 14, 9, 5, 2, 15, 8, 20, 6, 16, 18, 7, 11, 10, 19], [3, 4, 17, 12, 13]),
    "k": ([16, 13, 1, 11, 12, 18, 6, 14, 5, 3, 7, 9, 20, 19, 15], [4, 2, 10, 8, 17]),
    "l": ([10, 7, 6, 19, 16, 8, 17, 1, 14, 4, 9, 3, 15, 11, 12], [2, 18, 20, 13, 5]),
    "m": ([18, 4, 14, 17, 12, 10, 7, 3, 9, 1, 8, 15, 6, 13, 2], [5, 11, 20, 16, 19]),
    "n": ([5, 4, 13, 18, 14, 10, 19, 15, 7, 9, 3, 2, 8, 16, 20], [1, 12, 11, 6, 17]),
    "o": ([9, 12, 13, 18, 7, 1, 15, 17, 10, 8, 4, 5, 20, 16, 6], [14, 19, 11, 2, 3]),
    "p": ([9, 12, 13, 18, 2, 11, 15, 17, 10, 8, 4, 5, 20, 16, 6], [14, 19, 1, 7, 3]),
    "q": ([3, 14, 13, 18, 2, 11, 15, 17, 10, 8, 4, 5, 20, 16, 6], [12, 19, 1, 7, 9]),
    "r": ([3, 14, 13, 1, 2, 11, 15, 17, 7, 8, 4, 5, 9, 16, 19], [12, 6, 18, 10, 20]),
    "s": ([3, 14, 6, 1, 2, 11, 12, 17, 7, 20, 4, 5, 9, 16, 19], [15, 13, 18, 10, 8]),
    "t": ([3, 15, 13, 1, 2, 11, 18, 17, 7, 20, 8, 5, 9, 16, 19], [14, 6, 12, 10, 4]),
    "u": ([3, 15, 13, 14, 6, 11, 18, 17, 7, 20, 8, 4, 9, 16, 10], [1, 2, 12, 19, 5]),
    "v": ([1, 2, 12, 14, 6, 19, 18, 17, 5, 20, 8, 4, 9, 16, 10], [3, 15, 13, 11, 7]),
    "w": ([1, 2, 12, 14, 13, 19, 18, 7, 11, 20, 8, 4, 9, 16, 10], [3, 15, 6, 5, 17]),
}

# ADE orders "b" and "c" of MiB (MiB tasks.py): the classes added after the base step; the base step is
# the complement (with 0), ascending.
_ADE_100_50B_NEW = [2, 4, 7, 11, 15, 16, 17, 20, 30, 35, 37, 41, 50, 51, 52, 59, 64, 65, 66, 67, 68, 72, 73,
                    78, 79, 83, 85, 88, 89, 92, 94, 97, 98, 102, 108, 110, 111, 112, 114, 115, 118, 122, 124,
                    127, 137, 138, 139, 141, 145, 146]
_ADE_100_10B_NEW = [[11, 16, 50, 64, 66, 73, 89, 92, 145, 146], [30, 37, 51, 52, 72, 85, 98, 114, 115, 138],
                    [2, 35, 65, 97, 110, 111, 112, 118, 124, 141], [4, 7, 15, 41, 67, 78, 79, 88, 108, 139],
                    [17, 20, 59, 68, 83, 94, 102, 122, 127, 137]]
_ADE_50B_STEP1 = [3, 5, 6, 8, 10, 12, 13, 19, 21, 23, 26, 31, 33, 34, 36, 39, 40, 43, 44, 53, 55, 57, 60, 70,
                  71, 80, 86, 87, 91, 95, 99, 101, 105, 106, 107, 113, 116, 120, 125, 126, 131, 132, 133, 140,
                  142, 143, 147, 148, 149, 150]
_ADE_100_50C_NEW = [2, 3, 4, 7, 15, 18, 21, 22, 38, 39, 42, 47, 49, 51, 53, 55, 58, 59, 60, 62, 64, 72, 73,
                    75, 80, 88, 89, 91, 92, 93, 100, 101, 103, 104, 107, 108, 113, 116, 117, 122, 125, 127,
                    130, 131, 137, 140, 141, 145, 148, 150]
_ADE_100_10C_NEW = [[3, 4, 7, 18, 39, 64, 73, 101, 113, 137], [47, 51, 55, 60, 62, 80, 116, 127, 140, 148],
                    [22, 42, 49, 58, 59, 89, 91, 92, 108, 125], [2, 38, 53, 100, 104, 117, 130, 131, 141, 145],
                    [15, 21, 72, 75, 88, 93, 103, 107, 122, 150]]
_ADE_50C_STEP1 = [1, 6, 8, 9, 14, 24, 25, 26, 29, 34, 35, 36, 40, 41, 44, 45, 48, 50, 54, 61, 63, 67, 68, 71,
                  78, 81, 84, 85, 90, 94, 95, 96, 97, 98, 99, 102, 106, 112, 114, 115, 118, 120, 121, 123, 124,
                  126, 135, 136, 139, 149]


def _voc_tasks():
    tasks = {
        "offline": [_span(0, 20)],
        "19-1": [_span(0, 19), [20]],
        "19-1b": _with_base([[5]], 21),  # MiB
        "15-5": [_span(0, 15), _span(16, 20)],
        "15-1": [_span(0, 15)] + _chunks(16, 20, 1),
        "10-1": [_span(0, 10)] + _chunks(11, 20, 1),
        "10-5": [_span(0, 10)] + _chunks(11, 20, 5),  # DKD
        "10-10": [_span(0, 10), _span(11, 20)],  # DKD
        "10-5-5": [_span(0, 10), _span(11, 15), _span(16, 20)],  # MiB
        "5-5": [_span(0, 5)] + _chunks(6, 20, 5),
        "5-3": [_span(0, 5)] + _chunks(6, 20, 3),
        "5-1": [_span(0, 5)] + _chunks(6, 20, 1),
        "2-2": [_span(0, 2)] + _chunks(3, 20, 2),
        "2-1": [_span(0, 2)] + _chunks(3, 20, 1),
    }
    for letter, (base, new) in _SHUFFLED_15_1.items():
        tasks[f"15-1_{letter}"] = [[0] + base] + [[c] for c in new]
    return tasks


def _ade_tasks():
    return {
        "offline": [_span(0, 150)],
        "100-50": [_span(0, 100), _span(101, 150)],
        "100-10": [_span(0, 100)] + _chunks(101, 150, 10),
        "100-5": [_span(0, 100)] + _chunks(101, 150, 5),
        "50-50": [_span(0, 50), _span(51, 100), _span(101, 150)],
        "50-20": [_span(0, 50)] + _chunks(51, 150, 20),
        "100-50b": _with_base([_ADE_100_50B_NEW], 151),
        "100-10b": _with_base(_ADE_100_10B_NEW, 151),
        "50b": _with_base([_ADE_50B_STEP1, _ADE_100_50B_NEW], 151),
        "100-50c": _with_base([_ADE_100_50C_NEW], 151),
        "100-10c": _with_base(_ADE_100_10C_NEW, 151),
        "50c": _with_base([_ADE_50C_STEP1, _ADE_100_50C_NEW], 151),
    }


def _cityscapes_domain_tasks():
    """Domain ids per step (PLOP tasks.py, "cityscapes_domain"; RCIL tasks.py is the same table)."""
    domains = DOMAIN_COUNTS["cityscapes_domain"]
    last = domains - 1
    return {
        "offline": [_span(0, last)],
        "11-5": [_span(0, 10), _span(11, 15), _span(16, last)],
        "11-1": [_span(0, 10)] + _chunks(11, last, 1),
        "1-1": _chunks(0, last, 1),
    }


_DOMAIN_TABLES = {"cityscapes_domain": _cityscapes_domain_tasks}


# Names used by other reference repositories for the same class lists (MiB/PLOP "15-5s", DKD "joint", ...).
_ALIASES = {
    "voc": {"15-5s": "15-1", "joint": "offline",
            **{f"15-5s_{letter}": f"15-1_{letter}" for letter in _SHUFFLED_15_1}},
    "ade": {"joint": "offline", "50": "50-50"},
    "cityscapes_domain": {},
}
_TABLES = {"voc": _voc_tasks, "ade": _ade_tasks, **_DOMAIN_TABLES}
_NATURAL_NAME = re.compile(r"^(\d+)(?:-(\d+))+$")
OFFLINE = "offline"  # every class in one step: the only named task of a dataset without a task table
_GENERIC_ALIASES = {"joint": OFFLINE}


def class_count(dataset, num_classes=None):
    """The number of classes of ``dataset`` (background included): ``num_classes`` when given, else VOC's or
    ADE's; any other dataset without ``num_classes`` is a :class:`UserError`."""
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise UserError(f"dataset '{dataset}' has {num_classes} classes: expected at least 2 (background"
                            f" included)")
        return num_classes
    if dataset in DOMAIN_CLASSES:
        return DOMAIN_CLASSES[dataset]
    if dataset not in NUM_CLASSES:
        raise UserError(f"unknown dataset '{dataset}': expected one of {', '.join(sorted(NUM_CLASSES))}, or the"
                        f" number of classes of a dataset of your own")
    return NUM_CLASSES[dataset]


def _table(dataset, num_classes=None):
    """The named tasks of ``dataset``: VOC's and ADE's tables, else "offline" only."""
    if dataset in _TABLES:
        return _TABLES[dataset]()
    return {OFFLINE: [_span(0, class_count(dataset, num_classes) - 1)]}


def _aliases(dataset):
    return _ALIASES.get(dataset, _GENERIC_ALIASES)


def list_tasks(dataset, num_classes=None):
    """Named tasks of ``dataset`` (aliases included); any other ``X-Y`` name also resolves (natural order)."""
    class_count(dataset, num_classes)
    return sorted(list(_table(dataset, num_classes)) + list(_aliases(dataset)), key=_task_sort_key)


def _task_sort_key(name):
    """Natural order: "2-1" < "10-1" < "15-1" < "15-1_b"."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


def natural_task(dataset, name, num_classes=None):
    """Resolve ``"X-Y"`` (or ``"X-Y-Z-..."``) to the natural class order, or return None if not of that form.

    ``X-Y``: step 0 holds background and classes 1..X, then steps of Y classes in ascending order; when Y
    does not divide the remaining classes, the last step holds the remainder (e.g. VOC ``15-2``: 16-17,
    18-19, 20). ``X-Y-Z-...``: step 0 holds 1..X, then steps of exactly Y, Z, ... classes, which must add
    up to all remaining classes.
    """
    if not _NATURAL_NAME.match(name):
        return None
    sizes = [int(part) for part in name.split("-")]
    last = class_count(dataset, num_classes) - 1
    base, increments = sizes[0], sizes[1:]
    if base < 1 or base >= last or min(increments) < 1:
        raise UserError(f"task '{name}' for {dataset}: expected X-Y with 1 <= X < {last} and Y >= 1")
    if len(increments) == 1:
        return [_span(0, base)] + _chunks(base + 1, last, increments[0])
    if base + sum(increments) != last:
        raise UserError(f"task '{name}' for {dataset}: the step sizes {base}+{'+'.join(map(str, increments))}"
                        f" must add up to the {last} classes of {dataset}")
    steps, first = [_span(0, base)], base + 1
    for size in increments:
        steps.append(_span(first, first + size - 1))
        first += size
    return steps


def is_domain_incremental(dataset):
    """Whether the steps of ``dataset``'s tasks add domains (all classes at every step) rather than classes."""
    return dataset in _DOMAIN_TABLES


def get_domains(dataset, task, task_file=None):
    """Domain ids per step of ``task`` of a domain-incremental ``dataset`` (None for a class-incremental one).

    Unknown names, and ``task_file`` (custom orders are class orders), raise :class:`UserError`."""
    if not is_domain_incremental(dataset):
        return None
    if task_file is not None:
        raise UserError(f"--task_file sets a class order, but {dataset} adds domains, not classes: use one of its"
                        f" tasks {', '.join(list_tasks(dataset))}")
    table = _DOMAIN_TABLES[dataset]()
    if task not in table:
        raise UserError(f"unknown {dataset} task '{task}': expected one of {', '.join(list_tasks(dataset))}")
    return table[task]


def get_task(dataset, task, task_file=None, num_classes=None):
    """Class ids per step for ``task`` of ``dataset``, step 0 starting with class 0 (VOC/ADE: background).

    ``task_file`` (a JSON file, see :func:`load_task_file`) overrides the name. ``num_classes``: the number of
    classes of a dataset other than VOC and ADE (see :func:`class_count`). Unknown names raise
    :class:`UserError` listing the valid ones. A domain-incremental dataset (:func:`is_domain_incremental`) has
    one classifier over all its classes at every step: step 0 holds every class and the later steps add none
    (empty lists, one per step of :func:`get_domains`).
    """
    if is_domain_incremental(dataset):
        domains = get_domains(dataset, task, task_file)
        return [list(range(DOMAIN_CLASSES[dataset]))] + [[] for _ in domains[1:]]
    class_count(dataset, num_classes)
    if task_file is not None:
        return load_task_file(dataset, task_file, num_classes)
    table = _table(dataset, num_classes)
    name = _aliases(dataset).get(task, task)
    if name in table:
        return table[name]
    steps = natural_task(dataset, str(task), num_classes)
    if steps is None:
        raise UserError(f"unknown {dataset} task '{task}': expected one of"
                        f" {', '.join(list_tasks(dataset, num_classes))}, any 'X-Y' name (natural order), or"
                        f" --task_file FILE.json")
    return steps


def load_task_file(dataset, path, num_classes=None):
    """Read a custom class order from JSON: a list of steps, or an object mapping step numbers to lists.

    Example: ``[[0, 3, 1, 2], [5, 4], [6]]`` or ``{"0": [0, 3, 1, 2], "1": [5, 4], "2": [6]}``. Step 0 must
    start with 0; every id must be a class of the dataset and appear once.
    """
    class_count(dataset, num_classes)
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read task file {path}: {err}; expected a JSON list of class-id lists") from None
    if isinstance(content, dict):
        try:
            keys = sorted(content, key=int)
        except (TypeError, ValueError):
            raise UserError(f"task file {path}: object keys must be step numbers 0, 1, ...") from None
        if [int(k) for k in keys] != list(range(len(keys))):
            raise UserError(f"task file {path}: steps must be numbered 0, 1, ... without gaps")
        content = [content[k] for k in keys]
    return validate_steps(dataset, content, source=f"task file {path}", num_classes=num_classes)


def validate_steps(dataset, steps, source="task", num_classes=None):
    """Check a list of class-id lists (see :func:`load_task_file`) and return it as plain ints."""
    n = class_count(dataset, num_classes)
    if (not isinstance(steps, list) or not steps
            or not all(isinstance(s, list) and s and all(isinstance(c, int) and not isinstance(c, bool)
                                                         for c in s) for s in steps)):
        raise UserError(f"{source}: expected a non-empty list of non-empty lists of integer class ids")
    if steps[0][0] != 0:
        raise UserError(f"{source}: step 0 must start with background class 0")
    seen = [c for s in steps for c in s]
    bad = sorted({c for c in seen if not 0 <= c < n})
    if bad:
        raise UserError(f"{source}: class ids {bad} are outside {dataset}'s 0..{n - 1}")
    repeated = sorted({c for c in seen if seen.count(c) > 1})
    if repeated:
        raise UserError(f"{source}: class ids {repeated} appear more than once")
    return [list(s) for s in steps]


def task_name(task, task_file=None):
    """The name a run is filed under: the task name, or the task file's stem for a custom order."""
    if task_file is not None:
        return os.path.splitext(os.path.basename(task_file))[0]
    return task


def classes_per_step(steps, upto=None):
    """Number of classes per step (step 0 with background) for steps 0..upto (all by default)."""
    upto = len(steps) - 1 if upto is None else upto
    return [len(s) for s in steps[:upto + 1]]


def check_step(steps, step, task="task"):
    """Raise :class:`UserError` unless 0 <= step < number of steps."""
    if not 0 <= step < len(steps):
        raise UserError(f"step {step} is out of range for {task}: expected 0..{len(steps) - 1}")
