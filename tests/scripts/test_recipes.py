"""scripts/recipes/*.sh: one recipe per published setting, each printing its number and source, whose command lines
(run with PYTHON=echo) pass the reference scripts' values (tests/reference_protocols.py), and a setting that was
never published is refused with one line."""
import csv
import os
import re
import shlex
import subprocess

import pytest

from tests.helpers import REPO
from tests.reference_protocols import expected

TABLE = os.path.join(REPO, "scripts", "recipes", "published.tsv")
MIB_FAMILY = ("ft", "lwf", "lwf-mc", "ilt", "ewc", "pi", "rw", "mib", "plop")
MEMORY = {"voc": 100, "ade": 300}  # SSUL README / DKD configs: memory images of SSUL-M and DKD-M


def rows():
    with open(TABLE, encoding="utf-8") as handle:
        lines = [line for line in handle if not line.startswith("#")]
    return list(csv.DictReader(lines, delimiter="\t"))


def invocation(row):
    """``(environment, script arguments)`` of the recipe of one published row."""
    method, dataset, task, setting = row["method"], row["dataset"], row["task"], row["setting"]
    if method in MIB_FAMILY:
        return {"PROTOCOL": row["protocol"]}, ["mib.sh", method, dataset, task, setting]
    if method in ("ssul", "ssul-m"):
        return {}, ["ssul.sh", dataset, task, method]
    if method in ("dkd", "dkd-m"):
        return {}, ["dkd.sh", dataset, task, setting, method]
    if method == "rcil":
        return {}, ["rcil.sh", dataset, task, setting]
    return {}, [f"{method}.sh", dataset, task]


def run_recipe(tmp_path, env, args):
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("GPUS", "GPUS_INIT", "EXTRA", "PROTOCOL", "SUBPATH", "SEEDS", "ORDERS", "REPORT_DIR")}
    environment = {**inherited, "PYTHON": "echo", "CKPT_DIR": str(tmp_path), **env}
    return subprocess.run(["bash", os.path.join("scripts", "recipes", args[0]), *args[1:]], cwd=REPO,
                          capture_output=True, text=True, env=environment, timeout=60)


def launches(stdout):
    """The train.py command lines a recipe ran: ``[(processes, {flag: value or True})]``."""
    found = []
    for line in stdout.splitlines():
        head, marker, tail = line.partition("train.py ")
        if not marker:
            continue
        processes = int(re.search(r"--nproc_per_node=(\d+)", head).group(1)) if "torch.distributed.run" in head else 1
        flags, words = {}, shlex.split(tail)
        for i, word in enumerate(words):
            if word.startswith("--"):
                following = words[i + 1] if i + 1 < len(words) else None
                flags[word[2:]] = following if following is not None and not following.startswith("--") else True
        found.append((processes, flags))
    return found


def as_value(flag, text):
    if text is True:
        return True
    return float(text) if flag in ("lr", "weight_decay") else int(text)


@pytest.mark.parametrize("row", rows(), ids=lambda r: f"{r['method']}-{r['dataset']}-{r['task']}-{r['setting']}-"
                                                      f"{r['protocol']}")
def test_a_recipe_passes_the_reference_values_and_prints_its_number(tmp_path, row):
    env, args = invocation(row)
    result = run_recipe(tmp_path, env, args)
    assert result.returncode == 0, result.stderr
    number = "no published number" if row["number"] == "-" else f"published {row['number']}"
    assert f": {number} ({row['source']}); known deviation: {row['deviation']}" in result.stderr
    steps = launches(result.stdout)
    method, dataset, task = row["method"], row["dataset"], row["task"]
    name = {"ssul-m": "ssul", "dkd-m": "dkd"}.get(method, method)
    if method in MIB_FAMILY and method != "plop" and row["protocol"] == "plop":
        name = f"{method}@plop"
    one_run = method in ("ssul", "ssul-m")  # SSUL's main.py trains every step in one run
    assert len(steps) == (1 if one_run else 2)
    for step, (processes, flags) in enumerate(steps):
        want = expected(name, dataset, task, step)
        assert flags["method"] == name.split("@")[0] and flags["dataset"] == dataset and flags["task"] == task
        assert ("overlap" in flags) == (row["setting"] == "overlap")
        assert flags["recipe"].startswith(f"{method}/{dataset}/{task}/{row['setting']}")
        for flag in ("crop_size", "random_seed", "output_stride", "train_epoch", "global_batch", "lr",
                     "weight_decay"):
            assert as_value(flag, flags[flag]) == pytest.approx(want[flag]), (step, flag)
        assert flags["lr_policy"] == want["lr_policy"] and "crop_val" in flags
        assert ("amp" in flags, "no_amp" in flags) == (want["amp"], not want["amp"])
        assert processes == want["gpus"], "the default GPUS are the published run's"
        if method in MIB_FAMILY:
            assert flags["protocol"] == row["protocol"]
        if method in ("ssul", "ssul-m", "dkd", "dkd-m") and (step > 0 or one_run):
            assert int(flags["mem_size"]) == (MEMORY[dataset] if method.endswith("-m") else 0)
        assert flags["curr_step"] == str(step) and ("initial" in flags) == (step == 0 and not one_run)
        assert flags["step0_from"] == "auto"  # a step 0 trained the same way by another run is reused


def test_every_method_and_the_settings_the_papers_published_have_a_recipe():
    published = {(r["method"], r["dataset"], r["task"], r["setting"]) for r in rows()}
    for setting in [("ssul", "voc", "5-3", "overlap"), ("ssul-m", "voc", "5-1", "overlap"),
                    ("ssul", "voc", "2-1", "overlap"), ("rcil", "voc", "5-3", "overlap"),
                    ("rcil", "ade", "50-50", "overlap"), ("dkd-m", "voc", "10-1", "overlap"),
                    ("kproba", "voc", "10-1", "overlap"), ("barm", "ade", "100-5", "overlap")]:
        assert setting in published
    methods = {r["method"] for r in rows()}
    assert methods == {"barm", "kproba", "ssul", "ssul-m", "dkd", "dkd-m", "rcil", *MIB_FAMILY}


@pytest.mark.parametrize("args, fragment", [
    (["barm.sh", "voc", "15-5"], "no published barm setting voc 15-5 overlap: published ones are 10-1 overlap"),
    (["mib.sh", "ewc", "ade", "100-50"], "no published ewc setting ade 100-50 overlap"),
    (["mib.sh", "sdr", "voc", "15-1"], "unknown method 'sdr'"),
    (["dkd.sh", "voc", "15-1", "overlap", "dkdm"], "unknown variant 'dkdm'"),
    (["mib.sh", "mib", "voc", "15-5", "overlap", {"ORDERS": "a b"}], "voc 15-5 has no published class orders"),
    (["barm.sh", "ade", "100-50", {"ORDERS": "d"}], "ade 100-50 has no order 'd': expected a (its own) or one of b c"),
    (["barm.sh", "voc", "15-1", {"ORDERS": "b b"}], "an order is given twice"),
    (["barm.sh", "voc", "15-1", {"SEEDS": "1 one"}], "SEEDS: 'one' is not a seed"),
    (["ssul.sh", "voc", "15-1", {"SEEDS": "3 3"}], "seed 3 is given twice"),
])
def test_a_setting_that_was_never_published_is_refused_with_one_line(tmp_path, args, fragment):
    env = args.pop() if isinstance(args[-1], dict) else {}
    result = run_recipe(tmp_path, env, args)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_the_mib_paper_protocol_is_the_default_and_plops_is_chosen_where_only_it_published(tmp_path):
    def recipe_name(args, env=None):
        return run_recipe(tmp_path, env or {}, args).stderr.split(":")[0]
    assert recipe_name(["mib.sh", "mib", "voc", "15-1"]) == "recipe mib/voc/15-1/overlap/mib-protocol"
    assert recipe_name(["mib.sh", "mib", "voc", "10-1"]) == "recipe mib/voc/10-1/overlap/plop-protocol"
    assert recipe_name(["mib.sh", "mib", "voc", "15-1"], {"PROTOCOL": "plop"}) == \
        "recipe mib/voc/15-1/overlap/plop-protocol"
    result = run_recipe(tmp_path, {"GPUS": "0,1,2", "EXTRA": "--resume --end_step 2"}, ["mib.sh", "plop", "ade", "100-5"])
    (processes, flags), _ = launches(result.stdout)
    assert processes == 3 and flags["end_step"] == "2"  # the user's flags come after --recipe
    line = next(line for line in result.stdout.splitlines() if "train.py" in line)
    assert line.index("--recipe") < line.index("--resume")


def between(path, marker):
    with open(os.path.join(REPO, path), encoding="utf-8") as handle:
        text = handle.read()
    return text.split(f"<!-- {marker} -->\n")[1].split(f"\n<!-- /{marker} -->")[0]


def test_the_readme_and_the_manual_hold_the_tables_of_published_tsv():
    from scripts.recipes.table import full, read_rows, summary
    assert between("README.md", "recipes:summary") == summary(read_rows())
    assert between("docs/recipes.md", "recipes:full") == full(read_rows())
    assert len(full(read_rows()).splitlines()) == len(rows()) + 2


def test_the_readme_names_the_flag_of_every_published_behaviour():
    from engine.resolve import deviations_of
    from methods import METHODS, get_method_class
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    table = readme.split("| published behaviour |")[1].split("\n\n")[0]
    for method in METHODS:
        cls = get_method_class(method)
        for deviation in deviations_of(cls):
            if deviation.flag == "select_best":
                assert "`--select_last`" in table
            elif deviation.flag == "bn_chunks":
                assert "`--bn_chunks 1`" in table
            elif isinstance(deviation.clean, bool):
                assert f"`--{'' if deviation.clean else 'no_'}{deviation.flag}`" in table, deviation.flag


def test_seeds_and_orders_run_every_seed_of_every_order_into_its_own_folder_then_the_report(tmp_path):
    """SEEDS and ORDERS: one run per order and seed; the seed, its subpath and the order's task are the user's choice
    (after --recipe); the recipe's other values unchanged; then scripts/report.py on every run's folder."""
    env = {"SEEDS": "1 2", "ORDERS": "a b c", "GPUS": ""}
    result = run_recipe(tmp_path, env, ["mib.sh", "mib", "ade", "100-50"])
    assert result.returncode == 0, result.stderr
    steps = launches(result.stdout)
    baseline = launches(run_recipe(tmp_path, {"GPUS": ""}, ["mib.sh", "mib", "ade", "100-50"]).stdout)
    assert len(baseline) == 2 and len(steps) == 2 * 3 * 2  # two launches per run, 3 orders x 2 seeds
    runs = {(flags["task"], flags["random_seed"], flags["subpath"], flags["curr_step"]) for _, flags in steps}
    assert runs == {(task, seed, f"mib-seed{seed}", step) for task in ("100-50", "100-50b", "100-50c")
                    for seed in ("1", "2") for step in ("0", "1")}
    for _, flags in steps:  # everything else is the published run's
        step = int(flags["curr_step"])
        assert {k: v for k, v in flags.items() if k not in ("task", "random_seed", "subpath")} == \
            {k: v for k, v in baseline[step][1].items() if k not in ("task", "random_seed", "subpath")}
    for line in (line for line in result.stdout.splitlines() if "train.py" in line):
        recipe = line.index("--recipe")
        assert line.rindex("--random_seed") > recipe and line.rindex("--subpath") > recipe
        assert line.index("--task") < recipe and ("--task 100-50 " in line[:recipe])
    report = [line for line in result.stdout.splitlines() if "scripts/report.py" in line]
    assert len(report) == 1
    words = report[0].split()
    folders = words[words.index("scripts/report.py") + 1:words.index("--out")]
    assert folders == [os.path.join(str(tmp_path), f"mib-seed{seed}", task, "overlap")
                       for task in ("100-50", "100-50b", "100-50c") for seed in (1, 2)]
    assert words[words.index("--out") + 1] == os.path.join(str(tmp_path), "reports", "mib-100-50-overlap")


def test_only_seeds_keeps_the_task_and_no_seeds_keeps_the_published_run(tmp_path):
    result = run_recipe(tmp_path, {"SEEDS": "7", "GPUS": ""}, ["ssul.sh", "voc", "15-1"])
    (_, flags), = launches(result.stdout)
    line = next(line for line in result.stdout.splitlines() if "train.py" in line)
    assert line.count("--task") == 1 and flags["random_seed"] == "7" and flags["subpath"] == "SSUL-seed7"
    assert "scripts/report.py" in result.stdout
    plain = run_recipe(tmp_path, {"GPUS": ""}, ["ssul.sh", "voc", "15-1"])
    (_, flags), = launches(plain.stdout)
    assert flags["random_seed"] == "1" and flags["subpath"] == "SSUL" and "scripts/report.py" not in plain.stdout


@pytest.mark.parametrize("script, dataset, task, letters", [
    ("barm.sh", "voc", "15-1", "b c d e f g h i j k l m n o p q r s t u v w"),
    ("barm.sh", "ade", "100-50", "b c"), ("barm.sh", "ade", "100-10", "b c"), ("barm.sh", "ade", "50-50", "b c"),
])
def test_every_order_of_orders_is_a_task_of_the_task_table_with_the_same_step_sizes(tmp_path, script, dataset, task,
                                                                                  letters):
    from utils.tasks import get_task, list_tasks
    result = run_recipe(tmp_path, {"ORDERS": f"a {letters}", "GPUS": ""}, [script, dataset, task])
    assert result.returncode == 0, result.stderr
    tasks = []
    for _, flags in launches(result.stdout):
        if flags["task"] not in tasks:
            tasks.append(flags["task"])
    assert len(tasks) == 1 + len(letters.split()) and tasks[0] == task
    sizes = [len(s) for s in get_task(dataset, task)]
    for name in tasks[1:]:
        assert name in list_tasks(dataset)
        assert [len(s) for s in get_task(dataset, name)] == sizes and get_task(dataset, name) != get_task(dataset, task)
