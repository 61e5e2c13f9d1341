"""Validate a data root and print images per class and per step of a task.

Checks that the split lists, images and labels are present, that every label decodes and holds only the
dataset's values (this builds or reuses the class index), optionally decodes every image
(``--verify_images``), and compares the counts with the full dataset's. Then prints, for the task, the
number of training images per step under the overlap and the disjoint rule and the validation images per
step, and the number of images containing each class::

    python -m datasets.check --dataset voc --data_root data/synthetic_voc --task 15-1

A domain-incremental dataset (``cityscapes_domain``) is checked by domain instead: images per city against the public
counts, every label decoded and holding raw ``labelIds`` only (0..33, 255), and the training, validation and test
images of every step of the task.

A dataset of one's own (``--dataset custom``, ``datasets.custom``) is checked against its ``dataset.json``: the
description itself, every listed file (present, labels holding only described values, images of their labels'
size), and the report adds what the description says (classes with their label ids and ciss class ids, the
ignore value, the background, the lists or the seeded split) and the classes no image holds::

    python -m datasets.check --dataset custom --data_root data/my_shapes --task 4-2
"""
import argparse
import logging
import multiprocessing
import os
import sys

import numpy as np
from PIL import Image

from datasets import LAYOUTS, get_layout, split_class_index
from datasets.class_index import build_index, refuse_values, size_problem
from datasets.incremental import step_mask
from utils.errors import UserError, exit_on_user_error
from utils.tasks import NUM_CLASSES, get_domains, get_task, is_domain_incremental, task_name

DEFAULT_TASK = "15-1"  # the per-step table's task on VOC and ADE when none is given (a dataset of one's own: none)
DEFAULT_DOMAIN_TASK = "11-5"  # the per-step table's task on Cityscapes when none is given
RAW_LABEL_IDS = 34  # Cityscapes labelIds 0..33 (cityscapesScripts labels.py), and 255


def _image_problem(sample):
    """Why an image of ``(id, image path, label path)`` cannot be used: it does not decode, or its size is not its
    label's (:func:`datasets.class_index.size_problem`); None when it can."""
    _, image_path, label_path = sample
    try:
        with Image.open(image_path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError) as err:
        return f"cannot decode {image_path} ({err})"
    return size_problem(image_path, label_path)


def verify_images(samples, workers):
    """Decode every image and compare its size with its label's; raise UserError on the first problem."""
    with multiprocessing.get_context("spawn").Pool(max(1, workers)) as pool:
        for problem in pool.imap(_image_problem, samples, chunksize=64):
            if problem:
                raise UserError(problem)


def check_domains(dataset, data_root, task, workers=None, images=False):
    """The check of a domain-incremental dataset (see the module docstring); returns the number of images."""
    layout = get_layout(dataset)
    pool = layout.list_pool(data_root)
    counts = np.bincount([entry[3] for entry in pool], minlength=len(layout.CITIES))
    print(f"{len(pool)} images (the public release has {sum(layout.CITY_COUNTS.values())})")
    print(f"{'domain':>6} {'city':<16} {'images':>6}")
    for domain, city in enumerate(layout.CITIES):
        note = "" if counts[domain] == layout.CITY_COUNTS[city] else f" (public: {layout.CITY_COUNTS[city]})"
        print(f"{domain:>6} {city:<16} {counts[domain]:>6}{note}")
    index = build_index([entry[2] for entry in pool], [entry[0] for entry in pool], workers=workers)
    refuse_values(index, [entry[2] for entry in pool], set(range(RAW_LABEL_IDS)) | {layout.IGNORE_LABEL},
                  f": expected Cityscapes labelIds 0..{RAW_LABEL_IDS - 1} (and {layout.IGNORE_LABEL})")
    print("labels OK (raw labelIds)")
    if images:
        verify_images([entry[:3] for entry in pool], workers or os.cpu_count() or 1)
        print("every image decodes and matches its label's size")
    steps, domains = get_task(dataset, task), get_domains(dataset, task)
    print(f"\ntask {task}: {len(steps)} steps")
    print(f"{'step':>4} {'domains':<24} {'train':>6} {'val':>6} {'test':>6} {'held-out test':>13}")
    domains_of_pool = [entry[3] for entry in pool]  # the pool listed once, not once per step and split
    for t, step_domains in enumerate(domains):
        sizes = [len(layout.step_indices(domains_of_pool, domains, t, split)) for split in ("train", "val", "test")]
        held_out = len(layout.step_indices(domains_of_pool, domains, t, "test", held_out_test=True))
        shown = ",".join(map(str, step_domains)) if len(step_domains) <= 6 else f"{step_domains[0]}..{step_domains[-1]}"
        print(f"{t:>4} {shown:<24} {sizes[0]:>6} {sizes[1]:>6} {sizes[2]:>6} {held_out:>13}")
    return len(pool)


def describe(layout):
    """The lines saying what a dataset of one's own's description holds (nothing for VOC and ADE)."""
    settings = getattr(layout, "settings", None)
    if settings is None:
        return []
    background = settings["background"]
    lists = settings["train_list"]
    split = (f"lists {settings['train_list']} and {settings['val_list']}" if lists else
             f"seeded split (seed {settings['split_seed']}, validation fraction {settings['val_fraction']:g})")
    return [f"{layout.path}: \"{layout.DATASET_NAME}\", {layout.NUM_CLASSES} classes,"
            f" background {'label id ' + str(background) if background is not None else 'none (class 0 is reserved)'},"
            f" ignore value {settings['ignore_index']}, {split}",
            f"images {settings['images']}/*{settings['image_ext']}, labels {settings['labels']}/*{settings['label_ext']}"]


def check(dataset, data_root, task=None, task_file=None, cache_dir=None, workers=None, images=False):
    """Check ``data_root`` and print what it holds; returns the number of classes some training image holds (a
    domain-incremental dataset: the number of images)."""
    if is_domain_incremental(dataset):
        return check_domains(dataset, data_root, task or DEFAULT_DOMAIN_TASK, workers, images)
    layout = get_layout(dataset, data_root)
    for line in describe(layout):
        print(line)
    if task is None and task_file is None and dataset in NUM_CLASSES:
        task = DEFAULT_TASK
    steps = None
    if task is not None or task_file is not None:
        steps = get_task(dataset, task, task_file, num_classes=layout.NUM_CLASSES)
    indexes = {}
    for split in ("train", "val"):
        samples, index = split_class_index(dataset, data_root, split, cache_dir=cache_dir, workers=workers)
        indexes[split] = index
        expected = layout.IMAGE_COUNTS[split] if layout.IMAGE_COUNTS else len(samples)
        note = "" if len(samples) == expected else f" (the full {dataset} {split} split has {expected})"
        sizes = ", image sizes match" if getattr(layout, "LABEL_VALUES", None) is not None else ""
        print(f"{split}: {len(samples)} images, labels OK{sizes}{note}")
        if images:
            verify_images(samples, workers or os.cpu_count() or 1)
            print(f"{split}: every image decodes and matches its label's size")

    if steps is not None:
        name = task_name(task, task_file)
        print(f"\ntask {name}: {len(steps)} steps, classes per step {[len(s) for s in steps]}")
        print(f"{'step':>4} {'classes':<24} {'train overlap':>13} {'train disjoint':>14} {'val':>6}")
        for t, classes in enumerate(steps):
            counts = [int(step_mask(indexes["train"], steps, t, overlap).sum()) for overlap in (True, False)]
            val = int(step_mask(indexes["val"], steps, t, True).sum())
            shown = (",".join(map(str, classes)) if len(classes) <= 6
                     else f"{classes[0]}..{classes[-1]} ({len(classes)})")
            print(f"{t:>4} {shown:<24} {counts[0]:>13} {counts[1]:>14} {val:>6}")

    order = getattr(layout, "ORDER", None)  # label ids of a dataset of one's own
    print(f"\n{'class':>5} {'label':>5} {'name':<20} {'train':>7} {'val':>6}" if order else
          f"\n{'class':>5} {'name':<20} {'train':>7} {'val':>6}")
    train_counts, val_counts = indexes["train"].counts(), indexes["val"].counts()
    for c in range(layout.NUM_CLASSES):
        label = "" if order is None else f" {'-' if order[c] is None else order[c]:>5}"
        print(f"{c:>5}{label} {layout.CLASS_NAMES[c]:<20} {train_counts[c]:>7} {val_counts[c]:>6}")
    problems = 0
    for counts, where in ((train_counts, "training"), (val_counts, "validation")):
        missing = [c for c in range(1, layout.NUM_CLASSES) if counts[c] == 0]
        if missing:
            problems += 1
            print(f"\nwarning: classes {missing} occur in no {where} image")
    if order is not None:
        print(f"\n{'no problems found' if not problems else f'{problems} warning(s)'}: ready to train with"
              f" --dataset custom --data_root {data_root}")
    return int(np.sum(train_counts[:layout.NUM_CLASSES] > 0))


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", choices=list(LAYOUTS), default="voc")
    parser.add_argument("--data_root", required=True,
                        help="the VOC2012, ADEChallengeData2016 or Cityscapes (leftImg8bit/, gtFine/) folder, or a"
                             " folder with dataset.json (custom)")
    parser.add_argument("--task", default=None,
                        help=f"the task whose steps are counted (default: {DEFAULT_TASK} on voc and ade,"
                             f" {DEFAULT_DOMAIN_TASK} on cityscapes_domain; none on custom)")
    parser.add_argument("--task_file", default=None, help="JSON file with a custom class order")
    parser.add_argument("--cache_dir", default=None, help="class-index cache folder")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--verify_images", action="store_true", help="also decode every image")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    check(args.dataset, args.data_root, args.task, args.task_file, args.cache_dir, args.workers,
          args.verify_images)


if __name__ == "__main__":
    main()
