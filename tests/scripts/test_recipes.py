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
    inherited = {k: v for k, v in os.environ.items() if k not in ("GPUS", "GPUS_INIT", "EXTRA", "PROTOCOL", "SUBPATH")}
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
])
def test_a_setting_that_was_never_published_is_refused_with_one_line(tmp_path, args, fragment):
    result = run_recipe(tmp_path, {}, args)
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
