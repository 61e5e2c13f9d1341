"""ciss: class-incremental semantic segmentation.

Train steps ``curr_step..last`` of a task in one process (``--initial``: step 0 only), each step starting
from the previous step's checkpoint, or evaluate saved checkpoints with ``--test``. Run with ``python``
(one process: CUDA if present, else CPU) or ``torchrun --nproc_per_node=K`` (one process per GPU, or K CPU
processes with gloo). ``python train.py --help`` lists the flags; ``--method NAME --help`` adds that
method's hyper-parameters.
"""
import dataclasses
import logging
import os

import torch

from engine.evaluate import evaluate_state
from engine.models import model_state, read_checkpoint
from engine.data import class_names
from engine.plan import make_plan, task_steps
from engine.results import format_step, format_summary, step_results, write_step_results, write_summary
from engine.step import run_step
from methods import get_method_class
from utils.args import method_hyper, parse_args
from utils.distributed import cleanup, setup
from utils.errors import UserError, exit_on_user_error
from utils.logging import setup_logging
from utils.tasks import check_step

log = logging.getLogger("ciss")


def step_range(args, steps):
    if args.initial:
        return 0, 0
    first = args.curr_step or 0
    last = len(steps) - 1 if args.end_step is None else args.end_step
    for step in (first, last):
        check_step(steps, step, task=f"{args.dataset} task {args.task}")
    if last < first:
        raise UserError(f"--end_step {last} is before --curr_step {first}")
    return first, last


def train(args, dist_info):
    method_cls = get_method_class(args.method)
    first, last = step_range(args, task_steps(args))
    if args.select_best and first <= 0 <= last:
        log.info("--select_best: step 1 will start from step 0's best checkpoint on the validation split")
    if dist_info.distributed and dist_info.device.type == "cpu":
        log.info("SyncBatchNorm has no CPU implementation: BatchNorm layers that train keep per-process statistics")
    rows = []
    for step in range(first, last + 1):
        plan = make_plan(args, step)
        if args.resume and os.path.exists(plan.final_path()):
            log.info("step %d is finished (%s): skipped", step, plan.final_path())
            continue
        run_step(plan, args, method_cls(method_hyper(args, method_cls), dataset=args.dataset), dist_info, first)
        if dist_info.is_main:
            rows = write_summary(plan.root)
    if rows:
        log.info("\n%s", format_summary(rows))


def steps_to_test(args, steps):
    if args.curr_step is not None:
        check_step(steps, args.curr_step, task=f"{args.dataset} task {args.task}")
        return [args.curr_step]
    plan = make_plan(args, 0)
    found = [t for t in range(len(steps)) if os.path.exists(plan.final_path(t))]
    if not found:
        raise UserError(f"no checkpoint to test under {plan.root}: expected step*/final.pth (train first, or"
                        f" check --ckpt_dir, --subpath, --task and --overlap)")
    return found


def use_recorded_model(args, checkpoint, path):
    """Evaluate with the model and hyper-parameters recorded in a ciss checkpoint."""
    for key in ("model", "backbone", "output_stride"):
        if key in checkpoint and checkpoint[key] != getattr(args, key) and getattr(args, key) is not None:
            log.info("%s was trained with --%s %s; evaluating it as such", path, key, checkpoint[key])
        if key in checkpoint:
            setattr(args, key, checkpoint[key])


def test(args, dist_info):
    method_cls = get_method_class(args.method)
    rows = []
    for step in steps_to_test(args, task_steps(args)):
        plan = make_plan(args, step)
        path = plan.final_path()
        checkpoint = read_checkpoint(path, plan, step, f"checkpoint {path} does not exist: train step {step} first")
        if checkpoint.get("method", args.method) != args.method:
            raise UserError(f"checkpoint {path} was trained with --method {checkpoint['method']}, not {args.method}")
        use_recorded_model(args, checkpoint, path)
        hyper = method_hyper(args, method_cls)
        if "hyper" in checkpoint:  # prediction follows the trained method's settings (e.g. sigmoid or softmax)
            known = {f.name for f in dataclasses.fields(method_cls.Hyper)}
            hyper = dataclasses.replace(hyper, **{k: v for k, v in checkpoint["hyper"].items() if k in known})
        method = method_cls(hyper, dataset=args.dataset)
        confusion = evaluate_state(plan, args, method, model_state(checkpoint), dist_info)
        results = step_results(confusion, plan, method.name, class_names(plan), path)
        if dist_info.is_main:
            write_step_results(results, plan.step_dir())
            rows = write_summary(plan.root)
            log.info(format_step(results))
    if rows:
        log.info("\n%s", format_summary(rows))


def run(args):
    """Train or test as the parsed ``args`` say (set-up and tear-down of the process group included)."""
    dist_info = setup(args.device)
    setup_logging(dist_info.is_main)
    if dist_info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the reference (spec §4.1): fastest kernels, not bitwise reproducible
    try:
        (test if args.test else train)(args, dist_info)
    finally:
        cleanup()


@exit_on_user_error
def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
