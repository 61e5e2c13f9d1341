"""ciss: class-incremental semantic segmentation.

Train steps ``curr_step..last`` of a task in one process (``--initial``: step 0 only), each step starting
from the previous step's checkpoint, or evaluate saved checkpoints with ``--test``. Run with ``python``
(one process: CUDA if present, else CPU) or ``torchrun --nproc_per_node=K`` (one process per GPU, or K CPU
processes with gloo). ``python train.py --help`` lists the flags; ``--method NAME --help`` adds that
method's hyper-parameters.
"""
import dataclasses
import functools
import json
import logging
import os
import shlex
import signal
import sys
import tempfile

import torch

from engine.cli import method_hyper, parse_args
from engine.context import make_context, task_steps
from engine.data import class_names
from engine.dry_run import dry_run, steps_of
from engine.evaluate import evaluate_state
from engine.models import MODEL_KEYS, check_start, model_spec, model_state, read_checkpoint
from engine.resolve import resolve_step
from engine.panels import visualize_test_step
from engine.results import (SUMMARY_COLUMNS, chain_results, device_name, format_step, format_summary, read_results,
                            step_results, summary_row, write_step_results, write_summary, write_summary_rows)
from engine.run_folder import RunFolder
from engine.setup import run_step
from engine.shared_step0 import use_shared_step0
from methods import get_method_class
from reports.plots import PANEL_KEYS, plot_miou_per_step
from utils.distributed import cleanup, setup
from utils.errors import UserError, exit_on_user_error
from utils.logging import setup_logging
from utils.tasks import check_step

log = logging.getLogger("ciss")


def step_range(config, steps):
    if config.initial:
        return 0, 0
    first = config.curr_step or 0
    last = len(steps) - 1 if config.end_step is None else config.end_step
    for step in (first, last):
        check_step(steps, step, task=f"{config.dataset} task {config.task}")
    if last < first:
        raise UserError(f"--end_step {last} is before --curr_step {first}")
    return first, last


def finished(ctx, step=None):
    """Whether a step has its results and its checkpoint (or had it removed by ``--keep_checkpoints last``),
    and no interrupted re-training of it (a ``last.pth``) is waiting to be resumed."""
    if step in (None, ctx.step) and os.path.exists(ctx.last_path()):
        return False
    if os.path.exists(ctx.final_path(step)):
        return True
    results = os.path.join(ctx.step_dir(step), "results.json")
    return os.path.exists(results) and read_results(results).get("checkpoint_removed", False)


#: What the loggers that take tables and figures (WandB) get at the end of each step.
SUMMARY_TABLE = "summary"
SUMMARY_FIGURE = "mIoU_per_step"
SUMMARY_FIGURE_FILE = "miou_per_step.png"


def log_summary(ctx, config, step_log, iteration):
    """At the end of a step, for the loggers that take tables and figures (WandB, on rank 0): the summary across
    steps of the run's chain so far (``summary.csv``'s rows) and the report's mIoU-per-step figure
    (:func:`reports.plots.plot_miou_per_step`, where matplotlib is installed), at the step's last iteration."""
    if not step_log.takes_media:
        return
    rows = [summary_row(r) for r in chain_results(ctx.root, ctx.step)]
    step_log.table(SUMMARY_TABLE, SUMMARY_COLUMNS, rows, iteration)
    series = [(config.subpath or config.method, [row["step"] for row in rows],
               {key: [row[key] for row in rows] for key in PANEL_KEYS})]
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = plot_miou_per_step(series, os.path.join(folder, SUMMARY_FIGURE_FILE),
                                      title=f"{ctx.dataset} {ctx.task} ({ctx.setting})")
        except ImportError:
            log.info("no mIoU figure for the loggers: matplotlib is not installed")
            return
        step_log.image(SUMMARY_FIGURE, path, iteration)


def train(config, dist_info, status):
    method_cls = get_method_class(config.method)
    first, last = step_range(config, task_steps(config))
    if dist_info.distributed and dist_info.device.type == "cpu":
        log.info("SyncBatchNorm has no CPU implementation: BatchNorm layers that train keep per-process statistics")
    run_folder = RunFolder(make_context(config, first).root, dist_info.is_main)
    rows = []
    try:
        shared = (first == 0 and config.step0_from is not None
                  and not (config.resume and finished(make_context(config, 0)))
                  and use_shared_step0(config, method_cls, dist_info, run_folder))
        for step in range(first, last + 1):
            ctx = make_context(config, step)
            status["ctx"] = ctx
            if step == 0 and shared:
                continue
            if config.resume and finished(ctx):
                log.info("step %d is finished (%s): skipped", step, ctx.step_dir())
                continue
            method = method_cls(method_hyper(config, method_cls), dataset=config.dataset)
            step_config = resolve_step(config, method, step, dist_info.world_size)
            run_step(ctx, step_config, method, dist_info, first, run_folder, last,
                     end_of_step=functools.partial(log_summary, ctx, config))
            if dist_info.is_main:
                rows = write_summary(ctx.root, step)
        if rows:
            log.info("\n%s", format_summary(rows))
    finally:
        run_folder.close()


def steps_to_test(config, steps):
    if config.test_ckpt is not None and config.curr_step is None:
        raise UserError(f"--test_ckpt {config.test_ckpt}: say which step of {config.dataset} task {config.task} it"
                        f" holds with --curr_step")
    if config.curr_step is not None:
        check_step(steps, config.curr_step, task=f"{config.dataset} task {config.task}")
        return [config.curr_step]
    ctx = make_context(config, 0)
    found = [t for t in range(len(steps)) if os.path.exists(ctx.final_path(t))]
    if not found:
        raise UserError(f"no checkpoint to test under {ctx.root}: expected step*/final.pth (train first, or"
                        f" check --ckpt_dir, --subpath, --task and --overlap)")
    return found


#: Settings ``--test`` takes from the checkpoint unless given on the command line.
RECORDED_EVAL_FLAGS = ("crop_size", "crop_val", "val_batch_size")


def use_recorded_settings(config, checkpoint, path):
    """The configuration that evaluates the checkpoint at ``path`` as it was trained and tested: its model,
    backbone, output stride and evaluation flags, unless a flag was given explicitly (then say that it differs)."""
    recorded = {**checkpoint.get("args", {}), **{k: checkpoint[k] for k in MODEL_KEYS if k in checkpoint}}
    adopted = {}
    for key in MODEL_KEYS + RECORDED_EVAL_FLAGS:
        if key not in recorded or recorded[key] == getattr(config, key):
            continue
        if key in config.explicit:
            log.info("%s was trained with --%s %s; evaluating with --%s %s as asked", path, key, recorded[key], key,
                     getattr(config, key))
        else:
            adopted[key] = recorded[key]
    return config.replace(f"checkpoint {path}", **adopted) if adopted else config


def eval_name(config):
    """The folder of ``--test`` results, named by the evaluation settings."""
    return f"crop{config.crop_size}" if config.crop_val else "full"


def test(config, dist_info, status):
    method_cls = get_method_class(config.method)
    rows = []
    for step in steps_to_test(config, task_steps(config)):
        ctx = make_context(config, step)
        status["ctx"] = ctx
        path = config.test_ckpt or ctx.final_path()
        checkpoint = read_checkpoint(path, ctx, step, f"checkpoint {path} does not exist: train step {step} first")
        run_method = method_cls(method_hyper(config, method_cls), dataset=config.dataset)
        check_start(checkpoint, path, step, run_method)
        step_config = use_recorded_settings(resolve_step(config, run_method, step, dist_info.world_size),
                                            checkpoint, path)
        hyper = method_hyper(config, method_cls)
        # prediction follows the trained method's settings (e.g. sigmoid or softmax)
        if "hyper" in checkpoint and checkpoint.get("method", config.method) == config.method:
            known = {f.name for f in dataclasses.fields(method_cls.Hyper)}
            given = {k: v for k, v in checkpoint["hyper"].items() if k in known and k not in config.explicit}
            hyper = dataclasses.replace(hyper, **given)
        method = method_cls(hyper, dataset=config.dataset)
        state = model_state(checkpoint)  # a reference repository's layout, converted
        spec = model_spec(step_config, method_cls)
        confusion = evaluate_state(ctx, step_config, method, spec, state, dist_info, path)
        results = step_results(confusion, ctx, method.name, class_names(ctx), path, method.eval_convention())
        trained = (checkpoint.get("metrics") or {}).get("provenance")  # what produced the weights (ciss's)
        results.update(run_id=checkpoint.get("run_id"), parent_id=checkpoint.get("parent_id"),
                       provenance=trained or {"seed": (checkpoint.get("args") or {}).get("random_seed"),
                                              "class_order": [list(s) for s in ctx.steps]},
                       evaluation={**{k: getattr(step_config, k) for k in RECORDED_EVAL_FLAGS},
                                   "processes": dist_info.world_size, "torch": str(torch.__version__),
                                   "device": device_name(dist_info.device)})
        folder = os.path.join(ctx.root, "eval", eval_name(step_config))
        if dist_info.is_main:
            write_step_results(results, os.path.join(folder, f"step{step}"))
            rows.append(summary_row(results))
            log.info(format_step(results))
            log.info("results in %s", os.path.join(folder, f"step{step}"))
        if config.visualize:  # on every rank: the test loader is built collectively; rank 0 writes
            visualize_test_step(ctx, step_config, method, spec, state, path, dist_info, config.visualize,
                                os.path.join(folder, f"step{step}"))
    if rows:
        write_summary_rows(rows, os.path.join(ctx.root, "eval", eval_name(step_config), "summary.csv"))
        log.info("\n%s", format_summary(rows))


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the run ends as cleanly as on Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Interrupted()


def interruption_line(status, argv):
    """The one line printed when a run is interrupted: what is saved and how to continue."""
    ctx = status.get("ctx")
    command = "python train.py " + shlex.join([a for a in argv if a != "--resume"] + ["--resume"])
    if ctx is None:
        return f"interrupted before training started; run again with: {command}"
    if status.get("test"):
        return f"interrupted while testing step {ctx.step}; nothing was written for it"
    if os.path.exists(ctx.last_path()):
        saved = f"the last finished epoch of step {ctx.step} is in {ctx.last_path()}"
    else:
        saved = f"no epoch of step {ctx.step} had finished"
    return f"interrupted: {saved}; continue with: {command} (under torchrun, add --resume to the torchrun command)"


def print_dry_run(config):
    """``--dry_run``: the resolved settings of every step as one JSON document on stdout (messages on stderr);
    nothing is written. The number of processes is torchrun's (``WORLD_SIZE``), else 1."""
    setup_logging(True, stream=sys.stderr)
    method_cls = get_method_class(config.method)
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    document = dry_run(config, method_cls, method_hyper(config, method_cls), steps_of(config, step_range), world_size)
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(json.dumps(document, indent=1, default=str))


def run(config, argv=None):
    """Train or test as the parsed ``config`` say (set-up and tear-down of the process group included). Ctrl-C
    and SIGTERM end the run with one line saying what was saved and how to resume (exit status 130 / 143)."""
    if config.dry_run:
        return print_dry_run(config)
    dist_info = setup(config.device)
    setup_logging(dist_info.is_main)
    if dist_info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as BARM train.py: fastest kernels, not bitwise reproducible
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matrix products in TF32 on Ampere and later
        torch.backends.cudnn.allow_tf32 = True  # (convolutions: PyTorch's default)
    status = {"test": config.test}
    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        (test if config.test else train)(config, dist_info, status)
    except KeyboardInterrupt as interrupt:
        if dist_info.is_main:
            print(interruption_line(status, sys.argv[1:] if argv is None else argv), file=sys.stderr, flush=True)
        sys.exit(143 if isinstance(interrupt, Interrupted) else 130)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        cleanup()


@exit_on_user_error
def main(argv=None):
    run(parse_args(argv), argv)


if __name__ == "__main__":
    main()
