"""Benchmarks (not tests): speed and memory of the data pipeline, the model and training.

    python scripts/benchmark.py index [--n 20210] [--size 512]     class index: full build and cached reload
    python scripts/benchmark.py model [--sizes 321 513]            model forward/backward and eval images/s
                                                                   and peak memory (CPU: resident set size)
    python scripts/benchmark.py train [--sizes 321 513]            BARM training step 0 / step 1 (with teacher) /
                                                                   evaluation images/s and peak memory; on CUDA
                                                                   also --amp and channels_last

Each benchmark prints one line per measurement with the median over repeats; compare figures only within
one run (the machines are noisy).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def timed(function, repeats):
    """Median wall time of ``repeats`` calls and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


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
        workers = args.workers or os.cpu_count()
        print(f"class index, full build:    {full:7.2f} s  ({len(samples)} labels, {workers} processes,"
              f" {len(samples) / full:.0f} labels/s)")
        print(f"class index, cached reload: {reload:7.3f} s  (file listing + change check + load)")


def peak_memory_mib(device):
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch_module().cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def torch_module():
    import torch
    return torch


def in_child(function, *args):
    """Run ``function(*args)`` in a fresh process (so that its peak memory is its own) and return its result."""
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def throughput(run, batch, repeats, device):
    """Images/s (median of ``repeats`` after one warm-up call) of ``run`` and the peak memory."""
    torch = torch_module()

    def synchronised():
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    synchronised()  # warm-up: allocator, cudnn autotuning
    seconds, _ = timed(synchronised, repeats)
    return batch / seconds, peak_memory_mib(device)


def report(title, case, kinds, args, fp32_only=()):
    """Run ``case(kind, size, args, device, channels_last, amp)`` in a fresh process for every size, kind
    and precision (on CUDA: fp32, --amp, --amp with channels-last) and print one line each."""
    torch = torch_module()
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{title}, batch {args.batch}, device {device_name}, {torch.get_num_threads()} threads,"
          f" median of {args.repeats}")
    variants = [(False, False)] + ([(False, True), (True, True)] if device_name.startswith("cuda") else [])
    for size in args.sizes:
        for kind, label in kinds.items():
            for channels_last, amp in variants:
                if amp and kind in fp32_only:
                    continue
                rate, memory = in_child(case, kind, size, args, device_name, channels_last, amp)
                extra = (" amp" if amp else " fp32") + (" channels_last" if channels_last else "")
                print(f"  {size}x{size} {label:<24}{extra:<20} {rate:7.2f} images/s   peak {memory:8.0f} MiB")


def _model_case(kind, size, args, device_name, channels_last, amp):
    torch = torch_module()
    from network import build_model
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = build_model(args.model, [16, 1], backbone=args.backbone).to(device)
    images = torch.randn(args.batch, 3, size, size, device=device)
    if channels_last:
        model, images = model.to(memory_format=torch.channels_last), images.to(memory_format=torch.channels_last)
    model.train(kind == "train")
    autocast = torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                              enabled=amp)

    def run():
        if kind == "train":
            with autocast:
                logits, _ = model(images)
            logits.float().sum().backward()
        else:
            with torch.no_grad():
                model(images)

    return throughput(run, args.batch, args.repeats, device)


def bench_model(args):
    report(f"model {args.model} ({args.backbone or 'its backbone'})", _model_case,
           {"train": "forward+backward", "eval": "eval forward"}, args)


def _train_case(kind, size, args, device_name, channels_last, amp):
    """A training iteration (step 0, or step 1 with the teacher) or an evaluation batch of BARM's
    resnet101 model, through the trainer's own step and prediction functions."""
    torch = torch_module()
    from datasets.transforms import normalize
    from engine.step import grad_scaler, train_iteration
    from methods import get_method
    from methods.base import StepContext
    from network import build_model
    from utils.schedulers import build_scheduler
    from utils.tasks import get_task

    device = torch.device(device_name)
    steps = tuple(tuple(s) for s in get_task("voc", "15-1"))
    ctx = StepContext("voc", steps, 0 if kind == "step0" else 1)
    method = get_method("barm", pseudo=True, bn_freeze=True)
    torch.manual_seed(0)
    student = build_model("deeplabv3bga_resnet101", ctx.classes_per_step)
    teacher = build_model("deeplabv3bga_resnet101", ctx.classes_per_step[:-1]) if kind == "step1" else None
    method.configure(student, ctx)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    student = student.to(device, memory_format=memory_format)
    if teacher is not None:
        teacher = teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, ctx.num_classes, (args.batch, size, size), generator=generator).to(device)
    images = normalize(images.to(device)).contiguous(memory_format=memory_format)
    optimizer = torch.optim.SGD(method.param_groups(student, ctx, 0.01), lr=0.01, momentum=0.9, nesterov=True)
    scheduler = build_scheduler("poly", optimizer, 1000)
    scaler = grad_scaler(device, amp)

    def run():
        if kind == "eval":
            student.eval()
            with torch.no_grad():
                logits, _ = student(images)
                method.predict(logits, labels.shape[-2:])
        else:
            method.set_train_mode(student, ctx)
            train_iteration(student, teacher, method, ctx, images, labels, optimizer, scheduler, scaler, amp)

    return throughput(run, args.batch, args.repeats, device)


def bench_train(args):
    kinds = {"step0": "train step 0", "step1": "train step 1 (+teacher)", "eval": "evaluation"}
    report("BARM deeplabv3bga_resnet101, VOC 15-1 (model side, data loading excluded)", _train_case, kinds, args,
           fp32_only=("eval",))  # evaluation runs in fp32, as the reference


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="class index build and cached reload on ADE-sized labels")
    index.add_argument("--n", type=int, default=20210, help="number of training labels")
    index.add_argument("--size", type=int, default=512, help="nominal label size")
    index.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    index.add_argument("--repeats", type=int, default=1)
    index.add_argument("--tmp", default=None, help="scratch folder (default: the system's)")
    index.set_defaults(run=bench_index)
    model = commands.add_parser("model", help="model forward/backward and eval throughput and peak memory")
    model.add_argument("--model", default="deeplabv3bga_resnet101")
    model.add_argument("--backbone", default=None, help="override the model name's backbone")
    model.add_argument("--sizes", type=int, nargs="+", default=[321, 513])
    model.add_argument("--batch", type=int, default=2)
    model.add_argument("--repeats", type=int, default=3)
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    model.set_defaults(run=bench_model)
    train = commands.add_parser("train", help="training (step 0, incremental with teacher) and evaluation")
    train.add_argument("--sizes", type=int, nargs="+", default=[321, 513])
    train.add_argument("--batch", type=int, default=2)
    train.add_argument("--repeats", type=int, default=3)
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    train.set_defaults(run=bench_train)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
