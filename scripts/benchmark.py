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
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PEAK_SIZE = 4096
VOC_IMAGE_SIZE = (500, 375)
TASK = "15-1"
CASES = ("step0", "step1", "teacher", "eval")
OVERHEAD_TOLERANCE = 0.05  # an incremental step should cost at most step 0 + one teacher forward + 5%


def timed(function, repeats):
    """Median wall time of ``repeats`` calls and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def in_child(function, *args):
    """Run ``function(*args)`` in a fresh process (so that its peak memory is its own) and return its result."""
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def peak_memory_mib(device):
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on the CPU."""
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp_dtype(device):
    import torch
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def rate(function, flops, device, repeats):
    def run():
        function()
        synchronize(device)

    run()
    seconds, _ = timed(run, repeats)
    return flops / seconds


def measured_peaks(device, dtype, channels_last, repeats=5):
    """``(matrix product, convolution)`` FLOP/s measured now: a PEAK_SIZE² ``torch.mm`` in ``dtype``, and a
    3x3 convolution of the network's shape (2 x 256 x 65², 256 filters) in ``dtype`` and the case's memory
    format. On CPUs where the BLAS behind ``torch.mm`` is slower than oneDNN's convolutions (MKL on AMD), the
    second is the achievable rate."""
    import torch
    import torch.nn.functional as F
    a = torch.randn(PEAK_SIZE, PEAK_SIZE, device=device).to(dtype)
    b = torch.randn(PEAK_SIZE, PEAK_SIZE, device=device).to(dtype)
    matmul = rate(lambda: torch.mm(a, b), 2 * PEAK_SIZE ** 3, device, repeats)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 256, 65, 65, device=device).to(dtype).contiguous(memory_format=memory_format)
    w = torch.randn(256, 256, 3, 3, device=device).to(dtype).contiguous(memory_format=memory_format)
    conv = rate(lambda: F.conv2d(x, w, padding=1), 2 * 2 * 256 * 256 * 9 * 65 * 65, device, repeats)
    return matmul, conv


# ---- train: the trainer's own steps ---------------------------------------------------------------------

def train_argv(data_root, ckpt_dir, method, args, *extra):
    return ["--data_root", data_root, "--ckpt_dir", ckpt_dir, "--method", method, "--task", TASK, "--overlap",
            "--backbone", args.backbone, "--no_pretrained", "--crop_size", str(args.crop), "--batch_size",
            str(args.batch), "--num_workers", "0", "--crop_val", "--val_batch_size", str(args.batch),
            "--lr_policy", "poly", "--val_interval", "0", "--device", args.device or "auto",
            "--print_interval", "1000000", *extra]


def method_flags(method):
    """Flags a method needs here: its full incremental loss (BARM/KProBA: --pseudo); steps that never validate
    keep their last weights (SSUL selects its best-validated ones by default)."""
    return {"barm": ["--pseudo"], "kproba": ["--pseudo"], "ssul": ["--select_last"]}.get(method, [])


def prepare_step0(data_root, ckpt_dir, method, args):
    """A step-0 checkpoint of ``method`` (one epoch on the small synthetic set) for the incremental cases."""
    import train
    from utils.args import parse_args
    train.run(parse_args(train_argv(data_root, ckpt_dir, method, args, "--initial", "--train_epoch", "1",
                                    *method_flags(method))))


def _train_case(data_root, ckpt_dir, method_name, case, precision, channels_last, compile_model, args):
    """One case in this (fresh) process: returns the measurements as a dict."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from engine.data import to_batch
    from engine.evaluate import deterministic_cudnn
    from engine.plan import make_plan
    from engine.run_folder import RunFolder
    from engine.step import StepRun, train_iteration
    from methods import get_method_class
    from utils.args import method_hyper, parse_args
    from utils.distributed import setup
    from utils.logging import setup_logging

    amp = precision == "amp"
    step = 0 if case == "step0" else 1  # eval: the step-1 model (its head has every channel of step 1)
    extra = ["--curr_step", str(step), "--end_step", str(step), "--train_epoch", "1",
             "--channels_last", "on" if channels_last else "off", *method_flags(method_name)]
    if amp:
        extra.append("--amp")
    if compile_model:
        extra.append("--compile")
    run_args = parse_args(train_argv(data_root, ckpt_dir, method_name, args, *extra))
    dist_info = setup(run_args.device)
    setup_logging(False)
    device = dist_info.device
    method_cls = get_method_class(method_name)
    method = method_cls(method_hyper(run_args, method_cls), dataset="voc")
    plan = make_plan(run_args, step)
    folder = RunFolder(os.path.join(ckpt_dir, "bench", f"{method_name}-{case}-{precision}-{channels_last}"), False)
    run = StepRun(plan, run_args, method, dist_info, step, folder)
    raw = next(iter(run.data.epoch(0)))
    batch = to_batch(raw, device, run.channels_last)
    method.set_train_mode(run.student, plan)

    if case == "teacher":  # the step-1 iteration's teacher forward alone, as train_iteration runs it
        from engine.passes import autocast
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
            train_iteration(run.model, run.student, run.teacher, method, plan, batch, run.optimizer, run.scheduler,
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
    import torch
    from datasets.synthetic import generate

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


# ---- data pipeline ----------------------------------------------------------------------------------------

def bench_data(args):
    import numpy as np
    import torch
    from PIL import Image

    from datasets.deferred import DeferredSegmentation, deferred_collate

    from datasets.incremental import IncrementalSegmentation, barm_lut
    from datasets.transforms import mib_train_transform, train_transform
    from utils.tasks import get_task

    transforms = {"barm": train_transform(args.size), "mib": mib_train_transform(args.size)}
    steps = get_task("voc", TASK)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        samples = []
        width, height = VOC_IMAGE_SIZE
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(args.images):  # smooth content with texture and noise, VOC-sized, quality 90 like photos
            base = np.stack([(xx * (i + 1) % 256), (yy * 3 % 256), ((xx + yy) * 2 % 256)], axis=-1)
            image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            label = ((xx // 50 + yy // 50 + i) % 21).astype(np.uint8)
            image_path, label_path = os.path.join(tmp, f"{i}.jpg"), os.path.join(tmp, f"{i}.png")
            Image.fromarray(image).save(image_path, quality=90)
            Image.fromarray(label).save(label_path)
            samples.append((str(i), image_path, label_path))
        print(f"data pipeline, one process (= per DataLoader worker), {args.images} VOC-sized JPEGs"
              f" {width}x{height}, crop {args.size}, median of {args.repeats} passes")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        for name in args.transforms:
            lut = barm_lut(steps, 0, "train")
            dataset = IncrementalSegmentation(samples, lut, transforms[name])
            seconds, _ = timed(lambda: [dataset[i] for i in range(len(dataset))], args.repeats)
            print(f"  {name:<5} decode + augmentation: {len(dataset) / seconds:6.1f} images/s per worker")
            # --device_augment: the workers read and plan, the device decodes and transforms a batch at a time
            deferred = DeferredSegmentation(samples, lut, transforms[name])
            seconds, items = timed(lambda: [deferred[i] for i in range(len(deferred))], args.repeats)
            batches = [deferred_collate(transforms[name])(items[i:i + args.batch])
                       for i in range(0, len(items) - args.batch + 1, args.batch)]

            def materialize():
                for batch in batches:
                    batch.materialize(device)
                synchronize(device)

            materialize()  # warm-up (CUDA context, nvJPEG handles)
            device_seconds, _ = timed(materialize, args.repeats)
            print(f"  {name:<5} --device_augment: workers {len(deferred) / seconds:6.1f} images/s per worker,"
                  f" {device} decode + augmentation {len(batches) * args.batch / device_seconds:6.1f} images/s"
                  f" (batches of {args.batch})")


# ---- class index ------------------------------------------------------------------------------------------

def bench_index(args):
    from datasets import split_class_index
    from datasets.synthetic import generate

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = os.path.join(tmp, "ADEChallengeData2016")
        start = time.perf_counter()
        generate("ade", root, n_train=args.n, n_val=1, size=args.size, workers=args.workers, labels_only=True)
        for name in os.listdir(os.path.join(root, "annotations", "training")):  # the index reads labels only
            open(os.path.join(root, "images", "training", name[:-4] + ".jpg"), "wb").close()
        print(f"generated {args.n} ADE-style labels (~{args.size} px) in {time.perf_counter() - start:.1f} s")

        def build():
            cache = tempfile.mkdtemp(dir=tmp)
            return split_class_index("ade", root, "train", cache_dir=cache, workers=args.workers)

        full, (samples, _) = timed(build, args.repeats)
        cache = tempfile.mkdtemp(dir=tmp)
        split_class_index("ade", root, "train", cache_dir=cache, workers=args.workers)
        reload, _ = timed(lambda: split_class_index("ade", root, "train", cache_dir=cache), max(3, args.repeats))
        print(f"class index, full build:    {full:7.2f} s  ({len(samples)} labels, {args.workers or 'all'} threads,"
              f" {len(samples) / full:.0f} labels/s)")
        print(f"class index, cached reload: {reload:7.3f} s  (file listing + change check + load)")


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
