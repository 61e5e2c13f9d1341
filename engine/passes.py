"""What a method's before-step passes get: ready-to-use batches and the step's runtime settings.

A pass (``Method.before_step``: KProBA's prototypes, PLOP's entropy thresholds, SSUL-M / DKD-M memory
selection) iterates over :meth:`StepData.train_batches` (one pass over this process's training loader, with
augmentation, in an order and with augmentation seeds of its own, so that it is the same on every run) or
:meth:`StepData.batches` over any list of samples (e.g. :meth:`StepData.previous_samples`), and runs its
forward passes inside :meth:`StepData.autocast`. Batches are :class:`methods.base.Batch` objects: images
normalised on the device in the model's memory format, labels as int64 channel positions.
"""
import contextlib

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from datasets import label_values
from datasets.incremental import IncrementalSegmentation, label_lut
from engine.data import PASS_TAG, SeededDataset, SeededSampler, previous_samples, to_batch
from engine.models import pretrained_source
from utils.distributed import broadcast_object


def autocast(device, enabled):
    """fp16 autocast on CUDA, bf16 on the CPU (``--amp``); a no-op context when disabled."""
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                          enabled=enabled)


class StepData:
    """The data side of one step for before-step passes (see the module docstring)."""

    def __init__(self, ctx, config, dist_info, method, train_data, channels_last, spec):
        self.ctx, self.config, self.dist, self.method, self.spec = ctx, config, dist_info, method, spec
        self.train_data = train_data
        self.channels_last = channels_last

    @property
    def device(self):
        return self.dist.device

    @property
    def seed(self):
        """``--random_seed`` (the reference re-applies it at every step)."""
        return self.config.random_seed

    def autocast(self):
        """The training forward's autocast (``--amp``); passes that the reference ran in fp32 skip it."""
        return autocast(self.device, self.config.amp)

    def _prepared(self, loader):
        for raw in loader:
            yield to_batch(raw, self.device, self.channels_last)

    def train_batches(self):
        """One pass over this process's share of the step's training set (training transform, labels as in
        training, extras included; without the memory)."""
        return self._prepared(self.train_data.pass_loader())

    def previous_samples(self):
        """``[(id, image_path, label_path)]`` of step t-1's training list."""
        return previous_samples(self.ctx, self.config, self.dist, self.method)

    def fresh_model(self, classes_per_step):
        """A newly built model for ``classes_per_step`` (the run's backbone weights, the rest randomly
        initialised), in eval mode, frozen, on the device: the untrained model a reference used where it had not
        loaded the weights yet (DKD-M's memory selection)."""
        model = self.method.build_network(self.spec, classes_per_step, pretrained=pretrained_source(self.config))
        model = model.to(self.device).eval()
        return model.requires_grad_(False)

    def batches(self, samples, split="train", step=None, transform="eval", shard=False, batch_size=None):
        """Batches over ``samples`` in their order: labels through the method's table for ``split`` at
        ``step`` (default: the ctx's), the "eval" transform (resize + centre crop at ``--crop_size``) or the
        "train" one, the method's extra maps; every sample on every process unless ``shard``."""
        step = self.ctx.step if step is None else step
        lut = label_lut([list(s) for s in self.ctx.steps], step, split, self.method.label_policy,
                        label_values(self.ctx.dataset, self.ctx.data_root))
        transform = (self.method.train_transform(self.config.crop_size) if transform == "train"
                     else self.method.eval_transform(self.config.crop_size, True))
        dataset = IncrementalSegmentation(samples, lut, transform,
                                          extra_maps=self.method.extra_maps(self.ctx, self.ctx.data_root))
        if shard:
            dataset = Subset(dataset, list(range(self.dist.rank, len(dataset), self.dist.world_size)))
        # in order, each sample augmented (with the "train" transform) from its own seed, as in training
        sampler = SeededSampler(dataset, 1, 0, self.config.random_seed, self.ctx.step, PASS_TAG, shuffle=False)
        loader = DataLoader(SeededDataset(dataset, len(dataset)), batch_size=batch_size or self.config.batch_size,
                            sampler=sampler,
                            num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda")
        return self._prepared(loader)

    def all_reduce(self, tensor):
        """Sum ``tensor`` over the processes in place (no-op on one process); returns it."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process."""
        return broadcast_object(obj)

    @contextlib.contextmanager
    def eval_mode(self, *models):
        """Models in eval mode for the duration, restored afterwards."""
        modes = [[m.training for m in model.modules()] for model in models]
        for model in models:
            model.eval()
        try:
            yield
        finally:
            for model, flags in zip(models, modes):
                for module, flag in zip(model.modules(), flags):
                    module.train(flag)
