"""Data loaders of a step: training (sharded, reshuffled every epoch), validation and test (sharded, exact).

Training uses a ``DistributedSampler`` in every case (one replica when single-process), so the order of an
epoch depends only on ``(random_seed, epoch)`` and the union of the ranks' first batches is the single
process's first batch of the same global size. Augmentation randomness is reseeded from
``(random_seed, step, epoch, rank)`` at the start of every epoch, in the loader's workers and in the main
process, so an epoch can be replayed exactly (``--resume``). Evaluation splits the images over the ranks
without padding and sums the confusion matrices, so every image counts once.
"""
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from datasets import get_layout, step_samples
from datasets.incremental import IncrementalSegmentation, label_lut
from datasets.transforms import eval_transform, train_transform
from utils.distributed import main_first
from utils.errors import UserError


def _samples(plan, split, args, dist_info):
    """The step's samples; rank 0 goes first (it may build the class index), the others read its cache."""
    return main_first(lambda: step_samples(plan.dataset, plan.data_root, [list(s) for s in plan.steps], plan.step,
                                           plan.overlap, split, cache_dir=args.cache_dir), dist_info)


def epoch_seed(seed, step, epoch, rank):
    return int(np.random.SeedSequence([seed, step, epoch, rank]).generate_state(1)[0])


class TrainData:
    """The training loader of a step and its per-epoch reseeding."""

    def __init__(self, plan, args, dist_info, label_policy):
        samples = _samples(plan, "train", args, dist_info)
        lut = label_lut([list(s) for s in plan.steps], plan.step, "train", label_policy)
        self.dataset = IncrementalSegmentation(samples, lut, train_transform(args.crop_size))
        self.sampler = DistributedSampler(self.dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                          shuffle=True, seed=args.random_seed, drop_last=False)
        self.loader = DataLoader(self.dataset, batch_size=args.batch_size, sampler=self.sampler,
                                 num_workers=args.num_workers, pin_memory=dist_info.device.type == "cuda",
                                 drop_last=True, generator=torch.Generator())
        self.seed, self.step, self.rank = args.random_seed, plan.step, dist_info.rank
        if len(self.loader) == 0:
            raise UserError(f"step {plan.step} of {plan.task} ({plan.setting}) has {len(self.sampler)} training"
                            f" images per process, fewer than --batch_size {args.batch_size}")

    def __len__(self):
        return len(self.loader)

    def epoch(self, epoch):
        """The loader for ``epoch`` with its sampler order and augmentation seeds set."""
        self.sampler.set_epoch(epoch)
        seed = epoch_seed(self.seed, self.step, epoch, self.rank)
        self.loader.generator.manual_seed(seed)  # worker seeds of this epoch
        random.seed(seed)  # augmentation in the main process when num_workers is 0
        return self.loader


def eval_loader(plan, args, split, dist_info, label_policy):
    """Validation ("val": images with the step's classes, labels as in training) or test ("test": the
    whole validation list, every seen class) loader; this rank's share of the images, without padding."""
    samples = _samples(plan, split, args, dist_info)
    lut = label_lut([list(s) for s in plan.steps], plan.step, split, label_policy)
    dataset = IncrementalSegmentation(samples, lut, eval_transform(args.crop_size, args.crop_val))
    shard = Subset(dataset, list(range(dist_info.rank, len(dataset), dist_info.world_size)))
    return DataLoader(shard, batch_size=args.val_batch_size if args.crop_val else 1, shuffle=False,
                      num_workers=args.num_workers, pin_memory=dist_info.device.type == "cuda")


def class_names(plan):
    """Names of the model's channels, in channel order."""
    names = get_layout(plan.dataset).CLASS_NAMES
    return [names[c] for s in plan.steps[:plan.step + 1] for c in s]
