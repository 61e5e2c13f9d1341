"""scripts/compare_methods.sh with PYTHON=echo: SEEDS trains every method once per seed into its own subpath (FT's
shared step 0 of that seed copied to LwF, ILT and MiB), then one report of every run; without SEEDS, one run each."""
import os
import subprocess

from tests.helpers import REPO


def compare(tmp_path, **env):
    inherited = {k: v for k, v in os.environ.items() if k not in ("SEEDS", "METHODS", "OUT")}
    return subprocess.run(["bash", os.path.join("scripts", "compare_methods.sh")], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**inherited, "PYTHON": "echo", "OUT": str(tmp_path), **env})


def report_folders(stdout):
    line = next(line for line in stdout.splitlines() if "scripts/report.py" in line)
    words = line.split()
    return words[words.index("scripts/report.py") + 1:words.index("--out")]


def test_seeds_run_each_method_per_seed_and_report_them_all(tmp_path):
    ft_step0 = tmp_path / "checkpoints" / "ft-seed2" / "15-1" / "overlap" / "step0"
    ft_step0.mkdir(parents=True)
    (ft_step0 / "final.pth").write_text("seed 2's step 0")
    result = compare(tmp_path, SEEDS="1 2", METHODS="ft mib")
    assert result.returncode == 0, result.stderr
    ckpt = os.path.join(str(tmp_path), "checkpoints")
    assert report_folders(result.stdout) == [os.path.join(ckpt, run, "15-1", "overlap")
                                             for run in ("ft-seed1", "ft-seed2", "mib-seed1", "mib-seed2")]
    for run, seed in (("ft-seed1", 1), ("mib-seed2", 2)):
        launches = open(tmp_path / f"{run}.log", encoding="utf-8").read().splitlines()
        assert len(launches) == 2 and all(f"--random_seed {seed} --subpath {run} " in line for line in launches)
    # the shared step 0 is the same seed's
    assert (tmp_path / "checkpoints" / "mib-seed2" / "15-1" / "overlap" / "step0" / "final.pth").read_text() == \
        "seed 2's step 0"
    assert not (tmp_path / "checkpoints" / "mib-seed1" / "15-1" / "overlap" / "step0").exists()


def test_without_seeds_one_run_per_method_and_a_bad_seed_is_refused(tmp_path):
    result = compare(tmp_path, METHODS="ft")
    assert result.returncode == 0, result.stderr
    assert report_folders(result.stdout) == [os.path.join(str(tmp_path), "checkpoints", "ft", "15-1", "overlap")]
    assert "--random_seed" not in open(tmp_path / "ft.log", encoding="utf-8").read()
    refused = compare(tmp_path, METHODS="ft", SEEDS="1 x")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: SEEDS: 'x' is not a seed: expected non-negative integers, e.g. SEEDS=\"1 2\""]
