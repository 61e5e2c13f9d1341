"""Data loaders of a step: training (sharded, reshuffled every epoch, with the method's memory), validation
and test (sharded, exact), and the conversion of loader output into a device :class:`methods.base.Batch`.

Training uses a ``DistributedSampler`` in every case (one replica when single-process), so the order of an
epoch depends only on ``(random_seed, epoch)`` and the union of the ranks' first batches is the single
process's first batch of the same global size. Augmentation randomness is reseeded from
``(random_seed, step, epoch, rank)`` at the start of every epoch, in the loader's workers and in the main
process, so an epoch can be replayed exactly (``--resume``). Evaluation splits the images over the ranks
without padding and sums the confusion matrices, so every image counts once.

The method decides the transforms, the label table (its ``label_policy``), the extra per-sample maps and the
memory. Memory samples (image ids from earlier steps' training lists) either replace a fraction of every
batch (``memory_mode = "replace"``, SSUL-M) or join the training set (``"concat"``, DKD-M); either way a
batch knows which of its samples came from the memory (``Batch.memory``).
"""
import os
import random

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler, Subset

from datasets import get_layout, step_samples
from datasets.incremental import IncrementalSegmentation, label_lut
from datasets.transforms import normalize
from methods.base import Batch
from utils.distributed import main_first
from utils.errors import UserError

MEMORY_KEY = "memory"  # extras entry that tags memory samples (popped into Batch.memory)
PASS_PURPOSE = 1  # seed-sequence tag of the before-step passes (training epochs use none)


def _samples(plan, split, args, dist_info, step=None):
    """The samples of ``split`` at ``step`` (default: the plan's); rank 0 goes first (it may build the class
    index), the others read its cache."""
    step = plan.step if step is None else step
    return main_first(lambda: step_samples(plan.dataset, plan.data_root, [list(s) for s in plan.steps], step,
                                           plan.overlap, split, cache_dir=args.cache_dir), dist_info)


def epoch_seed(seed, step, epoch, rank, *purpose):
    return int(np.random.SeedSequence([seed, step, epoch, rank, *purpose]).generate_state(1)[0])


def class_names(plan):
    """Names of the model's channels, in channel order."""
    names = get_layout(plan.dataset).CLASS_NAMES
    return [names[c] for s in plan.steps[:plan.step + 1] for c in s]


class _Tagged(torch.utils.data.Dataset):
    """A dataset whose items say whether they come from the memory (``extras[MEMORY_KEY]``)."""

    def __init__(self, dataset, memory):
        self.dataset, self.memory = dataset, memory

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label, extras, image_id = self.dataset[i]
        return image, label, {**extras, MEMORY_KEY: torch.tensor(self.memory)}, image_id


def to_batch(raw, device, channels_last):
    """A loader batch ``(images uint8, labels uint8, extras, ids)`` as a :class:`Batch` on ``device``:
    images normalised (float32, channels-last when asked), labels int64, extras uint8."""
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


class TrainData:
    """The training loader of a step, its per-epoch reseeding and the method's memory."""

    def __init__(self, plan, args, dist_info, method):
        self.plan, self.args, self.dist, self.method = plan, args, dist_info, method
        self.extra_maps = method.extra_maps(plan, plan.data_root)
        self.transform = method.train_transform(args.crop_size)
        steps = [list(s) for s in plan.steps]
        samples = _samples(plan, "train", args, dist_info)
        check_images_nonempty(samples)
        self.current = IncrementalSegmentation(samples,
                                               label_lut(steps, plan.step, "train", method.label_policy),
                                               self.transform, extra_maps=self.extra_maps)
        self.memory = None  # the memory dataset, once set
        self.memory_loader = None
        self.seed, self.step, self.rank = args.random_seed, plan.step, dist_info.rank
        self._build(_Tagged(self.current, False))

    def _loader(self, dataset, seed_offset=0):
        sampler = DistributedSampler(dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                     shuffle=True, seed=self.seed + seed_offset, drop_last=False)
        loader = DataLoader(dataset, batch_size=self.args.batch_size, sampler=sampler,
                            num_workers=self.args.num_workers, pin_memory=self.dist.device.type == "cuda",
                            drop_last=True, generator=torch.Generator())
        return sampler, loader

    def _build(self, dataset):
        self.dataset = dataset
        self.sampler, self.loader = self._loader(dataset)
        if len(self.loader) == 0:
            raise UserError(f"step {self.plan.step} of {self.plan.task} ({self.plan.setting}) has"
                            f" {len(self.sampler)} training images per process, fewer than --batch_size"
                            f" {self.args.batch_size}")

    def set_memory(self, image_ids):
        """Use the memory ``image_ids`` (from the training lists of earlier steps) as the method says."""
        if not image_ids:
            return
        plan, method = self.plan, self.method
        wanted = set(image_ids)
        samples = [s for s in get_layout(plan.dataset).list_split(plan.data_root, "train") if s[0] in wanted]
        if len(samples) != len(wanted):
            missing = sorted(wanted - {s[0] for s in samples})
            raise UserError(f"memory image {missing[0]} is not in the training list of {plan.data_root}")
        steps = [list(s) for s in plan.steps]
        lut = label_lut(steps, plan.step, method.memory_split, method.label_policy)
        self.memory = IncrementalSegmentation(samples, lut, self.transform, extra_maps=self.extra_maps)
        if method.memory_mode == "concat":
            self._build(ConcatDataset([_Tagged(self.current, False), _Tagged(self.memory, True)]))
            return
        if method.memory_mode != "replace":
            raise ValueError(f"unknown memory_mode {method.memory_mode!r}")
        # SSUL-M (spec §12.4): the list is repeated until it fills a batch on every process
        needed = self.args.batch_size * self.dist.world_size
        repeats = -(-needed // len(samples))
        memory = _Tagged(ConcatDataset([self.memory] * repeats), True)
        self.memory_sampler, self.memory_loader = self._loader(memory, seed_offset=1)

    def __len__(self):
        return len(self.loader)

    def _seed(self, epoch, *purpose):
        seed = epoch_seed(self.seed, self.step, epoch, self.rank, *purpose)
        self.loader.generator.manual_seed(seed)  # worker seeds of this epoch
        random.seed(seed)  # augmentation in the main process when num_workers is 0
        return seed

    def epoch(self, epoch):
        """The loader for ``epoch`` with its sampler order and augmentation seeds set."""
        self.sampler.set_epoch(epoch)
        self._seed(epoch)
        return self.loader

    def pass_loader(self):
        """The training loader for a before-step pass: its own order and augmentation seeds."""
        self.sampler.set_epoch(np.iinfo(np.int32).max)
        self._seed(0, PASS_PURPOSE)
        return self.loader

    def memory_batches(self, epoch):
        """An endless iterator of memory batches for ``epoch`` (None without a replacing memory); restarts
        with a new order when exhausted."""
        if self.memory_loader is None:
            return None

        def cycle():
            for cycle_index in range(np.iinfo(np.int32).max):
                self.memory_sampler.set_epoch(epoch * 1000 + cycle_index)
                self.memory_loader.generator.manual_seed(epoch_seed(self.seed, self.step, epoch, self.rank,
                                                                    cycle_index + 2))
                yield from self.memory_loader

        return cycle()

    def replace_with_memory(self, batch, memory_batch):
        """Replace ``memory_fraction`` of the batch's samples, at random slots (``randperm``, as SSUL), by the
        memory batch's samples at the same slots."""
        size = batch.images.shape[0]
        slots = torch.randperm(size)[:int(size * self.method.memory_fraction())].to(batch.images.device)
        batch.images[slots] = memory_batch.images[slots]
        batch.labels[slots] = memory_batch.labels[slots]
        for name, value in batch.extras.items():
            value[slots] = memory_batch.extras[name][slots]
        batch.memory[slots] = True
        replaced = set(slots.tolist())
        batch.ids = tuple(memory_batch.ids[i] if i in replaced else image_id for i, image_id in enumerate(batch.ids))
        return batch


def eval_loader(plan, args, split, dist_info, method):
    """Validation ("val": images with the step's classes, labels as in training) or test (the method's
    ``test_split``: "test" = the whole validation list, "test_seen" = images with a seen class; every seen
    class labelled) loader; this rank's share of the images, without padding."""
    split = method.test_split if split == "test" else split
    samples = _samples(plan, split, args, dist_info)
    lut = label_lut([list(s) for s in plan.steps], plan.step, "val" if split == "val" else "test",
                    method.label_policy)
    dataset = IncrementalSegmentation(samples, lut, method.eval_transform(args.crop_size, args.crop_val))
    shard = Subset(dataset, list(range(dist_info.rank, len(dataset), dist_info.world_size)))
    return DataLoader(shard, batch_size=args.val_batch_size if args.crop_val else 1, shuffle=False,
                      num_workers=args.num_workers, pin_memory=dist_info.device.type == "cuda")


def previous_samples(plan, args, dist_info):
    """The training samples of step t-1 (SSUL-M / DKD-M memory candidates)."""
    return _samples(plan, "train", args, dist_info, step=plan.step - 1)
