"""The data benchmarks of ``scripts/benchmark.py``: decoding and augmentation per loader worker (and the
``--device_augment`` split of that work), and the class index's build and cached reload."""
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from datasets import split_class_index
from datasets.deferred import DeferredSegmentation, deferred_collate
from datasets.incremental import IncrementalSegmentation
from datasets.synthetic import generate
from datasets.transforms import mib_train_transform, train_transform
from methods.barm import barm_lut
from scripts.measure import synchronize, timed
from utils.tasks import get_task

VOC_IMAGE_SIZE = (500, 375)
TASK = "15-1"


def bench_data(args):



    transforms = {"barm": train_transform(args.size), "mib": mib_train_transform(args.size)}
    steps = get_task("voc", TASK)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        samples = []
        width, height = VOC_IMAGE_SIZE
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(args.images):  # smooth content with texture and noise, VOC-sized, quality 90 like photos
            base = np.stack([(xx * (i + 1) % 256), (yy * 3 % 256), ((xx + yy) * 2 % 256)], axis=-1)
            image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            label = ((xx // 50 + yy // 50 + i) % 21).astype(np.uint8)
            image_path, label_path = os.path.join(tmp, f"{i}.jpg"), os.path.join(tmp, f"{i}.png")
            Image.fromarray(image).save(image_path, quality=90)
            Image.fromarray(label).save(label_path)
            samples.append((str(i), image_path, label_path))
        print(f"data pipeline, one process (= per DataLoader worker), {args.images} VOC-sized JPEGs"
              f" {width}x{height}, crop {args.size}, median of {args.repeats} passes")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        for name in args.transforms:
            lut = barm_lut(steps, 0, "train")
            dataset = IncrementalSegmentation(samples, lut, transforms[name])
            seconds, _ = timed(lambda: [dataset[i] for i in range(len(dataset))], args.repeats)
            print(f"  {name:<5} decode + augmentation: {len(dataset) / seconds:6.1f} images/s per worker")
            # --device_augment: the workers read and plan, the device decodes and transforms a batch at a time
            deferred = DeferredSegmentation(samples, lut, transforms[name])
            seconds, items = timed(lambda: [deferred[i] for i in range(len(deferred))], args.repeats)
            batches = [deferred_collate(transforms[name])(items[i:i + args.batch])
                       for i in range(0, len(items) - args.batch + 1, args.batch)]

            def materialize():
                for batch in batches:
                    batch.materialize(device)
                synchronize(device)

            materialize()  # warm-up (CUDA context, nvJPEG handles)
            device_seconds, _ = timed(materialize, args.repeats)
            print(f"  {name:<5} --device_augment: workers {len(deferred) / seconds:6.1f} images/s per worker,"
                  f" {device} decode + augmentation {len(batches) * args.batch / device_seconds:6.1f} images/s"
                  f" (batches of {args.batch})")


def bench_index(args):

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = os.path.join(tmp, "ADEChallengeData2016")
        start = time.perf_counter()
        generate("ade", root, n_train=args.n, n_val=1, size=args.size, workers=args.workers, labels_only=True)
        for name in os.listdir(os.path.join(root, "annotations", "training")):  # the index reads labels only
            open(os.path.join(root, "images", "training", name[:-4] + ".jpg"), "wb").close()
        print(f"generated {args.n} ADE-style labels (~{args.size} px) in {time.perf_counter() - start:.1f} s")

        def build():
            cache = tempfile.mkdtemp(dir=tmp)
            return split_class_index("ade", root, "train", cache_dir=cache, workers=args.workers)

        full, (samples, _) = timed(build, args.repeats)
        cache = tempfile.mkdtemp(dir=tmp)
        split_class_index("ade", root, "train", cache_dir=cache, workers=args.workers)
        reload, _ = timed(lambda: split_class_index("ade", root, "train", cache_dir=cache), max(3, args.repeats))
        print(f"class index, full build:    {full:7.2f} s  ({len(samples)} labels, {args.workers or 'all'} threads,"
              f" {len(samples) / full:.0f} labels/s)")
        print(f"class index, cached reload: {reload:7.3f} s  (file listing + change check + load)")
