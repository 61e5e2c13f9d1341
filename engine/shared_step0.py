"""A shared step 0 (``--step0_from auto|DIR``): a task whose step 0 is another run's step 0 starts from that run's
result instead of training it again (MiB's 15-5 and 15-1 share their step 0: both train classes 0..15 with the
same protocol).

Two step 0s are the same when everything that shapes step 0's training is equal: the dataset and its folder, the
setting (overlap or disjoint), the step-0 classes in the same order, the method, the model, and every resolved
setting of step 0 (seed, crop, schedule, epochs, batch, learning rates, precision, the method's
hyper-parameters, ...), read from the other run's ``step0/config.json``. Only the flags that name the run or
change nothing in step 0's training (:data:`RUN_FLAGS`: the task's name and later steps, folders, logging,
workers, device) may differ.

Sharing writes this run's ``step0/`` folder: ``final.pth`` as a hard link to the other run's (a copy across file
systems), its ``results.json``, ``per_class.csv`` and ``config.json`` copied with ``shared_from`` (the other step
folder and its run id) added. The run's later steps then start from it as from a step 0 of their own (their
``results.json`` says ``started_from.shared_from``). ``auto`` looks for a matching step 0 under ``--ckpt_dir``
(``{ckpt_dir}/*/*/*/step0``) and trains step 0 when none matches; a ``DIR`` that does not match is refused with
one line naming the first difference.
"""
import glob
import json
import logging
import os
import shutil

from engine.checkpoints import check_writable
from engine.cli import method_hyper
from engine.context import make_context
from engine.models import model_spec
from engine.resolve import resolve_step
from utils.checkpoint import load_checkpoint_file
from utils.distributed import all_gather_objects, main_first
from utils.errors import UserError
from utils.jsonfile import read_json_or_none, write_json

log = logging.getLogger("ciss")

AUTO = "auto"
#: Flags that do not shape step 0's training: which task and steps the run continues with, where it writes, how
#: it logs and loads, on which device, and evaluation-only settings.
RUN_FLAGS = frozenset({
    "task", "task_file", "curr_step", "end_step", "initial", "ckpt_dir", "subpath", "resume", "test", "test_ckpt",
    "prev_ckpt", "step0_from", "num_workers", "print_interval", "visualize", "recipe", "dry_run",
    "val_batch_size", "keep_checkpoints", "cache_dir", "device", "compile", "channels_last", "clean", "logger",
})
COPIED = ("results.json", "per_class.csv", "config.json")  # beside final.pth, with ``shared_from`` in the JSONs
SEARCH_DEPTH = ("*", "*", "*")  # {subpath}/{task}/{setting} under --ckpt_dir


def step0_record(config, ctx, method_name, model):
    """What shapes step 0 of this run, in the form of a step folder's ``config.json``."""
    return {"args": config.to_dict(), "method": method_name, "classes": [list(ctx.steps[0])], **model}


def _same_path(a, b):
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def difference(ours, theirs):
    """The first difference between two step-0 records (``config.json`` contents) as ``(what, theirs, ours)``, or
    None when they train the same step 0."""
    for key in ("method", "classes", "model", "backbone", "output_stride"):
        if theirs.get(key) != ours.get(key):
            return key, theirs.get(key), ours.get(key)
    mine, other = ours["args"], theirs.get("args", {})
    for name in sorted(set(mine) & set(other) - RUN_FLAGS):
        if name in ("data_root", "pretrained"):
            if mine[name] != other[name] and not _same_path(mine[name], other[name]):
                return f"--{name}", other[name], mine[name]
        elif mine[name] != other[name]:
            return f"--{name}", other[name], mine[name]
    return None


def _read_record(step_dir):
    return read_json_or_none(os.path.join(step_dir, "config.json"))


def _step_dir(source):
    """The step-0 folder a ``--step0_from DIR`` names: DIR itself, DIR/step0, or the folder of DIR/final.pth."""
    if os.path.isfile(source):
        return os.path.dirname(os.path.abspath(source))
    for candidate in (source, os.path.join(source, "step0")):
        if os.path.exists(os.path.join(candidate, "final.pth")):
            return os.path.abspath(candidate)
    raise UserError(f"--step0_from {source}: no step0/final.pth there: give a run folder, its step0 folder or"
                    f" the final.pth of a finished step 0")


def find_step0(source, record, ckpt_dir, own_dir):
    """The step-0 folder this run shares: ``source`` ("auto": the newest matching one under ``ckpt_dir``, else
    None) after checking that it trains the same step 0 as ``record`` (a :class:`UserError` naming the first
    difference otherwise)."""
    if source == AUTO:
        matches = []
        for step_dir in glob.glob(os.path.join(ckpt_dir, *SEARCH_DEPTH, "step0")):
            theirs = _read_record(step_dir)
            if (os.path.realpath(step_dir) != os.path.realpath(own_dir) and theirs is not None
                    and os.path.exists(os.path.join(step_dir, "final.pth")) and difference(record, theirs) is None):
                matches.append(step_dir)
        if not matches:
            log.info("--step0_from auto: no finished step 0 under %s trains this run's step 0: training it", ckpt_dir)
            return None
        return max(matches, key=lambda d: (os.path.getmtime(os.path.join(d, "final.pth")), d))
    step_dir = _step_dir(source)
    theirs = _read_record(step_dir)
    if theirs is None:
        raise UserError(f"--step0_from {source}: {step_dir} has no readable config.json (a step 0 that ciss trained"
                        f" has one): use --prev_ckpt with --curr_step 1 to start from another checkpoint")
    found = difference(record, theirs)
    if found is not None:
        what, other, mine = found
        raise UserError(f"--step0_from {source}: that step 0 was trained with {what} {other}, this run's step 0 has"
                        f" {what} {mine}: it is another step 0")
    return step_dir


def _link_or_copy(source, target):
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{os.getpid()}.tmp")
    try:
        try:
            os.link(source, tmp)
        except OSError:  # another file system, or links not allowed: a copy
            shutil.copy2(source, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def share_step0(source_dir, own_dir):
    """Make ``own_dir`` (this run's step 0 folder) the finished step 0 of ``source_dir`` (see the module
    docstring); ``final.pth`` is verified first (a damaged file is refused). Returns the ``shared_from`` record."""
    checkpoint = load_checkpoint_file(os.path.join(source_dir, "final.pth"))
    shared_from = {"path": os.path.abspath(source_dir), "run_id": checkpoint.get("run_id")}
    os.makedirs(own_dir, exist_ok=True)
    for name in COPIED:
        path = os.path.join(source_dir, name)
        if not os.path.exists(path):
            continue
        if name.endswith(".json"):
            with open(path, encoding="utf-8") as handle:
                content = json.load(handle)
            write_json({**content, "shared_from": shared_from}, os.path.join(own_dir, name))
        else:
            _link_or_copy(path, os.path.join(own_dir, name))
    _link_or_copy(os.path.join(source_dir, "final.pth"), os.path.join(own_dir, "final.pth"))  # last: marks it done
    return shared_from


def shared_from(checkpoint_path):
    """The ``shared_from`` record of the step folder of ``checkpoint_path`` (None when its step was trained there)."""
    results = read_json_or_none(os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), "results.json"))
    return None if results is None else results.get("shared_from")


def use_shared_step0(config, method_cls, dist_info, run_folder):
    """``--step0_from``: make this run's step 0 the matching step 0 of another run (rank 0 writes; every rank
    learns the outcome). Returns whether step 0 is shared (then it is not trained)."""
    ctx = make_context(config, 0)
    method = method_cls(method_hyper(config, method_cls), dataset=config.dataset)
    step_config = resolve_step(config, method, 0, dist_info.world_size)
    spec = model_spec(step_config, method_cls)
    record = step0_record(step_config, ctx, method.name,
                          {"model": spec.name, "backbone": spec.backbone, "output_stride": spec.output_stride})

    def share():
        if not dist_info.is_main:
            return None
        source = find_step0(config.step0_from, record, config.ckpt_dir, ctx.step_dir(0))
        if source is None:
            return None
        run_folder.open()
        check_writable(ctx.step_dir(0))
        origin = share_step0(source, ctx.step_dir(0))
        log.info("step 0 is the step 0 of %s (run %s), which trains the same: not trained again", origin["path"],
                 origin["run_id"])
        return origin

    return all_gather_objects(main_first(share, dist_info))[0] is not None
