"""The settings of each step: a method's published run by default, and where every value came from.

``python train.py --method M --dataset D --task T`` with nothing else runs M's published protocol for D at every
step: the trainer's common flags that M's published run sets (:class:`methods.base.Published`: crop, evaluation
crop, schedule, epochs, global batch, learning rate, weight decay, seed, output stride, precision) take its
values for that step, and the reference behaviour the published numbers depend on is on, bugs included. A value
given on the command line (or by a recipe) wins; a flag the method publishes nothing for takes ciss's generic
default (BARM's argparser). Every deviation from the reference that changes numbers is a named flag
(:data:`DEVIATIONS` here, ``Method.deviations`` for a method's own) and ``--clean`` turns all of them on.

:func:`resolve_step` returns the read-only :class:`engine.config.RunConfig` of one step; its ``source(name)``
says where each value came from ("command line", "recipe NAME", "published: ...", "clean (--clean)", "default",
"method default: ...").
"""
import dataclasses

from methods.base import PUBLISHED_FLAGS, Deviation
from utils.errors import UserError

CLEAN = "clean (--clean)"
DEFAULT = "default"

#: ciss's defaults for a flag a method publishes nothing for: BARM's argparser (BARM utils/parser.py).
GENERIC = {"crop_size": 513, "crop_val": False, "lr_policy": "warm_poly", "train_epoch": 50, "global_batch": 32,
           "lr": 0.01, "weight_decay": 1e-4, "random_seed": 1, "output_stride": 16, "amp": False,
           "gpus": 1, "sync_gradients": True, "bn_chunks": 1, "held_out_test": False}
MIN_FEATURE_PIXELS = 3  # a crop must give feature maps of at least this many pixels per side

#: The trainer's deviations from the references (a method's own are its ``deviations``).
DEVIATIONS = (
    Deviation("select_best", False,
              "BARM and KProBA start step 1 from step 0's best-validated weights, SSUL every step from its best"
              " (BARM trainer/trainer.py::Trainer.init_ckpt, SSUL main.py::main)",
              "VOC's validation images are its test images: the weights are chosen on the test set"),
    Deviation("sync_gradients", True,
              "BARM's steps t > 0 (and KProBA's on ADE) ran on 2 GPUs whose gradients were never averaged (the"
              " model's module is called, not the DDP wrapper: BARM trainer/trainer.py::Trainer.train): the saved"
              " model is rank 0"
              " alone, batch 8 (ADE: 4), on its fixed half of the images, in the same order every epoch",
              "half the images are never seen, the batch is not the one stated, and the order never changes"),
    Deviation("bn_chunks", 1,
              "SSUL ran under DataParallel on 2 GPUs (SSUL README, --gpu_id 0,1): BatchNorm statistics of each GPU's"
              " half of the batch, running statistics from the first GPU's half",
              "the statistics depend on how many GPUs ran the step"),
    Deviation("held_out_test", True,
              "PLOP and RCIL test Cityscapes step t on the held-out 20% of a new shuffle of all the domains of steps"
              " 0..t (PLOP run.py::get_dataset, dataset/cityscapes_domain.py::CityscapesSegmentationDomain.__init__):"
              " for t >= 1 most of those images were trained on at earlier steps",
              "the published Cityscapes numbers are partly measured on training images (of the 695 final test"
              " images, 496 were trained on in 11-5, 501 in 11-1, 541 in 1-1)"),
)


def deviations_of(method_cls):
    """Every deviation a run of ``method_cls`` has: the method's own, then the trainer's."""
    return tuple(method_cls.deviations) + DEVIATIONS


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def bn_chunks_per_process(config, bn_trains, world_size):
    """``--bn_chunks N``: BatchNorm statistics per chunk of the global batch, as DataParallel over N GPUs computed
    them; each forward (one micro-batch of one process) takes N / (processes x ``accumulate``) of the chunks (no
    SyncBatchNorm then). Where BatchNorm does not train the chunks change nothing: 1; where a micro-batch is a
    published chunk or a part of one: 1 (statistics per micro-batch). Raises :class:`UserError` when neither
    divides the other."""
    if not bn_trains or config.bn_chunks <= 1:
        return 1
    forwards = world_size * config.accumulate
    if config.bn_chunks % forwards == 0:
        return config.bn_chunks // forwards
    if forwards % config.bn_chunks == 0:
        return 1
    if config.accumulate == 1:
        raise UserError(f"--bn_chunks {config.bn_chunks} does not divide over {world_size} processes: run"
                        f" {', '.join(str(d) for d in divisors(config.bn_chunks))} processes, or give --bn_chunks 1")
    raise UserError(f"--bn_chunks {config.bn_chunks} does not divide over {world_size} processes x --accumulate"
                    f" {config.accumulate} micro-batches: make their product a divisor or a multiple of"
                    f" {config.bn_chunks}, or give --bn_chunks 1")


def _accumulation(config, per_process, step, take):
    """``accumulate`` (micro-batches per optimizer step) and ``micro_batch`` (the loader's batch per process) of a
    step whose batch per process is ``per_process``: ``--accumulate K`` splits it in K, ``--micro_batch B`` in
    batches of B; one that does not split evenly is refused with one line naming the values that do."""
    if config.micro_batch is not None:
        micro, flag = config.micro_batch, f"--micro_batch {config.micro_batch}"
        if per_process % micro:
            raise UserError(f"{flag} does not divide step {step}'s batch of {per_process} per process: use one of"
                            f" {', '.join(str(d) for d in divisors(per_process))}")
        take("micro_batch", micro, "--micro_batch")
        take("accumulate", per_process // micro, f"batch {per_process} per process / --micro_batch {micro}")
        return
    count = 1 if config.accumulate is None else config.accumulate
    if per_process % count:
        raise UserError(f"--accumulate {count} does not divide step {step}'s batch of {per_process} per process"
                        f" into equal micro-batches: use one of {', '.join(str(d) for d in divisors(per_process))}")
    take("accumulate", count, "--accumulate" if config.accumulate is not None else DEFAULT)
    take("micro_batch", per_process // count,
         f"batch {per_process} per process / {count}" if count > 1 else "the batch per process")


def _published(method, task, step):
    """``{name: (value, source)}`` of the method's published run at ``step`` (empty without one)."""
    published = method.published()
    if published is None:
        return {}
    source = f"published: {published.source}"
    return {name: (value, source) for name, value in published.for_step(task, step).items()}


def resolve_step(config, method, step, world_size):
    """The :class:`engine.config.RunConfig` of step ``step`` for ``world_size`` processes.

    Every common flag the command line leaves unset takes the method's published value for the step, else ciss's
    generic default; the trainer's deviations take the reference behaviour (``--clean``: ciss's), the method's
    hyper-parameters are recorded with their source. Batches: ``--batch_size`` keeps BARM's meaning (per process;
    the global batch is batch x processes); otherwise the global batch (``--global_batch``, else the published
    one) is divided over the processes, and one that does not divide is refused with one line naming the valid
    process counts. Where the published run's GPUs never averaged their gradients (``--no_sync_gradients``), the
    run reproduces rank 0 alone: the global batch is rank 0's (the published one over the published GPUs; with
    ``--batch_size B``, B: each reference GPU's batch), trained on rank 0's share of the images
    (``reference_shards``) and divided over this run's processes. ``--accumulate`` / ``--micro_batch`` then
    split the batch per process into micro-batches (:func:`_accumulation`): the global batch does not change."""
    explicit = set(config.explicit)
    published = _published(method, config.task, step)
    values, sources = {}, {}

    def take(name, value, source):
        values[name], sources[name] = value, source

    for name in PUBLISHED_FLAGS + ("gpus",):
        if name not in explicit:
            take(name, *published.get(name, (GENERIC[name], DEFAULT)))
    for deviation in DEVIATIONS:
        if deviation.flag in explicit:
            continue
        if config.clean:
            take(deviation.flag, deviation.clean, CLEAN)
        elif deviation.flag == "select_best":
            take("select_best", None, f"{method.name}'s rule (Method.selects_best)")
        else:
            take(deviation.flag, *published.get(deviation.flag, (GENERIC[deviation.flag], DEFAULT)))

    def value(name):
        return values[name] if name in values else getattr(config, name)

    for field in dataclasses.fields(method.hp):
        if field.name not in explicit:
            clean = {d.flag: d.clean for d in method.deviations}
            take(field.name, getattr(method.hp, field.name),
                 CLEAN if config.clean and field.name in clean else f"method default: {method.name}'s reference value")
    shards = 1 if value("sync_gradients") else max(1, value("gpus"))
    take("reference_shards", shards, "--sync_gradients" if shards == 1 else
         f"rank 0 of the published run's {shards} unsynchronised GPUs")
    if "batch_size" in explicit and shards == 1:
        take("global_batch", config.batch_size * world_size, f"--batch_size x {world_size} processes")
    elif "batch_size" in explicit:  # each unsynchronised reference GPU trained on --batch_size images
        if config.batch_size % world_size:
            choices = ", ".join(str(d) for d in divisors(config.batch_size))
            raise UserError(f"--batch_size {config.batch_size} (the batch of rank 0 of the published run's {shards}"
                            f" unsynchronised GPUs) does not divide over {world_size} processes: run {choices}"
                            " processes, or add --sync_gradients")
        take("global_batch", config.batch_size, f"--batch_size (rank 0's of {shards} unsynchronised GPUs)")
        take("batch_size", config.batch_size // world_size,
             f"--batch_size {config.batch_size} / {world_size} processes")
    else:
        replica = value("global_batch") // shards
        if replica * shards != value("global_batch") or replica % world_size:
            choices = ", ".join(str(d) for d in divisors(replica))
            raise UserError(f"the global batch {replica} of step {step} does not divide over {world_size}"
                            f" processes: run {choices} processes, or give --batch_size (per process)")
        take("global_batch", replica, sources.get("global_batch", config.source("global_batch")) +
             (f" / {shards} unsynchronised GPUs (rank 0's batch)" if shards > 1 else ""))
        take("batch_size", replica // world_size, f"global batch {replica} / {world_size} processes")
    _accumulation(config, value("batch_size"), step, take)
    crop, stride = value("crop_size"), value("output_stride")
    if crop < MIN_FEATURE_PIXELS * stride:
        raise UserError(f"--crop_size {crop} is too small for output stride {stride}: expected at least"
                        f" {MIN_FEATURE_PIXELS * stride} pixels")
    return config.resolved(values, sources)
