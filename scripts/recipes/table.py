"""The recipe tables of the README and docs/recipes.md, written from scripts/recipes/published.tsv:

    python scripts/recipes/table.py summary     one row per method, dataset and source (the README's)
    python scripts/recipes/table.py full        one row per published setting, with its command (docs/recipes.md)

tests/scripts/test_recipes.py checks that both documents hold exactly these tables.
"""
import argparse
import csv
import os

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published.tsv")
MIB_FAMILY = ("ft", "lwf", "lwf-mc", "ilt", "ewc", "pi", "rw", "mib", "plop")
DATASETS = {"voc": "VOC", "ade": "ADE20K", "cityscapes_domain": "Cityscapes (domains)"}


def read_rows(path=TABLE):
    """The rows of the table as dicts (comment lines skipped)."""
    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader([line for line in handle if not line.startswith("#")], delimiter="\t"))


def command(row):
    """The recipe command of one row."""
    method, dataset, task, setting, protocol = (row[k] for k in ("method", "dataset", "task", "setting", "protocol"))
    if method in MIB_FAMILY:
        own = "plop" if method == "plop" else "mib"
        prefix = f"PROTOCOL={protocol} " if protocol != own else ""
        return f"{prefix}bash scripts/recipes/mib.sh {method} {dataset} {task} {setting}"
    if method in ("ssul", "ssul-m"):
        return f"bash scripts/recipes/ssul.sh {dataset} {task} {method}"
    if method in ("dkd", "dkd-m"):
        return f"bash scripts/recipes/dkd.sh {dataset} {task} {setting} {method}"
    if method == "rcil":
        return f"bash scripts/recipes/rcil.sh {dataset} {task} {setting}"
    return f"bash scripts/recipes/{method}.sh {dataset} {task}"


def label(row):
    protocol = f" ({row['protocol']}'s code)" if row["method"] in MIB_FAMILY and row["method"] != "plop" \
        and row["protocol"] == "plop" else ""
    return f"{row['method']}{protocol}"


def summary(rows):
    """One line per (method, dataset, protocol, source): the settings with their numbers."""
    groups = {}
    for row in rows:
        groups.setdefault((label(row), row["dataset"], row["source"]), []).append(row)
    lines = ["| method | data | settings: published number | source | known deviation |", "|---|---|---|---|---|"]
    for (name, dataset, source), group in groups.items():
        settings = ", ".join(f"{r['task']}{' disj.' if r['setting'] == 'disjoint' else ''}"
                             f"{'' if r['number'] == '-' else ': ' + r['number']}" for r in group)
        deviations = sorted({part for r in group for part in r["deviation"].split("; ") if part != "none"})
        lines.append(f"| {name} | {DATASETS[dataset]} | {settings} | {source} | {'; '.join(deviations) or 'none'} |")
    return "\n".join(lines)


def full(rows):
    lines = ["| method | data | task | setting | published | source | known deviation | command |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {label(row)} | {DATASETS[row['dataset']]} | {row['task']} | {row['setting']} |"
                     f" {row['number']} | {row['source']} | {row['deviation']} | `{command(row)}` |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=("summary", "full"))
    args = parser.parse_args(argv)
    print(summary(read_rows()) if args.which == "summary" else full(read_rows()))


if __name__ == "__main__":
    main()
