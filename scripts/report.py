"""Tables and figures of one or several runs.

    python scripts/report.py RUN_FOLDER [RUN_FOLDER ...] --out DIR [--labels NAME ...] [--allow_mixed_conventions]
                             [--no_plots]

RUN_FOLDER is a setting folder ``{ckpt_dir}/{subpath}/{task}/{overlap|disjoint}`` (the run that ends at its
highest step), a step folder ``.../step{t}`` (the run that ends at that step) or a ``--test`` folder
``.../eval/{crop<N>|full}``. Writes into ``--out``:

* ``report.md``: per task, the runs side by side: the last step (old / new / all mIoU, hIoU, without
  background, the averages over steps, mean forgetting), per-step tables, forgetting per class, the figures;
* ``report.csv``: one row per run and step plus an ``avg`` row (percent); ``forgetting.csv``: one row per run
  and class (best IoU, its step, final IoU, forgetting, percent);
* ``groups.md`` and ``groups.csv``: the experiments, runs that differ only by their seed and class order (e.g.
  ``SEEDS="1 2 3"`` or ``ORDERS="a b c"`` of a recipe): mean ± sample standard deviation (n − 1) per step and column,
  the number of runs of each step; the experiments of several runs are also printed (standard output);
* ``miou_{dataset}_{task}_{setting}.png`` (old / new / all mIoU per step, every run of the task),
  ``miou_mean_{dataset}_{family}_{setting}.png`` (the experiments' means per step with a ± standard deviation
  band, where one has several runs) and ``heatmap_{i}_{run}.png`` (IoU per class and step of each run).

Runs evaluated under different conventions (``results.json``'s ``convention``) are refused (one line, exit
status 2) unless ``--allow_mixed_conventions``; the tables then name each run's convention. The logic lives
in ``reports`` (``reports.runs``: the runs, ``reports.experiments``: runs of
one experiment, ``reports.tables``: the tables, ``reports.plots``: the figures).
"""
import argparse
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from reports.experiments import experiment_groups  # noqa: E402 (after the path set-up)
from reports.runs import load_run  # noqa: E402
from reports.tables import experiment_lines, write_report  # noqa: E402
from utils.errors import UserError, exit_on_user_error  # noqa: E402
from utils.logging import setup_logging  # noqa: E402

log = logging.getLogger("ciss")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_FOLDER",
                        help="setting folder, step folder step<t>, or --test folder eval/<crop<N>|full>")
    parser.add_argument("--out", required=True, help="folder for report.md, report.csv, forgetting.csv and PNGs")
    parser.add_argument("--labels", nargs="+", default=None, metavar="NAME",
                        help="a name per RUN_FOLDER (default: the method, with the subpath where needed)")
    parser.add_argument("--allow_mixed_conventions", action="store_true",
                        help="report runs evaluated under different conventions together (the tables say so)")
    parser.add_argument("--no_plots", action="store_true", help="tables only")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    setup_logging(True)
    args = parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise UserError(f"--labels gives {len(args.labels)} name(s) for {len(args.runs)} RUN_FOLDER(s): expected"
                        f" one per folder")
    labels = args.labels or [None] * len(args.runs)
    runs = [load_run(folder, label) for folder, label in zip(args.runs, labels)]
    written = write_report(runs, args.out, allow_mixed=args.allow_mixed_conventions, plots=not args.no_plots)
    for experiment in experiment_groups(runs):
        if len(experiment.runs) > 1:
            print("\n".join(experiment_lines(experiment)) + "\n")
    log.info("report of %d run(s) in %s: %s", len(runs), args.out, ", ".join(sorted(os.path.basename(p)
                                                                                      for p in written.values())))
    return written


if __name__ == "__main__":
    main()
