"""Datasets: VOC 2012 (augmented) and ADE20K layouts, the class index, and per-step image lists.

Public API: :func:`step_image_ids` (the image ids a step trains or validates on), :func:`step_samples`
(the same as ``(id, image_path, label_path)`` triples), :func:`get_layout` (the dataset module: class
names, number of classes, file lists).
"""
import numpy as np

from datasets import ade, voc
from datasets.class_index import load_class_index
from datasets.incremental import step_mask
from utils.errors import UserError
from utils.tasks import check_step, get_task

LAYOUTS = {"voc": voc, "ade": ade}
SPLITS = ("train", "val", "test")


def get_layout(dataset):
    """The module describing ``dataset`` ("voc" or "ade")."""
    if dataset not in LAYOUTS:
        raise UserError(f"unknown dataset '{dataset}': expected one of {', '.join(LAYOUTS)}")
    return LAYOUTS[dataset]


def file_split(split):
    """The file list a split reads: "train" the training list, "val" and "test" the validation list."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}': expected one of {', '.join(SPLITS)}")
    return "train" if split == "train" else "val"


def split_class_index(dataset, data_root, split, cache_dir=None, workers=None):
    """``(samples, index)`` of the file list behind ``split`` (see ``datasets.class_index``)."""
    layout = get_layout(dataset)
    files = file_split(split)
    samples = layout.list_split(data_root, files)
    index = load_class_index(dataset, data_root, files, samples, layout.NUM_CLASSES, layout.IGNORE_LABEL,
                             cache_dir=cache_dir, workers=workers)
    return samples, index


def step_samples(dataset, data_root, steps, step, overlap, split="train", cache_dir=None, workers=None):
    """``[(id, image_path, label_path)]`` of ``split`` at ``step`` of the task ``steps``.

    "train": the images the step trains on (overlap or disjoint rule); "val": BARM's per-step validation
    images (the same rule on the validation list); "test": the whole validation list.
    """
    check_step(steps, step)
    if split == "test":
        return get_layout(dataset).list_split(data_root, file_split(split))
    samples, index = split_class_index(dataset, data_root, split, cache_dir=cache_dir, workers=workers)
    keep = np.flatnonzero(step_mask(index, steps, step, overlap))
    return [samples[i] for i in keep]


def step_image_ids(dataset, data_root, task, step, overlap, split="train", cache_dir=None, task_file=None):
    """Image ids of ``split`` ("train", "val" or "test") at ``step`` of ``task`` (see :func:`step_samples`)."""
    steps = get_task(dataset, task, task_file)
    check_step(steps, step, task=f"{dataset} task {task}")
    return [s[0] for s in step_samples(dataset, data_root, steps, step, overlap, split, cache_dir=cache_dir)]
