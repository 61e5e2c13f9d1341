"""Deterministic synthetic datasets in the VOC 2012, ADE20K and Cityscapes layouts, for demos and tests.

Every image shows a few objects (ellipses, rectangles, triangles) of several classes on a smooth, noisy
background. Each class has its own colour and stripe texture (orientation and period), so a small network can
learn to tell them apart. VOC labels carry a 255 ("void") border around each object, as the real
annotations do; ADE labels use 0..150 with 0 = "other". The first object of image ``i`` cycles through all
classes, so every class occurs once there are at least as many images as classes; further objects are
drawn half from the classes up to the first one and half from all classes, so images mix classes of
different incremental steps and the overlap and disjoint lists differ without either being empty. Image
``i`` depends only on ``(seed, split, i)``: a dataset is the same whatever the worker count.

VOC folders also get SSUL's saliency maps, ``saliency_map/{id}.png`` (SSUL datasets/voc.py::__getitem__; 8-bit,
0 = not salient, 255 = salient) for the training and validation images: every labelled pixel (objects and
their void border) is salient except for a random ``SALIENCY_MISS`` of them, and a random
``SALIENCY_FALSE`` of the background pixels is salient too. They come from a third random stream of the
image, so the images and labels are the same as without them. ADE folders get none (SSUL uses no saliency
on ADE).

Cityscapes folders (``--dataset cityscapes_domain``) follow the official layout: ``leftImg8bit/{train,val}/{city}/``
PNG images twice as wide as high and ``gtFine/{train,val}/{city}/*_gtFine_labelIds.png`` holding raw label ids
(0..33): the objects take the ids of the 19 classes (the first object of image ``i`` cycles through them), the
ground is road (id 7), a band at the bottom is the ego vehicle (id 1, ignored) and object boundaries are
"unlabeled" (id 0, ignored). Training image ``i`` belongs to the ``i``-th official training city (cyclically),
validation image ``i`` to the ``i``-th validation city.

A dataset of one's own (``--dataset custom``, ``datasets.custom``) is rendered the same way, with as many classes
as names (``SYNTHETIC_CLASSES`` by default; the first is the background, or with ``--no_background`` an ordinary
class that fills the space between the objects), a void border of the ignore value, label ids ``ID_STEP`` apart
(0, 10, 20, ...: not contiguous, as a user's may be), and ``dataset.json``; the images are split by the
description's seeded split, or by ``train.txt`` / ``val.txt`` with ``--lists``.

Command line::

    python -m datasets.synthetic --dataset voc --root data/synthetic_voc --n_train 300 --n_val 60 --size 160
    python -m datasets.synthetic --dataset cityscapes_domain --root data/synthetic_cityscapes --n_train 72 --n_val 12
    python -m datasets.synthetic --dataset custom --root data/my_shapes --n_train 48 --n_val 12 --size 96
"""
import argparse
import json
import logging
import os
import zlib

import numpy as np
from PIL import Image, ImageDraw

from datasets import ade, cityscapes_domain, custom, saliency_path, voc
from datasets.files import parallel_imap
from utils.errors import UserError, exit_on_user_error

log = logging.getLogger("ciss")

VOID_WIDTH = 2  # half-width in pixels of the 255 band along VOC object boundaries
MAX_OBJECTS = 4
SPLITS = ("train", "val")
JPEG_QUALITY = 90
SALIENCY_MISS = 0.1  # fraction of the object pixels that the synthetic saliency map misses
SALIENCY_FALSE = 0.03  # fraction of the background pixels that it marks salient
SALIENT, NOT_SALIENT = 255, 0
STREAMS = {"layout": 0, "pixels": 1, "saliency": 2}  # independent random streams of one image
DATASETS = ("voc", "ade", "cityscapes_domain", "custom")
# Cityscapes raw label ids (cityscapesScripts labels.py) the synthetic labels use besides the 19 classes'
CITYSCAPES_UNLABELED, CITYSCAPES_EGO_VEHICLE, CITYSCAPES_ROAD = 0, 1, 7
CITYSCAPES_EGO_FRACTION = 0.1  # the bottom band of the image that shows the ego vehicle
CITYSCAPES_TRAIN_CITIES = 18  # the first 18 cities of datasets.cityscapes_domain.CITIES are the official train/ ones
# the synthetic dataset of one's own: 7 classes, label ids ID_STEP apart, VOC's void value
SYNTHETIC_CLASSES = ("background", "meadow cat", "red kite", "tin can", "oak", "lighthouse", "canoe")
ID_STEP = 10
MAX_SYNTHETIC_CLASSES = custom.MAX_CLASSES // ID_STEP + 1  # label ids 0, 10, ..., 250
CUSTOM_NAME = "synthetic shapes"
CUSTOM_SPLIT = "all"  # the random streams of a custom dataset's images (split by the description, not here)


def class_style(c):
    """Colour (RGB), stripe angle and period of class ``c`` (deterministic, well separated in hue)."""
    golden = 0.61803398875
    hue = (c * golden) % 1.0
    sat, val = 0.55 + 0.4 * ((c * 7) % 5) / 4, 0.55 + 0.4 * ((c * 3) % 4) / 3
    rgb = np.array(_hsv_to_rgb(hue, sat, val)) * 255
    angle = (c * 47 % 180) * np.pi / 180
    period = 4 + (c * 5) % 9
    return rgb, angle, period


def _hsv_to_rgb(h, s, v):
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def _object_mask(rng, height, width):
    """A random filled shape as a bool array."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    h = rng.uniform(0.2, 0.55) * height
    w = rng.uniform(0.2, 0.55) * width
    top, left = rng.uniform(0, height - h), rng.uniform(0, width - w)
    box = [left, top, left + w, top + h]
    kind = rng.integers(3)
    if kind == 0:
        draw.ellipse(box, fill=1)
    elif kind == 1:
        draw.rectangle(box, fill=1)
    else:
        draw.polygon([(left + w * rng.uniform(0, 1), top), (left, top + h), (left + w, top + h)], fill=1)
    return np.asarray(mask, dtype=bool)


def _boundary_band(label, radius):
    """Pixels within ``radius`` (square neighbourhood) of a change of label value."""
    edge = np.zeros(label.shape, dtype=bool)
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    band = edge.copy()
    for _ in range(radius):  # separable dilation, one pixel per pass
        grown = band.copy()
        grown[:, 1:] |= band[:, :-1]
        grown[:, :-1] |= band[:, 1:]
        band = grown.copy()
        band[1:, :] |= grown[:-1, :]
        band[:-1, :] |= grown[1:, :]
    return band


def render(dataset, seed, split, i, size, with_image=True, num_classes=None):
    """Image ``i`` of ``split``: an RGB uint8 array (None without ``with_image``) and a uint8 label array.

    The layout (size, shapes, classes) and the pixels come from two independent random streams, so the
    labels are the same with or without the image. ``num_classes``: VOC's or ADE's, else given (a custom
    dataset: labels 0..num_classes-1 with VOC's void border).
    """
    if dataset == "cityscapes_domain":
        return render_cityscapes(seed, split, i, size, with_image)
    if num_classes is None:
        num_classes = {"voc": voc.NUM_CLASSES, "ade": ade.NUM_CLASSES}[dataset]
    rng, pixel_rng = _stream(dataset, seed, split, i, "layout"), _stream(dataset, seed, split, i, "pixels")
    height = int(size * rng.uniform(0.75, 1.0))
    width = int(size * rng.uniform(1.0, 1.3))
    n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    first = 1 + (i % (num_classes - 1))
    # further objects: half of them from classes <= the first one (so that, for natural orders, some images
    # hold no class of a later step and the disjoint lists are never empty), half from any class
    classes = [first] + [int(rng.integers(1, first + 1)) if rng.random() < 0.5 else int(rng.integers(1, num_classes))
                         for _ in range(n_objects - 1)]
    masks = [_object_mask(rng, height, width) for _ in classes]

    label = np.zeros((height, width), dtype=np.uint8)
    for c, mask in zip(classes, masks):
        label[mask] = c
    if dataset != "ade":
        label[_boundary_band(label, VOID_WIDTH)] = voc.IGNORE_LABEL
    if not with_image:
        return None, label

    return _paint((height, width), pixel_rng, classes, masks), label


def _paint(image_shape, pixel_rng, classes, masks):
    """Smooth noisy ground, then each object in its class's colour and stripes (float array)."""
    height, width = image_shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = pixel_rng.uniform(60, 200, size=3)
    tilt = pixel_rng.uniform(-0.3, 0.3, size=(2, 3))
    image = base + (yy / height)[..., None] * tilt[0] * 100 + (xx / width)[..., None] * tilt[1] * 100
    for c, mask in zip(classes, masks):
        rgb, angle, period = class_style(c)
        stripes = np.sin(2 * np.pi * (xx[mask] * np.cos(angle) + yy[mask] * np.sin(angle)) / period)
        image[mask] = rgb[None, :] * (0.8 + 0.2 * stripes[:, None])
    image += pixel_rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def render_cityscapes(seed, split, i, size, with_image=True):
    """Image ``i`` of a Cityscapes ``split`` (``size`` high, twice as wide) and its raw ``labelIds`` array (see the
    module docstring)."""
    dataset = "cityscapes_domain"
    rng, pixel_rng = _stream(dataset, seed, split, i, "layout"), _stream(dataset, seed, split, i, "pixels")
    height, width = size, 2 * size
    raw_ids = {train_id: label_id for label_id, train_id in cityscapes_domain.LABEL_TO_TRAIN_ID.items()}
    n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    first = i % cityscapes_domain.NUM_CLASSES
    classes = [first] + [int(rng.integers(0, cityscapes_domain.NUM_CLASSES)) for _ in range(n_objects - 1)]
    masks = [_object_mask(rng, height, width) for _ in classes]
    label = np.full((height, width), CITYSCAPES_ROAD, dtype=np.uint8)
    for c, mask in zip(classes, masks):
        label[mask] = raw_ids[c]
    label[_boundary_band(label, VOID_WIDTH)] = CITYSCAPES_UNLABELED
    label[height - max(1, int(CITYSCAPES_EGO_FRACTION * height)):] = CITYSCAPES_EGO_VEHICLE
    if not with_image:
        return None, label
    # colours by train id + 1, so that the road (train id 0) does not share the look of the ground
    return _paint((height, width), pixel_rng, [c + 1 for c in classes], masks), label


def _stream(dataset, seed, split, i, purpose):
    """The random generator of one purpose (``STREAMS``) of image ``i`` of ``split``."""
    return np.random.default_rng([seed, zlib.crc32(f"{dataset}/{split}".encode()), i, STREAMS[purpose]])


def render_saliency(dataset, seed, split, i, label):
    """The synthetic saliency map (uint8 array like ``label``: 255 salient, 0 not) of image ``i`` of a VOC
    ``split`` whose label array is ``label``; None for ADE. Salient = labelled (value != 0, the void border
    included), then each pixel is flipped at random: object pixels missed with probability
    ``SALIENCY_MISS``, background pixels marked with probability ``SALIENCY_FALSE``."""
    if dataset != "voc":
        return None
    draw = _stream(dataset, seed, split, i, "saliency").random(label.shape)
    foreground = label != 0
    salient = np.where(foreground, draw >= SALIENCY_MISS, draw < SALIENCY_FALSE)
    return np.where(salient, SALIENT, NOT_SALIENT).astype(np.uint8)


def _paths(dataset, root, split, i):
    if dataset == "cityscapes_domain":
        cities = cityscapes_domain.CITIES
        cities = cities[:CITYSCAPES_TRAIN_CITIES] if split == "train" else cities[CITYSCAPES_TRAIN_CITIES:]
        city = cities[i % len(cities)]
        name = f"{city}_000000_{i:06d}"
        image_name = f"{name}_{cityscapes_domain.IMAGE_SUFFIX}"
        return (name, os.path.join(root, cityscapes_domain.IMAGE_DIR, split, city, image_name),
                os.path.join(root, cityscapes_domain.LABEL_DIR, split, city, cityscapes_domain.label_name(image_name)))
    if dataset == "voc":
        name = f"2012_{i:06d}" if split == "train" else f"2012_{900000 + i:06d}"
        return name, os.path.join(root, voc.IMAGE_DIR, name + ".jpg"), os.path.join(root, voc.LABEL_DIR, name + ".png")
    folder = ade.SPLIT_FOLDERS[split]
    name = f"ADE_{'train' if split == 'train' else 'val'}_{i + 1:08d}"
    return (name, os.path.join(root, "images", folder, name + ".jpg"),
            os.path.join(root, "annotations", folder, name + ".png"))


def _write_one(job):
    dataset, root, split, i, size, seed, labels_only = job
    name, image_path, label_path = _paths(dataset, root, split, i)
    image, label = render(dataset, seed, split, i, size, with_image=not labels_only)
    if image is not None:
        Image.fromarray(image).save(image_path, quality=JPEG_QUALITY)
    Image.fromarray(label, mode="L").save(label_path)
    saliency = render_saliency(dataset, seed, split, i, label)
    if saliency is not None:
        Image.fromarray(saliency, mode="L").save(saliency_path(root, name))
    return name


def generate(dataset, root, n_train=300, n_val=60, size=160, seed=0, workers=None, labels_only=False):
    """Write a synthetic ``dataset`` ("voc", "ade" or "cityscapes_domain") under ``root`` (the VOC2012 /
    ADEChallengeData2016 / Cityscapes folder) with ``workers`` threads (default: the usable CPUs) and return
    ``{split: [ids]}``. VOC folders also get ``saliency_map/``. ``labels_only`` skips the images (for class-index
    benchmarks). A dataset of one's own is written by :func:`generate_custom`."""
    if dataset not in ("voc", "ade", "cityscapes_domain"):
        raise UserError(f"unknown dataset '{dataset}': expected voc, ade or cityscapes_domain (generate_custom"
                        f" writes a custom one)")
    if n_train < 1 or n_val < 1 or size < 32:
        raise UserError("expected --n_train >= 1, --n_val >= 1 and --size >= 32")
    counts = {"train": n_train, "val": n_val}
    for split in SPLITS:
        for i in range(min(counts[split], CITYSCAPES_TRAIN_CITIES) if dataset == "cityscapes_domain" else 1):
            _, image_path, label_path = _paths(dataset, root, split, i)  # every folder (Cityscapes: every city)
            os.makedirs(os.path.dirname(image_path), exist_ok=True)
            os.makedirs(os.path.dirname(label_path), exist_ok=True)
    if dataset == "voc":
        os.makedirs(os.path.dirname(saliency_path(root, "x")), exist_ok=True)
    jobs = [(dataset, root, split, i, size, seed, labels_only) for split in SPLITS for i in range(counts[split])]
    # threads, not processes: a process pool would re-run an unguarded calling script (see datasets.files)
    names = list(parallel_imap(_write_one, jobs, workers, chunksize=max(1, len(jobs) // (8 * (workers or 1)))))
    ids = {"train": names[:n_train], "val": names[n_train:]}
    if dataset == "voc":
        split_dir = os.path.join(root, voc.SPLIT_DIR)
        os.makedirs(split_dir, exist_ok=True)
        for split in SPLITS:
            with open(os.path.join(split_dir, voc.SPLIT_FILES[split]), "w", encoding="utf-8") as handle:
                handle.write("\n".join(ids[split]) + "\n")
    return ids


def custom_description(class_names=SYNTHETIC_CLASSES, background=True, ignore_index=voc.IGNORE_LABEL, lists=False,
                       seed=0, val_fraction=0.2):
    """The ``dataset.json`` content of a synthetic dataset of one's own: class ``k`` of ``class_names`` has label
    id ``k * ID_STEP``; the first is the background unless ``background`` is False."""
    description = {"name": CUSTOM_NAME, "classes": [{"id": k * ID_STEP, "name": n} for k, n in enumerate(class_names)],
                   "ignore_index": ignore_index, "background": 0 if background else None, "images": "images",
                   "labels": "labels", "image_ext": ".jpg", "label_ext": ".png", "split_seed": seed,
                   "val_fraction": val_fraction}
    if lists:
        description.update(train_list="train.txt", val_list="val.txt")
    return description


def _write_custom(job):
    root, i, size, seed, table = job
    name = f"img_{i:05d}"
    image, label = render("custom", seed, CUSTOM_SPLIT, i, size, num_classes=len(table))
    Image.fromarray(image).save(os.path.join(root, "images", name + ".jpg"), quality=JPEG_QUALITY)
    raw = np.where(label == voc.IGNORE_LABEL, voc.IGNORE_LABEL, np.asarray(table, dtype=np.uint8)[
        np.minimum(label, len(table) - 1)])
    Image.fromarray(raw.astype(np.uint8), mode="L").save(os.path.join(root, "labels", name + ".png"))
    return name


def generate_custom(root, n_images=60, size=96, seed=0, class_names=SYNTHETIC_CLASSES, background=True,
                    lists=False, val_fraction=0.2, workers=None):
    """Write a synthetic dataset of one's own under ``root`` (``images/``, ``labels/``, ``dataset.json``, with
    ``lists`` also ``train.txt`` / ``val.txt``) with ``workers`` threads and return ``{split: [ids]}`` (the
    split the description makes: ``datasets.custom.seeded_split``)."""
    if n_images < 2 or size < 32 or not 2 <= len(class_names) <= MAX_SYNTHETIC_CLASSES:
        raise UserError(f"expected at least 2 images, --size >= 32 and 2..{MAX_SYNTHETIC_CLASSES} classes")
    for folder in ("images", "labels"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    table = [k * ID_STEP for k in range(len(class_names))]
    jobs = [(root, i, size, seed, table) for i in range(n_images)]
    names = list(parallel_imap(_write_custom, jobs, workers, chunksize=max(1, len(jobs) // (8 * (workers or 1)))))
    train, val = custom.seeded_split(names, seed, val_fraction)
    if lists:
        for split, ids in (("train", train), ("val", val)):
            with open(os.path.join(root, f"{split}.txt"), "w", encoding="utf-8") as handle:
                handle.write("\n".join(ids) + "\n")
    with open(custom.description_path(root), "w", encoding="utf-8") as handle:
        json.dump(custom_description(class_names, background, lists=lists, seed=seed, val_fraction=val_fraction),
                  handle, indent=1)
        handle.write("\n")
    return {"train": train, "val": val}


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="voc")
    parser.add_argument("--root", required=True,
                        help="output folder: plays the role of VOC2012/, ADEChallengeData2016/ or the Cityscapes folder"
                             " (custom: the folder with dataset.json)")
    parser.add_argument("--n_train", type=int, default=300, help="training images")
    parser.add_argument("--n_val", type=int, default=60, help="validation (= test) images (custom: the"
                                                              " images are n_train + n_val, split by the seeded"
                                                              " split at n_val / (n_train + n_val))")
    parser.add_argument("--size", type=int, default=160, help="nominal image size in pixels (Cityscapes: the height;"
                                                             " the width is twice it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="threads (default: the usable CPUs)")
    parser.add_argument("--labels_only", action="store_true", help="write the label PNGs only (voc, ade)")
    parser.add_argument("--classes", default=",".join(SYNTHETIC_CLASSES),
                        help="custom: comma-separated class names, the first the background")
    parser.add_argument("--no_background", action="store_true",
                        help="custom: the first class is an ordinary class and the description has no background")
    parser.add_argument("--lists", action="store_true", help="custom: also write train.txt and val.txt")
    args = parser.parse_args(argv)
    if args.dataset == "custom":
        if args.labels_only:
            raise UserError("--labels_only is for voc and ade: a custom dataset is written whole")
        total = args.n_train + args.n_val
        ids = generate_custom(args.root, total, args.size, args.seed, tuple(n.strip() for n in args.classes.split(",")),
                              background=not args.no_background, lists=args.lists,
                              val_fraction=args.n_val / max(1, total), workers=args.workers)
        print(f"wrote a synthetic dataset of {len(args.classes.split(','))} classes to {args.root}:"
              f" {len(ids['train'])} train, {len(ids['val'])} val images (check it: python -m datasets.check"
              f" --dataset custom --data_root {args.root})")
        return
    ids = generate(args.dataset, args.root, args.n_train, args.n_val, args.size, args.seed, args.workers,
                   args.labels_only)
    print(f"wrote a synthetic {args.dataset} dataset to {args.root}: {len(ids['train'])} train,"
          f" {len(ids['val'])} val images")


if __name__ == "__main__":
    main()
