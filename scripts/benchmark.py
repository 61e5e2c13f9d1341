"""Benchmarks (not tests): speed and memory of the data pipeline, the model and training.

    python scripts/benchmark.py index [--n 20210] [--size 512]     class index: full build and cached reload
    python scripts/benchmark.py model [--sizes 321 513]            model forward/backward and eval images/s

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
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
