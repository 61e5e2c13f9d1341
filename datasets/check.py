"""Validate a data root and print images per class and per step of a task.

Checks that the split lists, images and labels are present, that every label decodes and holds only the
dataset's values (this builds or reuses the class index), optionally decodes every image
(``--verify_images``), and compares the counts with the full dataset's. Then prints, for the task, the
number of training images per step under the overlap and the disjoint rule and the validation images per
step, and the number of images containing each class::

    python -m datasets.check --dataset voc --data_root data/synthetic_voc --task 15-1
"""
import argparse
import logging
import multiprocessing
import os
import sys

import numpy as np
from PIL import Image

from datasets import get_layout, split_class_index
from datasets.incremental import step_mask
from utils.errors import UserError, exit_on_user_error
from utils.tasks import get_task, task_name


def _image_problem(sample):
    image_id, image_path, label_path = sample
    try:
        with Image.open(image_path) as image:
            image.load()
            size = image.size
        with Image.open(label_path) as label:
            label_size = label.size
    except (OSError, SyntaxError, ValueError) as err:
        return f"cannot decode {image_path} ({err})"
    if size != label_size:
        return f"image {image_path} is {size[0]}x{size[1]} but its label is {label_size[0]}x{label_size[1]}"
    return None


def verify_images(samples, workers):
    """Decode every image and compare its size with its label's; raise UserError on the first problem."""
    with multiprocessing.get_context("spawn").Pool(max(1, workers)) as pool:
        for problem in pool.imap(_image_problem, samples, chunksize=64):
            if problem:
                raise UserError(problem)


def check(dataset, data_root, task, task_file=None, cache_dir=None, workers=None, images=False):
    layout = get_layout(dataset)
    steps = get_task(dataset, task, task_file)
    indexes = {}
    for split in ("train", "val"):
        samples, index = split_class_index(dataset, data_root, split, cache_dir=cache_dir, workers=workers)
        indexes[split] = index
        expected = layout.IMAGE_COUNTS[split]
        note = "" if len(samples) == expected else f" (the full {dataset} {split} split has {expected})"
        print(f"{split}: {len(samples)} images, labels OK{note}")
        if images:
            verify_images(samples, workers or os.cpu_count() or 1)
            print(f"{split}: every image decodes and matches its label's size")

    name = task_name(task, task_file)
    print(f"\ntask {name}: {len(steps)} steps, classes per step {[len(s) for s in steps]}")
    print(f"{'step':>4} {'classes':<24} {'train overlap':>13} {'train disjoint':>14} {'val':>6}")
    for t, classes in enumerate(steps):
        counts = [int(step_mask(indexes["train"], steps, t, overlap).sum()) for overlap in (True, False)]
        val = int(step_mask(indexes["val"], steps, t, True).sum())
        shown = ",".join(map(str, classes)) if len(classes) <= 6 else f"{classes[0]}..{classes[-1]} ({len(classes)})"
        print(f"{t:>4} {shown:<24} {counts[0]:>13} {counts[1]:>14} {val:>6}")

    print(f"\n{'class':>5} {'name':<20} {'train':>7} {'val':>6}")
    train_counts, val_counts = indexes["train"].counts(), indexes["val"].counts()
    for c in range(layout.NUM_CLASSES):
        print(f"{c:>5} {layout.CLASS_NAMES[c]:<20} {train_counts[c]:>7} {val_counts[c]:>6}")
    missing = [c for c in range(1, layout.NUM_CLASSES) if train_counts[c] == 0]
    if missing:
        print(f"\nwarning: classes {missing} occur in no training image")
    return int(np.sum(train_counts > 0))


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", choices=("voc", "ade"), default="voc")
    parser.add_argument("--data_root", required=True, help="the VOC2012 or ADEChallengeData2016 folder")
    parser.add_argument("--task", default="15-1")
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
