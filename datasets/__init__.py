"""Datasets: VOC 2012 (augmented), ADE20K and Cityscapes (domain-incremental) layouts, the class index, and per-step
image lists.

Public API: :func:`step_image_ids` (the image ids a step trains or validates on), :func:`step_samples`
(the same as ``(id, image_path, label_path)`` triples), :func:`get_layout` (the dataset module: class
names, number of classes, file lists; for a dataset of the user's own, ``datasets.custom``, the layout its
folder describes), :func:`label_values` (how label files map to class ids), :func:`check_data` (every file
checked before training, where the layout asks for it), :func:`saliency_path` (SSUL's saliency maps) and
:func:`default_num_workers` (the ``--num_workers`` default).

Every function here works from a plain script without ``if __name__ == "__main__":`` (the labels are decoded
by threads, see ``datasets.files``).
"""
import os

import numpy as np

from datasets import ade, cityscapes_domain, custom, voc
from datasets.class_index import load_class_index
from datasets.files import usable_cpus
from datasets.incremental import step_mask
from utils.errors import UserError
from utils.tasks import check_step, get_domains, get_task, is_domain_incremental

LAYOUTS = {"voc": voc, "ade": ade, "cityscapes_domain": cityscapes_domain, "custom": custom}
# "train": training list; "val": per-step validation; "test": the whole validation list (BARM/SSUL);
# "test_seen": validation images with a seen class (MiB/PLOP/RCIL/DKD; MiB dataset/utils.py::filter_images)
SPLITS = ("train", "val", "test", "test_seen")
SALIENCY_DIR = "saliency_map"  # SSUL's saliency maps inside the VOC2012 folder (SSUL datasets/voc.py::__getitem__)
MAX_DEFAULT_WORKERS = 4  # BARM's --num_workers default, the most the default ever picks


def get_layout(dataset, data_root=None):
    """What describes ``dataset``: its module ("voc", "ade"), or, for a module with ``load(data_root)`` (a dataset
    described by its own folder: "custom"), what that returns for ``data_root``. Either has ``NAME``,
    ``NUM_CLASSES``, ``IGNORE_LABEL``, ``CLASS_NAMES``, ``IMAGE_COUNTS``, ``palette()`` and ``list_split``."""
    if dataset not in LAYOUTS:
        raise UserError(f"unknown dataset '{dataset}': expected one of {', '.join(LAYOUTS)}")
    layout = LAYOUTS[dataset]
    return layout.load(data_root) if hasattr(layout, "load") else layout


def label_values(dataset, data_root):
    """The :class:`datasets.class_index.LabelValues` of a dataset whose label files hold other values than its
    class ids, else None (the files hold class ids)."""
    return getattr(get_layout(dataset, data_root), "LABEL_VALUES", None)


def num_classes(dataset, data_root):
    """The number of classes of ``dataset`` (background included), for ``utils.tasks.get_task``."""
    return get_layout(dataset, data_root).NUM_CLASSES


def file_split(split):
    """The file list a split reads: "train" the training list; "val", "test" and "test_seen" the validation
    list."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}': expected one of {', '.join(SPLITS)}")
    return "train" if split == "train" else "val"


def split_class_index(dataset, data_root, split, cache_dir=None, workers=None, persist=True):
    """``(samples, index)`` of the file list behind ``split`` (see ``datasets.class_index``)."""
    layout = get_layout(dataset, data_root)
    files = file_split(split)
    samples = layout.list_split(data_root, files)
    index = load_class_index(dataset, data_root, files, samples, layout.NUM_CLASSES, layout.IGNORE_LABEL,
                             cache_dir=cache_dir, workers=workers, persist=persist,
                             values=getattr(layout, "LABEL_VALUES", None))
    return samples, index


def check_data(dataset, data_root, cache_dir=None, persist=True):
    """Check every file of both lists now (build or reuse their class indexes: labels decode and hold only the
    described values, images match their labels' sizes) where the layout asks for it (``CHECK_ALL_SPLITS``: a
    dataset of the user's own), so that a bad file stops a run before its first step; elsewhere nothing."""
    if getattr(get_layout(dataset, data_root), "CHECK_ALL_SPLITS", False):
        for split in ("train", "val"):
            split_class_index(dataset, data_root, split, cache_dir=cache_dir, persist=persist)


def step_samples(dataset, data_root, steps, step, overlap, split="train", cache_dir=None, workers=None,
                 persist=True, domains=None, held_out_test=False):
    """``[(id, image_path, label_path)]`` of ``split`` at ``step`` of the task ``steps``, in file order.

    A domain-incremental dataset (``cityscapes_domain``) chooses images by domain, not by class: ``domains`` (the
    domain ids per step, ``utils.tasks.get_domains``) and ``held_out_test`` decide, see
    :func:`datasets.cityscapes_domain.step_indices` (the order is the reference's shuffled order); ``overlap``
    and the class index play no part. Otherwise:

    * "train": the images the step trains on (overlap or disjoint rule, BARM utils/tasks.py::get_dataset_list);
    * "val": the per-step validation images (the same rule on the validation list);
    * "test": the whole validation list (BARM/SSUL; BARM datasets/voc.py, datasets/ade.py);
    * "test_seen": the validation images containing at least one **seen** class, i.e. a class of steps
      0..step other than 0 (MiB/PLOP/RCIL/DKD's ``test_on_val-<t>``, MiB dataset/utils.py::filter_images);
      ``overlap`` does not matter. At the last step of a task whose classes all occur it is the whole list.
    """
    check_step(steps, step)
    layout = get_layout(dataset, data_root)
    if is_domain_incremental(dataset):
        file_split(split)  # checks the split's name
        if domains is None or len(domains) != len(steps):
            raise ValueError(f"{dataset} needs the domains of every step of the task, got {domains!r}")
        pool = layout.list_pool(data_root)
        chosen = layout.step_indices([entry[3] for entry in pool], domains, step, split, held_out_test)
        return [pool[i][:3] for i in chosen]
    if split == "test" and not getattr(layout, "CHECK_ALL_SPLITS", False):
        return layout.list_split(data_root, file_split(split))
    samples, index = split_class_index(dataset, data_root, split, cache_dir=cache_dir, workers=workers,
                                       persist=persist)
    if split == "test":  # every image, its labels checked
        return samples
    if split == "test_seen":
        seen = {c for s in steps[:step + 1] for c in s} - {0}
        keep = np.flatnonzero(index.contains_any(seen))
    else:
        keep = np.flatnonzero(step_mask(index, steps, step, overlap))
    return [samples[i] for i in keep]


def step_image_ids(dataset, data_root, task, step, overlap, split="train", cache_dir=None, task_file=None,
                   held_out_test=False):
    """Image ids of ``split`` ("train", "val", "test" or "test_seen") at ``step`` of ``task`` (see
    :func:`step_samples`; ``held_out_test`` matters for domain-incremental datasets only)."""
    steps = get_task(dataset, task, task_file, num_classes=num_classes(dataset, data_root))
    check_step(steps, step, task=f"{dataset} task {task}")
    return [s[0] for s in step_samples(dataset, data_root, steps, step, overlap, split, cache_dir=cache_dir,
                                       domains=get_domains(dataset, task, task_file), held_out_test=held_out_test)]


def saliency_path(data_root, image_id):
    """SSUL's saliency map of a VOC image: ``{data_root}/saliency_map/{image_id}.png`` (SSUL
    datasets/voc.py::__getitem__; 8-bit, 0 = not salient)."""
    return os.path.join(data_root, SALIENCY_DIR, f"{image_id}.png")


def default_num_workers(processes_per_node=None):
    """The default ``--num_workers`` (DataLoader worker processes per training process)::

        min(MAX_DEFAULT_WORKERS, usable_cpus // processes_per_node - 1), at least 0

    ``usable_cpus`` counts the CPUs this process may run on, as the DataLoader does before it warns that a
    loader creates more workers than CPUs (``len(os.sched_getaffinity(0))``, else ``os.cpu_count()``); each
    of the ``processes_per_node`` training processes (default: torchrun's ``LOCAL_WORLD_SIZE``, else 1)
    keeps one CPU for itself. So the default never triggers that warning: 2 CPUs give 1 worker, 1 CPU gives
    0 (loading in the training process), 16 CPUs give 4, and 16 CPUs shared by 8 processes give 1.
    """
    if processes_per_node is None:
        processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    per_process = usable_cpus() // max(1, processes_per_node)
    return max(0, min(MAX_DEFAULT_WORKERS, per_process - 1))
