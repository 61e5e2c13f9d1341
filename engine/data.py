"""Data loaders of a step: training (sharded, reshuffled every epoch, with the method's memory), validation
and test (sharded, exact), and the conversion of loader output into a device :class:`methods.base.Batch`.

Training uses a ``DistributedSampler`` in every case (one replica when single-process), so the order of an
epoch depends only on ``(random_seed, epoch)`` and the union of the ranks' first batches is the single
process's first batch of the same global size. Every sample is augmented after seeding Python's ``random``
from ``(random_seed, step, epoch, sample index)``, so an epoch can be replayed exactly (``--resume``) and the
augmentation does not depend on the number of workers or processes; the workers persist for the whole step.
Evaluation splits the images over the ranks without padding and sums the confusion matrices, so every image
counts once.

The method decides the transforms, the label table (its ``label_policy``), the extra per-sample maps and the
memory (its ``memory`` hook, a :class:`methods.base.MemoryUse`). Memory samples (image ids from earlier steps'
training lists) either replace half of every batch (mode "replace", SSUL-M) or join the training set
("concat", DKD-M); either way a batch knows which of its samples came from the memory (``Batch.memory``).
"""
import dataclasses
import os
import random

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler, Subset

from datasets import get_layout, label_values, step_samples
from datasets.deferred import DeferredBatch, DeferredSegmentation, deferred_collate
from datasets.incremental import IncrementalSegmentation, label_lut
from datasets.transforms import normalize
from methods.base import Batch
from utils.distributed import main_first
from utils.errors import UserError

MEMORY_KEY = "memory"  # extras entry that tags memory samples (popped into Batch.memory)
MEMORY_TAG = 1  # seed-sequence tag of the memory loader's samples (training samples use 0)
PASS_TAG = 2  # seed-sequence tag of the samples of StepData.batches
PASS_EPOCH = np.iinfo(np.int32).max  # the sampler epoch of before-step passes (never a training epoch)
MEMORY_CYCLES = 1000
MEMORY_FRACTION = 0.5  # the share of every batch a replacing memory takes (SSUL-M: B // 2 samples)  # memory-loader epochs per training epoch (a memory restarts when exhausted)


def _samples(ctx, split, config, dist_info):
    """The samples of ``split`` at the ctx's step; rank 0 goes first (it may build the class index), the others
    read its cache."""
    return main_first(lambda: step_samples(ctx.dataset, ctx.data_root, [list(s) for s in ctx.steps], ctx.step,
                                           ctx.overlap, split, cache_dir=config.cache_dir, domains=ctx.domains,
                                           held_out_test=config.held_out_test), dist_info)


def train_samples(ctx, config, method, step=None, persist=True):
    """The images step ``step`` (default: the ctx's) trains on: those the overlap or disjoint filter keeps, or
    every image of the training list where the method says so (``Method.trains_on_every_image``). ``persist``:
    whether a class index built here is cached (not for ``--dry_run``)."""
    step = ctx.step if step is None else step
    if method.trains_on_every_image(dataclasses.replace(ctx, step=step)):
        return get_layout(ctx.dataset, ctx.data_root).list_split(ctx.data_root, "train")
    return step_samples(ctx.dataset, ctx.data_root, [list(s) for s in ctx.steps], step, ctx.overlap, "train",
                        cache_dir=config.cache_dir, persist=persist, domains=ctx.domains)


def class_names(ctx):
    """Names of the model's channels, in channel order."""
    names = get_layout(ctx.dataset, ctx.data_root).CLASS_NAMES
    return [names[c] for s in ctx.steps[:ctx.step + 1] for c in s]


def sample_seed(seed, step, epoch, index, tag=0):
    """The augmentation seed of one sample: a function of ``(random_seed, step, epoch, sample index, tag)``
    only, so that a sample is augmented alike whatever the number of loader workers or processes."""
    return int(np.random.SeedSequence([seed, step, epoch, index, tag]).generate_state(1)[0])


class SeededSampler(DistributedSampler):
    """A ``DistributedSampler`` whose items are ``(index, augmentation seed)`` (see :func:`sample_seed`); the
    loader's dataset (a :class:`SeededDataset`) seeds Python's ``random`` with it before transforming the sample."""

    def __init__(self, dataset, num_replicas, rank, seed, step, tag=0, shuffle=True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.step, self.tag = step, tag

    def __iter__(self):
        for index in super().__iter__():
            yield index, sample_seed(self.seed, self.step, self.epoch, index, self.tag)


class ReferenceShardSampler(torch.utils.data.Sampler):
    """The images and order of rank 0 of a published run whose ``shards`` processes never averaged their gradients
    (BARM's and KProBA's steps t > 0: BARM datasets/init_dataset.py::init_dataloader): a ``DistributedSampler`` of
    ``shards`` replicas, rank 0, seed 0, whose ``set_epoch`` was never called, so every epoch has the same order.
    Its images come in batches of ``replica_batch`` (rank 0's batch), each split over this run's ``num_replicas``
    processes (process ``rank`` takes its contiguous part), so that the processes together, averaging their
    gradients, train rank 0's batches. Items are ``(index, augmentation seed)`` as :class:`SeededSampler`'s; the
    augmentation still differs per epoch, as the reference's."""

    def __init__(self, dataset, shards, replica_batch, num_replicas, rank, seed, step, tag=0):
        order = list(DistributedSampler(dataset, num_replicas=shards, rank=0, shuffle=True, seed=0, drop_last=False))
        part = replica_batch // num_replicas
        self.indices = [order[b * replica_batch + rank * part + i]
                        for b in range(len(order) // replica_batch) for i in range(part)]
        self.seed, self.step, self.tag, self.epoch = seed, step, tag, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        for index in self.indices:
            yield index, sample_seed(self.seed, self.step, self.epoch, index, self.tag)


class SeededDataset(torch.utils.data.Dataset):
    """A training dataset for a :class:`SeededSampler`: item ``(index, seed)`` is the sample ``index``
    transformed after ``random.seed(seed)``, its extras saying whether it comes from the memory: samples with
    an index of at least ``memory_from`` do (0: all, ``len(dataset)``: none)."""

    def __init__(self, dataset, memory_from):
        self.dataset, self.memory_from = dataset, memory_from

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        random.seed(seed)  # the transforms draw from Python's random (as the references')
        image, label, extras, image_id = self.dataset[index]
        return image, label, {**extras, MEMORY_KEY: index >= self.memory_from}, image_id


def to_batch(raw, device, channels_last):
    """A loader batch ``(images uint8, labels uint8, extras, ids)`` (or a ``--device_augment``
    :class:`datasets.deferred.DeferredBatch`, decoded and transformed on ``device`` first) as a :class:`Batch` on
    ``device``: images normalised (float32, channels-last when asked), labels int64, extras uint8."""
    if isinstance(raw, DeferredBatch):
        raw = raw.materialize(device)
    images, labels, extras, ids = raw
    images = normalize(images.to(device, non_blocking=True))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    extras = dict(extras)
    memory = extras.pop(MEMORY_KEY, None)
    memory = (torch.zeros(len(ids), dtype=torch.bool) if memory is None else memory.bool()).to(device)
    return Batch(images=images, labels=labels.to(device, non_blocking=True).long(),
                 extras={k: v.to(device, non_blocking=True) for k, v in extras.items()}, memory=memory, ids=ids)


def check_images_nonempty(samples):
    """An empty image file stops the run now, before anything is written (labels are checked by the class
    index; a corrupt image is reported when it is decoded)."""
    for _, image_path, _ in samples:
        if os.path.getsize(image_path) == 0:
            raise UserError(f"image {image_path} is empty (0 bytes): expected a JPEG or PNG image")


class MicroBatchGroups:
    """``loader``'s batches in lists of ``size`` (the micro-batches of one optimizer step); ``len`` = full lists."""

    def __init__(self, loader, size):
        self.loader, self.size = loader, size

    def __len__(self):
        return len(self.loader) // self.size

    def __iter__(self):
        batches = iter(self.loader)
        for _ in range(len(self)):
            yield [next(batches) for _ in range(self.size)]


class TrainData:
    """The training loader of a step, its per-epoch reseeding and the method's memory."""

    def __init__(self, ctx, config, dist_info, method):
        self.ctx, self.config, self.dist, self.method = ctx, config, dist_info, method
        self.extra_maps = method.extra_maps(ctx, ctx.data_root)
        self.transform = method.train_transform(config.crop_size)
        steps = [list(s) for s in ctx.steps]
        samples = main_first(lambda: train_samples(ctx, config, method), dist_info)
        check_images_nonempty(samples)
        # --device_augment: the workers read and plan, the training device decodes and transforms
        self.dataset_class = DeferredSegmentation if config.device_augment else IncrementalSegmentation
        self.collate = deferred_collate(self.transform) if config.device_augment else None
        self.values = label_values(ctx.dataset, ctx.data_root)
        self.current = self.dataset_class(samples, label_lut(steps, ctx.step, "train", method.label_policy,
                                                             self.values),
                                          self.transform, extra_maps=self.extra_maps)
        self.memory = self.memory_use = None  # the memory dataset and the method's MemoryUse, once set
        self.memory_loader = None
        self.seed, self.step, self.rank = config.random_seed, ctx.step, dist_info.rank
        self._build(SeededDataset(self.current, len(self.current)))

    def _loader(self, dataset, tag=0):
        shards, world = self.config.reference_shards, self.dist.world_size
        if shards > 1 and tag == 0:  # rank 0 of an unsynchronised published run (--no_sync_gradients)
            sampler = ReferenceShardSampler(dataset, shards, self.config.batch_size * world, world, self.dist.rank,
                                            self.seed, self.step, tag)
        else:
            sampler = SeededSampler(dataset, world, self.dist.rank, self.seed, self.step, tag)
        workers = self.config.num_workers
        loader = DataLoader(dataset, batch_size=self.config.micro_batch, sampler=sampler, num_workers=workers,
                            pin_memory=self.dist.device.type == "cuda" and self.collate is None, drop_last=True,
                            persistent_workers=workers > 0,  # workers live for the step: no restart per epoch
                            collate_fn=self.collate)
        return sampler, loader

    def _build(self, dataset):
        self.dataset = dataset
        self.sampler, self.loader = self._loader(dataset)
        if len(self) == 0:
            config = self.config
            batch = (f"--batch_size {config.batch_size}" if "batch_size" in config.explicit else
                     f"its batch of {config.batch_size} per process (global batch {config.global_batch})")
            raise UserError(f"step {self.ctx.step} of {self.ctx.task} ({self.ctx.setting}) has"
                            f" {len(self.sampler)} training images per process, fewer than {batch}")

    def set_memory(self, memory):
        """Use the method's memory (a :class:`methods.base.MemoryUse` of image ids from the training lists of
        earlier steps, or None): its samples join the training set or replace half of every batch."""
        if memory is None or not memory.ids:
            return
        ctx, method = self.ctx, self.method
        wanted = set(memory.ids)
        samples = [s for s in get_layout(ctx.dataset, ctx.data_root).list_split(ctx.data_root, "train")
                   if s[0] in wanted]
        if len(samples) != len(wanted):
            missing = sorted(wanted - {s[0] for s in samples})
            raise UserError(f"memory image {missing[0]} is not in the training list of {ctx.data_root}")
        steps = [list(s) for s in ctx.steps]
        lut = label_lut(steps, ctx.step, memory.label_split, method.label_policy, self.values)
        self.memory_use = memory
        self.memory = self.dataset_class(samples, lut, self.transform, extra_maps=self.extra_maps)
        if memory.mode == "concat":
            self._build(SeededDataset(ConcatDataset([self.current, self.memory]), len(self.current)))
            return
        if memory.mode != "replace":
            raise ValueError(f"unknown memory mode {memory.mode!r}")
        # SSUL-M (SSUL datasets/voc.py::__init__): the list is repeated until it fills a batch on every process
        needed = self.config.micro_batch * self.dist.world_size
        repeats = -(-needed // len(samples))
        dataset = SeededDataset(ConcatDataset([self.memory] * repeats), 0)
        self.memory_sampler, self.memory_loader = self._loader(dataset, tag=MEMORY_TAG)

    def __len__(self):
        """Optimizer steps per epoch (groups of ``accumulate`` loader batches)."""
        return len(MicroBatchGroups(self.loader, self.config.accumulate))

    def epoch(self, epoch):
        """The iterations of ``epoch`` (its sampler's order and its samples' augmentation seeds), each a list
        of ``accumulate`` loader batches (a last incomplete group is dropped, as the loader drops a last
        incomplete batch)."""
        self.sampler.set_epoch(epoch)
        return MicroBatchGroups(self.loader, self.config.accumulate)

    def pass_loader(self):
        """The training loader for a before-step pass: an order and augmentation seeds of its own."""
        self.sampler.set_epoch(PASS_EPOCH)
        return self.loader

    def memory_batches(self, epoch):
        """An endless iterator of memory batches for ``epoch`` (None without a replacing memory); restarts
        with a new order when exhausted."""
        if self.memory_loader is None:
            return None

        def cycle():
            for cycle_index in range(MEMORY_CYCLES):
                self.memory_sampler.set_epoch(epoch * MEMORY_CYCLES + cycle_index)
                yield from self.memory_loader

        return cycle()

    def replace_with_memory(self, batch, memory_batch):
        """Replace half of the batch's samples, at random slots (``randperm``, as SSUL's memory loader), by the
        memory batch's samples at the same slots."""
        size = batch.images.shape[0]
        slots = torch.randperm(size)[:int(size * MEMORY_FRACTION)].to(batch.images.device)
        batch.images[slots] = memory_batch.images[slots]
        batch.labels[slots] = memory_batch.labels[slots]
        for name, value in batch.extras.items():
            value[slots] = memory_batch.extras[name][slots]
        batch.memory[slots] = True
        replaced = set(slots.tolist())
        batch.ids = tuple(memory_batch.ids[i] if i in replaced else image_id for i, image_id in enumerate(batch.ids))
        return batch


def eval_loader(ctx, config, split, dist_info, method):
    """Validation ("val": images with the step's classes, labels as in training) or test (the method's
    ``test_split``: "test" = the whole validation list, "test_seen" = images with a seen class; every seen
    class labelled) loader; this rank's share of the images, without padding."""
    split = method.test_split if split == "test" else split
    samples = _samples(ctx, split, config, dist_info)
    lut = label_lut([list(s) for s in ctx.steps], ctx.step, "val" if split == "val" else "test",
                    method.label_policy, label_values(ctx.dataset, ctx.data_root))
    dataset = IncrementalSegmentation(samples, lut, method.eval_transform(config.crop_size, config.crop_val))
    shard = Subset(dataset, list(range(dist_info.rank, len(dataset), dist_info.world_size)))
    return DataLoader(shard, batch_size=config.val_batch_size if config.crop_val else 1, shuffle=False,
                      num_workers=config.num_workers, pin_memory=dist_info.device.type == "cuda")


def previous_samples(ctx, config, dist_info, method):
    """The training samples of step t-1 (SSUL-M / DKD-M memory candidates)."""
    return main_first(lambda: train_samples(ctx, config, method, step=ctx.step - 1), dist_info)
