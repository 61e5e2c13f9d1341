"""Benchmarks (not tests): speed and memory of the trainer's real steps, the data pipeline and the class index.

    python scripts/benchmark.py train [--methods barm ft ...] [--backbone resnet101] [--crop 321] [--batch 2]
                                      [--precisions fp32 amp] [--channels_last off on] [--compile]
                                      [--cases step0 step1 teacher eval] [--repeats 5] [--json FILE] [--markdown FILE]
    python scripts/benchmark.py data  [--size 513] [--images 48] [--transforms barm mib] [--batch 8] [--device D]
    python scripts/benchmark.py index [--n 20210] [--size 512]

``train`` measures, per method and configuration, the trainer's own iteration (``engine.step.train_iteration``:
teacher forward, targets, losses, backward, the method's gradient hook and penalty, optimizer and scheduler)
on a fixed batch already on the device, for step 0 and an incremental step (step 1 of VOC 15-1, started from a
step-0 checkpoint the benchmark trains for a few iterations on synthetic data so that every method has its
state), the teacher's forward of that step alone (as the iteration runs it: no_grad, autocast under ``amp``),
and the evaluation forward with the method's prediction; it then prints each incremental step's cost against
step 0 and against step 0 + one teacher forward. Each case runs in a fresh process (its peak
memory is its own) and reports images/s, seconds per iteration, peak memory (CUDA: max allocated; CPU: the
process's resident set), FLOPs per image (``torch.utils.flop_counter`` on one iteration of the exact step),
the achieved FLOP/s and its fraction of peaks measured in the same process: a 4096x4096 matrix product in the
case's dtype (fp32, or bf16 / fp16 under ``amp``) on the same device, and a 3x3 convolution of the network's
shape in that dtype and the case's memory format. Medians over ``--repeats`` after a
warm-up; compare figures only within one run (the machines are noisy).

``data`` measures decoding and augmentation alone (one process, i.e. per DataLoader worker) on VOC-sized
(500x375) JPEGs at the given crop, and the ``--device_augment`` split of the same work: what is left to each
worker (read, label, plan) and what the device does (decode, transform); ``index`` the class-index build and its cached reload.
The data and index benchmarks are in ``scripts/benchmark_inputs.py``, the measuring helpers in
``scripts/measure.py``.
"""
import argparse
import json
import os
import sys
import tempfile

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import train  # noqa: E402  (the repository's root, inserted above)
from datasets.synthetic import generate  # noqa: E402
from engine.cli import method_hyper, parse_args  # noqa: E402
from engine.context import make_context  # noqa: E402
from engine.resolve import resolve_step  # noqa: E402
from engine.data import to_batch  # noqa: E402
from engine.evaluate import deterministic_cudnn  # noqa: E402
from engine.iteration import train_iteration  # noqa: E402
from engine.passes import autocast  # noqa: E402
from engine.run_folder import RunFolder  # noqa: E402
from engine.setup import set_up_step  # noqa: E402
from methods import get_method_class  # noqa: E402
from scripts.benchmark_inputs import bench_data, bench_index  # noqa: E402
from scripts.measure import (amp_dtype, in_child, measured_peaks, peak_memory_mib, synchronize,  # noqa: E402
                             timed)
from utils.distributed import setup  # noqa: E402
from utils.logging import setup_logging  # noqa: E402

TASK = "15-1"
CASES = ("step0", "step1", "teacher", "eval")
OVERHEAD_TOLERANCE = 0.05  # an incremental step should cost at most step 0 + one teacher forward + 5%


def train_argv(data_root, ckpt_dir, method, args, *extra):
    return ["--data_root", data_root, "--ckpt_dir", ckpt_dir, "--method", method, "--task", TASK, "--overlap",
            "--backbone", args.backbone, "--no_pretrained", "--crop_size", str(args.crop), "--batch_size",
            str(args.batch), "--num_workers", "0", "--crop_val", "--val_batch_size", str(args.batch),
            "--lr_policy", "poly", "--val_interval", "0", "--device", args.device or "auto",
            "--print_interval", "1000000", *extra]


#: Flags of every case: ``--clean`` (synchronised gradients, one BatchNorm over the whole batch, the last weights:
#: the steps never validate), so that every method times the same kind of step; its losses are its published ones.
CASE_FLAGS = ("--clean",)


def prepare_step0(data_root, ckpt_dir, method, args):
    """A step-0 checkpoint of ``method`` (one epoch on the small synthetic set) for the incremental cases."""
    train.run(parse_args(train_argv(data_root, ckpt_dir, method, args, "--initial", "--train_epoch", "1",
                                    *CASE_FLAGS)))


def _train_case(data_root, ckpt_dir, method_name, case, precision, channels_last, compile_model, args):
    """One case in this (fresh) process: returns the measurements as a dict."""
    amp = precision == "amp"
    step = 0 if case == "step0" else 1  # eval: the step-1 model (its head has every channel of step 1)
    extra = ["--curr_step", str(step), "--end_step", str(step), "--train_epoch", "1",
             "--channels_last", "on" if channels_last else "off", *CASE_FLAGS]
    extra.append("--amp" if amp else "--no_amp")
    if compile_model:
        extra.append("--compile")
    run_args = parse_args(train_argv(data_root, ckpt_dir, method_name, args, *extra))
    dist_info = setup(run_args.device)
    setup_logging(False)
    device = dist_info.device
    method_cls = get_method_class(method_name)
    method = method_cls(method_hyper(run_args, method_cls), dataset="voc")
    run_args = resolve_step(run_args, method, step, dist_info.world_size)
    ctx = make_context(run_args, step)
    folder = RunFolder(os.path.join(ckpt_dir, "bench", f"{method_name}-{case}-{precision}-{channels_last}"), False)
    run = set_up_step(ctx, run_args, method, dist_info, step, folder)
    raw, = next(iter(run.data.epoch(0)))  # one micro-batch: the benchmark runs without --accumulate
    batch = to_batch(raw, device, run.channels_last)
    method.set_train_mode(run.student, ctx)

    if case == "teacher":  # the step-1 iteration's teacher forward alone, as train_iteration runs it
        if run.teacher is None:
            return None  # the method trains without one

        def iteration():
            with autocast(device, amp), torch.no_grad():
                run.teacher(batch.images)
            synchronize(device)
    elif case == "eval":
        model = run.student.eval()

        def iteration():
            with torch.no_grad(), deterministic_cudnn():
                logits, _ = model(batch.images)
                method.predict(logits, batch.labels.shape[-2:])
            synchronize(device)
    else:
        def iteration():
            train_iteration(run.model, run.student, run.teacher, method, ctx, batch, run.optimizer, run.scheduler,
                            run.scaler, amp)
            synchronize(device)

    iteration()  # warm-up: allocator, autotuning, compilation
    iteration()
    counter = FlopCounterMode(display=False)
    with counter:
        iteration()
    flops = counter.get_total_flops() / args.batch
    seconds, _ = timed(iteration, args.repeats)
    peak, conv_peak = measured_peaks(device, amp_dtype(device) if amp else torch.float32, run.channels_last,
                                     args.repeats)
    images_per_second = args.batch / seconds
    return {"method": method_name, "case": case, "precision": precision, "channels_last": channels_last,
            "compile": compile_model, "device": str(device), "threads": torch.get_num_threads(),
            "batch": args.batch, "crop": args.crop, "backbone": args.backbone, "images_per_s": images_per_second,
            "s_per_iteration": seconds, "peak_memory_mib": peak_memory_mib(device), "gflop_per_image": flops / 1e9,
            "achieved_gflops": flops * images_per_second / 1e9, "peak_gflops": peak / 1e9,
            "fraction_of_peak": flops * images_per_second / peak, "conv_peak_gflops": conv_peak / 1e9,
            "fraction_of_conv_peak": flops * images_per_second / conv_peak}


def markdown(rows):
    lines = ["| method | case | precision | channels_last | compile | images/s | s/iter | peak MiB | GFLOP/img |"
             " GFLOP/s | of matmul peak | of conv peak |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['case']} | {r['precision']} | {'yes' if r['channels_last'] else 'no'} |"
                     f" {'yes' if r['compile'] else 'no'} | {r['images_per_s']:.2f} | {r['s_per_iteration']:.3f} |"
                     f" {r['peak_memory_mib']:.0f} | {r['gflop_per_image']:.1f} | {r['achieved_gflops']:.0f} |"
                     f" {100 * r['fraction_of_peak']:.0f}% of {r['peak_gflops']:.0f} |"
                     f" {100 * r['fraction_of_conv_peak']:.0f}% of {r['conv_peak_gflops']:.0f} |")
    return "\n".join(lines)


def incremental_costs(rows):
    """Per method and configuration measured with step 0, step 1 and the teacher forward: the incremental
    step's cost relative to step 0, and relative to step 0 + one teacher forward (the least it can cost)."""
    by_key = {}
    for r in rows:
        by_key.setdefault((r["method"], r["precision"], r["channels_last"], r["compile"]), {})[r["case"]] = r
    lines = []
    for (method, precision, channels_last, compiled), cases in by_key.items():
        if "step0" not in cases or "step1" not in cases:
            continue
        step0, step1 = cases["step0"]["s_per_iteration"], cases["step1"]["s_per_iteration"]
        line = (f"  {method:<7} {precision:<5} cl={'on' if channels_last else 'off':<3}"
                f"{' compiled' if compiled else ''}: step 1 = {step1 / step0:.2f}x step 0")
        if "teacher" in cases:
            floor = step0 + cases["teacher"]["s_per_iteration"]
            verdict = "within" if step1 <= floor * (1 + OVERHEAD_TOLERANCE) else "over"
            line += (f", {step1 / floor:.2f}x (step 0 + teacher forward) ({verdict} the"
                     f" {100 * OVERHEAD_TOLERANCE:.0f}% allowance)")
        lines.append(line)
    if lines:
        lines.insert(0, "incremental step vs step 0 (same run):")
    return lines


def bench_train(args):

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"training steps of VOC {TASK}: {args.backbone}, crop {args.crop}, batch {args.batch}, device {device},"
          f" {torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeats}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        data_root = os.path.join(tmp, "VOC2012")
        generate("voc", data_root, n_train=args.images or 16 * args.batch, n_val=2, size=max(64, args.crop), seed=0)
        ckpt_dir = os.path.join(tmp, "checkpoints")
        for method in args.methods:
            if {"step1", "teacher"} & set(args.cases):
                in_child(prepare_step0, data_root, ckpt_dir, method, args)
            for case in args.cases:
                for precision in args.precisions:
                    for channels_last in args.channels_last:
                        if case == "eval" and precision == "amp":
                            continue  # evaluation runs in fp32, as the references
                        row = in_child(_train_case, data_root, ckpt_dir, method, case, precision,
                                       channels_last == "on", args.compile, args)
                        if row is None:
                            print(f"  {method:<7} {case:<6} {precision:<5} cl={channels_last:<3} (no teacher)")
                            continue
                        rows.append(row)
                        print(f"  {method:<7} {case:<6} {precision:<5} cl={channels_last:<3}"
                              f" {row['images_per_s']:6.2f} images/s {row['s_per_iteration']:7.3f} s/it"
                              f" peak {row['peak_memory_mib']:6.0f} MiB {row['gflop_per_image']:6.1f} GFLOP/img"
                              f" {row['achieved_gflops']:6.0f} GFLOP/s = {100 * row['fraction_of_peak']:3.0f}% of mm"
                              f" {row['peak_gflops']:.0f}, {100 * row['fraction_of_conv_peak']:3.0f}% of conv"
                              f" {row['conv_peak_gflops']:.0f}", flush=True)
    print()
    for line in incremental_costs(rows):
        print(line)
    print()
    print(markdown(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(markdown(rows) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="the trainer's steps per method and configuration")
    train.add_argument("--methods", nargs="+", default=["barm"])
    train.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    train.add_argument("--backbone", default="resnet101")
    train.add_argument("--crop", type=int, default=321)
    train.add_argument("--batch", type=int, default=2)
    train.add_argument("--precisions", nargs="+", default=["fp32", "amp"], choices=("fp32", "amp"))
    train.add_argument("--channels_last", nargs="+", default=["off", "on"], choices=("off", "on"))
    train.add_argument("--compile", action="store_true", help="torch.compile the student (warm-up excluded)")
    train.add_argument("--repeats", type=int, default=5)
    train.add_argument("--images", type=int, default=None,
                       help="synthetic training images (default 16 x batch: step 1 then has a few batches)")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    train.add_argument("--json", default=None, help="write the rows as JSON")
    train.add_argument("--markdown", default=None, help="write the Markdown table")
    train.add_argument("--tmp", default=None, help="scratch folder (default: the system's)")
    train.set_defaults(run=bench_train)
    data = commands.add_parser("data", help="decoding + augmentation, per worker")
    data.add_argument("--size", type=int, default=513)
    data.add_argument("--images", type=int, default=48)
    data.add_argument("--transforms", nargs="+", default=["barm", "mib"], choices=("barm", "mib"))
    data.add_argument("--repeats", type=int, default=3)
    data.add_argument("--batch", type=int, default=8, help="batch size of the --device_augment path")
    data.add_argument("--device", default=None, help="device of the --device_augment path (default: cuda if"
                                                     " available)")
    data.add_argument("--tmp", default=None)
    data.set_defaults(run=bench_data)
    index = commands.add_parser("index", help="class index build and cached reload on ADE-sized labels")
    index.add_argument("--n", type=int, default=20210, help="number of training labels")
    index.add_argument("--size", type=int, default=512, help="nominal label size")
    index.add_argument("--workers", type=int, default=None, help="threads (default: the usable CPUs)")
    index.add_argument("--repeats", type=int, default=1)
    index.add_argument("--tmp", default=None, help="scratch folder (default: the system's)")
    index.set_defaults(run=bench_index)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
