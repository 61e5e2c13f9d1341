"""Command line of ``train.py``: BARM's flags with their names and meaning (BARM utils/parser.py::get_argparser), plus
the flags ciss adds, plus one flag per hyper-parameter of the selected ``--method``.

BARM flags that had no effect there either work now (``--print_interval``, ``--val_interval``, ``--ckpt``
as an alias of ``--prev_ckpt``) or are gone (``--num_classes``, ``--curr_itrs``, ``--separable_conv``,
``--gpu_id``: use ``CUDA_VISIBLE_DEVICES``). Parsing is two-stage: ``--method`` and ``--dataset`` are read
first, so that the method's hyper-parameter flags, with their reference defaults for the dataset, can be
added (``python train.py --method ft --help`` lists FT's).
"""
import argparse
import dataclasses
import sys

from datasets import LAYOUTS, default_num_workers
from methods import get_method_class, list_methods
from methods.base import check_hyper_value
from network import list_models
from network.backbone import ARCHITECTURES
from engine.config import RunConfig
from utils.errors import USER_ERROR_EXIT_CODE, UserError
from utils.logging import DEFAULT_LOGGERS, LOGGERS, require_loggers
from utils.schedulers import POLICIES


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <message>`` on stderr, exit status 2."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)


def switch(parser, on, off, on_help, off_help):
    """``--ON`` / ``--OFF``, exclusive: the setting ``ON`` is True, False, or None when neither is given (the
    method's published run, or ciss's default, decides)."""
    pair = parser.add_mutually_exclusive_group()
    pair.add_argument(f"--{on}", dest=on, action="store_const", const=True, default=None, help=on_help)
    pair.add_argument(f"--{off}", dest=on, action="store_const", const=False, help=off_help)


def _selection(argv):
    pre = OneLineParser(add_help=False)
    pre.add_argument("--method", default="barm", choices=list_methods())
    pre.add_argument("--dataset", default="voc", choices=list(LAYOUTS))
    known, _ = pre.parse_known_args(argv)
    return known.method, known.dataset


def _add_method_flags(parser, method_cls, dataset):
    group = parser.add_argument_group(f"method '{method_cls.name}' hyper-parameters (reference defaults for"
                                      f" {dataset})")
    defaults = method_cls.default_hyper(dataset)
    for field in dataclasses.fields(defaults):
        default, meta = getattr(defaults, field.name), field.metadata
        if isinstance(default, bool):  # --name and --no_name both exist, so the references' scripts run as written
            switch = group.add_mutually_exclusive_group()
            state = "on; --no_" + field.name + " turns it off" if default else "off"
            switch.add_argument(f"--{field.name}", dest=field.name, action="store_true", default=default,
                                help=f"{meta['help']} (default: {state})")
            switch.add_argument(f"--no_{field.name}", dest=field.name, action="store_false", help=argparse.SUPPRESS)
        else:
            group.add_argument(f"--{field.name}", type=meta["type"], default=default, choices=meta.get("choices"),
                               help=f"{meta['help']} (default: %(default)s)")


def build_parser(method="barm", dataset="voc"):
    parser = OneLineParser(description="Class-incremental semantic segmentation: train steps curr_step..last"
                                       " (or step 0 only with --initial), or evaluate saved steps with --test.")
    data = parser.add_argument_group("data")
    data.add_argument("--data_root", required=True,
                      help="the VOC2012 folder (voc), the ADEChallengeData2016 folder (ade), the Cityscapes folder"
                           " with leftImg8bit/ and gtFine/ (cityscapes_domain), or a folder with a dataset.json"
                           " describing a dataset of your own (custom; docs/data.md)")
    data.add_argument("--dataset", default="voc", choices=list(LAYOUTS),
                      help="cityscapes_domain: domain-incremental Cityscapes, each step adds cities, the 19 classes"
                           " at every step (default: %(default)s)")
    data.add_argument("--task", default="15-1", help="task name, e.g. 15-1, 10-1, 100-10, or any X-Y"
                                                     " (default: %(default)s)")
    data.add_argument("--task_file", default=None, metavar="FILE.json",
                      help="custom class order (JSON list of class-id lists); runs are filed under its name")
    data.add_argument("--overlap", action="store_true", help="overlap setting (default: disjoint)")
    data.add_argument("--cache_dir", default=None, help="class-index cache folder (default: beside the data)")
    data.add_argument("--num_workers", type=int, default=default_num_workers(),
                      help="data-loading processes per training process (default: what this machine's CPUs"
                           " allow without oversubscription, at most 4: %(default)s here)")
    data.add_argument("--crop_size", type=int, default=None, help="training crop and --crop_val size"
                                                                  " (default: the method's published run)")
    switch(data, "crop_val", "no_crop_val",
        "validate/test on a centre crop after resizing the shorter side to --crop_size"
        " (default: the method's published run; without: full images, batch 1)",
        "validate/test on full images, batch 1")
    batch = data.add_mutually_exclusive_group()
    batch.add_argument("--batch_size", type=int, default=None,
                       help="training batch per process, as BARM's (default: the method's published global batch"
                            " divided over the processes)")
    batch.add_argument("--global_batch", type=int, default=None,
                       help="training batch of one optimizer step over all processes (default: the method's"
                            " published run's)")
    accumulate = data.add_mutually_exclusive_group()
    accumulate.add_argument("--accumulate", type=int, default=None, metavar="K",
                            help="split each process's batch into K micro-batches whose gradients are accumulated"
                                 " before one optimizer step: the same global batch in 1/K of the memory; BatchNorm"
                                 " statistics per micro-batch (default: 1)")
    accumulate.add_argument("--micro_batch", type=int, default=None, metavar="B",
                            help="the micro-batch per process instead: --accumulate follows (the batch per process"
                                 " / B)")
    data.add_argument("--val_batch_size", type=int, default=4,
                      help="validation/test batch with --crop_val (default: %(default)s)")

    model = parser.add_argument_group("model")
    model.add_argument("--method", default="barm", choices=list_methods(), help="(default: %(default)s)")
    model.add_argument("--model", default=None, choices=list_models(),
                       help="model name (default: the method's head on --backbone)")
    model.add_argument("--backbone", default=None, choices=list(ARCHITECTURES),
                       help="overrides the model name's backbone (default: resnet101)")
    model.add_argument("--output_stride", type=int, default=None, choices=(8, 16),
                       help="(default: the method's published run)")
    weights = model.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", default=None, metavar="PATH",
                         help="step-0 backbone weights: a torchvision ResNet state dict or a BARM/SSUL checkpoint"
                              " (default: torchvision's ImageNet weights, downloaded once into TORCH_HOME)")
    weights.add_argument("--no_pretrained", action="store_true", help="start step 0 from a random backbone")

    train = parser.add_argument_group("training")
    train.add_argument("--train_epoch", type=int, default=None,
                       help="epochs per step (default: the method's published run, per step)")
    train.add_argument("--lr", type=float, default=None,
                       help="learning rate (BARM: new head and ear at t>0 only) (default: the method's published"
                            " run, per step)")
    train.add_argument("--lr_policy", default=None, choices=POLICIES, help="(default: the method's published run)")
    train.add_argument("--step_size", type=int, default=10000, help="iterations per decay of --lr_policy step"
                                                                    " (default: %(default)s)")
    train.add_argument("--weight_decay", type=float, default=None, help="(default: the method's published run)")
    train.add_argument("--random_seed", type=int, default=None,
                       help="re-applied at every step (default: the method's published run)")
    switch(train, "amp", "no_amp",
        "mixed precision: fp16 autocast + GradScaler on CUDA, bf16 autocast on CPU (default: the"
        " method's published run)",
        "fp32")
    train.add_argument("--device_augment", action="store_true",
                       help="decode the training JPEGs and augment them on the training device (GPU: nvJPEG and"
                            " tensor ops) instead of in the loader's workers, for GPUs the CPU cannot feed")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile the student's training forward (the first iterations of every step"
                            " are slow while it compiles; see the README's benchmarks)")
    train.add_argument("--channels_last", default="auto", choices=("auto", "on", "off"),
                       help="channels-last memory format (auto: on CUDA only) (default: %(default)s)")

    steps = parser.add_argument_group("steps and checkpoints")
    steps.add_argument("--curr_step", type=int, default=None,
                       help="first step to train (default 0); with --test, the one step to evaluate")
    steps.add_argument("--end_step", type=int, default=None, help="last step to train (default: the task's last)")
    steps.add_argument("--initial", action="store_true", help="train step 0 only")
    steps.add_argument("--resume", action="store_true",
                       help="continue an interrupted run: skip finished steps, resume a step from its last.pth")
    steps.add_argument("--prev_ckpt", "--ckpt", dest="prev_ckpt", default=None, metavar="PATH",
                       help="checkpoint of step curr_step-1 (default: its final.pth); official BARM/SSUL files load")
    switch(steps, "select_best", "select_last",
        "a step's result (final.pth, its test, the next step's start) is its best weights on"
        " the validation split, where the method's protocol selects (default for BARM and"
        " KProBA at step 0, SSUL at every step, as they published; the VOC validation set is"
        " its test set)",
        "a step's result is its last weights (the other methods' default; --clean's)")
    steps.add_argument("--keep_checkpoints", default="all", choices=("all", "last"),
                       help="all: every step keeps its final.pth; last: once a step finishes, the final.pth of the"
                            " earlier steps of the run is removed (results files stay) (default: %(default)s)")
    steps.add_argument("--ckpt_dir", default="checkpoints", help="(default: %(default)s)")
    steps.add_argument("--step0_from", default=None, metavar="auto|DIR",
                       help="start from another run's step 0 when it trains exactly this run's step 0 (e.g. 15-1"
                            " after 15-5): DIR (a run folder, its step0 folder or its final.pth; refused with the"
                            " first difference otherwise) or auto (the newest match under --ckpt_dir, else train"
                            " it)")
    steps.add_argument("--subpath", default=None,
                       help="runs go to CKPT_DIR/SUBPATH/TASK/{overlap,disjoint}/step{t} (default: the method name)")

    reference = parser.add_argument_group(
        "reference behaviour", "the published runs' protocol, bugs included, is the default; each flag here departs"
                               " from it, and --clean departs everywhere (docs/differences.md)")
    reference.add_argument("--clean", action="store_true",
                           help="every deviation from the references that changes numbers on: no selection on the"
                                " test set, synchronised gradients, one BatchNorm over the batch, and each method's"
                                " own (see --method NAME --help)")
    switch(reference, "sync_gradients", "no_sync_gradients",
        "average the gradients of all processes (where the published run did not: BARM's steps"
        " t > 0 and KProBA's on ADE, whose default reproduces rank 0 alone on its half of the"
        " images)",
        "reproduce an unsynchronised published run: rank 0 alone, its batch, its fixed half of the"
        " images")
    switch(reference, "held_out_test", "no_held_out_test",
        "cityscapes_domain: test step t on the union of the held-out parts of steps 0..t, which"
        " no step trains on (default: the reference's test, the held-out part of a new shuffle"
        " of all domains so far, which holds images earlier steps trained on)",
        "cityscapes_domain: the reference's test set (the default)")
    reference.add_argument("--bn_chunks", type=int, default=None, metavar="N",
                           help="BatchNorm statistics per chunk of N of every batch, as DataParallel over N GPUs"
                                " computed them, where BatchNorm trains (default: the published run's: 2 for SSUL,"
                                " else 1)")
    reference.add_argument("--dry_run", action="store_true",
                           help="check every input, print the resolved settings of every step (and where each value"
                                " comes from) as JSON, and exit without writing anything")
    reference.add_argument("--recipe", default=None, metavar="NAME",
                           help="set by scripts/recipes: the flags before it on the command line are the recipe"
                                " NAME's, those after it the user's (recorded, and shown by --dry_run)")

    evaluation = parser.add_argument_group("evaluation and logging")
    evaluation.add_argument("--test", "--test_only", dest="test", action="store_true",
                            help="evaluate saved checkpoints on the test split instead of training")
    evaluation.add_argument("--test_ckpt", default=None, metavar="PATH",
                            help="with --test: evaluate this checkpoint file (ciss's, or one a reference repository"
                                 " saved or released) as step --curr_step of the task, with the method's own"
                                 " evaluation")
    evaluation.add_argument("--visualize", type=int, default=0, metavar="N",
                            help="with --test: image / ground truth / prediction panels of the first N test images"
                                 " of each step (eval/<settings>/step<t>/panels/, and tensorboard)")
    evaluation.add_argument("--val_interval", type=int, default=None,
                            help="validate every N epochs, 0 = never (default: the method's rule, e.g. BARM's:"
                                 " after every epoch when an epoch has more than 100 iterations, else every 5th)")
    evaluation.add_argument("--print_interval", type=int, default=10,
                            help="iterations between loss logs (default: %(default)s)")
    evaluation.add_argument("--logger", nargs="+", default=list(DEFAULT_LOGGERS), choices=LOGGERS,
                            help="where the scalars go, one or more: tensorboard (events in each step folder), wandb"
                                 " (one WandB run per step, with the configuration, the summary table and the"
                                 " mIoU figure; needs pip install wandb; WANDB_MODE=offline works without network)"
                                 " (default: tensorboard)")

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default="auto",
                         help="auto (CUDA if available), cpu, cuda or cuda:N; torchrun sets one device per"
                              " process (default: %(default)s)")

    _add_method_flags(parser, get_method_class(method), dataset)
    return parser


def validate(config, method_cls=None):
    """Checks argparse cannot express (ranges of the flags given and of the method's hyper-parameters); raises
    :class:`UserError`. Values the method's published run supplies are checked when a step resolves them."""
    at_least = {"batch_size": 1, "global_batch": 1, "accumulate": 1, "micro_batch": 1, "val_batch_size": 1, "train_epoch": 1, "crop_size": 1,
                "step_size": 1, "print_interval": 1, "bn_chunks": 1, "visualize": 0, "num_workers": 0,
                "val_interval": 0, "weight_decay": 0}
    for name, low in at_least.items():
        value = getattr(config, name)
        if value is not None and value < low:
            raise UserError(f"--{name} must be {'at least 1' if low else '0 or more'}, got {value}")
    if config.lr is not None and config.lr <= 0:
        raise UserError(f"--lr must be positive, got {config.lr}")
    if method_cls is not None:
        for field in dataclasses.fields(method_cls.Hyper):
            problem = check_hyper_value(field.name, getattr(config, field.name), field.metadata)
            if problem:
                raise UserError(problem)
    if method_cls is not None:
        refusal = method_cls(method_hyper(config, method_cls), dataset=config.dataset).refusal()
        if refusal:
            raise UserError(f"--method {method_cls.name} cannot run on --dataset {config.dataset}: {refusal}")
    if config.initial and config.curr_step not in (None, 0):
        raise UserError(f"--initial trains step 0 only, but --curr_step is {config.curr_step}")
    if config.test_ckpt is not None and not config.test:
        raise UserError("--test_ckpt names a checkpoint to evaluate: add --test")
    require_loggers(config.logger)
    return config


def explicit_flags(parser, argv):
    """The destinations of the flags ``argv`` sets explicitly (not left at their defaults)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(parser.parse_args(argv)))


def parse_args(argv=None):
    """Parse ``argv`` for the selected method into a read-only :class:`engine.config.RunConfig`: its
    ``explicit`` lists the flags given on the command line, its ``source(name)`` says whether a value was the
    user's ("command line"), a recipe's (the flags before ``--recipe NAME``: "recipe NAME") or a default."""
    argv = sys.argv[1:] if argv is None else list(argv)
    method, dataset = _selection(argv)
    namespace = build_parser(method, dataset).parse_args(argv)
    explicit = explicit_flags(build_parser(method, dataset), argv)
    sources = {}
    if namespace.recipe is not None:
        marker = max(i for i, arg in enumerate(argv) if arg == "--recipe" or arg.startswith("--recipe="))
        recipe_flags = explicit_flags(build_parser(method, dataset), argv[:marker]) - {"method", "dataset"}
        after = marker + (2 if argv[marker] == "--recipe" else 1)
        user_flags = explicit_flags(build_parser(method, dataset), argv[after:])
        sources = {name: f"recipe {namespace.recipe}" for name in recipe_flags - user_flags}
    config = RunConfig(vars(namespace), explicit=explicit, sources=sources)
    return validate(config, get_method_class(method))


def method_hyper(config, method_cls):
    """The method's hyper-parameter dataclass filled from the parsed flags; with ``--clean`` every deviation the
    method declares (``Method.deviations``) takes its clean value unless the flag was given."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(method_cls.Hyper)}
    if config.clean:
        values.update({d.flag: d.clean for d in method_cls.deviations if d.flag not in config.explicit})
    return method_cls.Hyper(**values)
