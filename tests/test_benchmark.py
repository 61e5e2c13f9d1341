"""scripts/benchmark.py: the incremental-cost summary (hand-made rows) and a run of the data pipeline case."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_script", os.path.join(REPO, "scripts", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(method, case, seconds, precision="amp", channels_last=True):
    return {"method": method, "case": case, "precision": precision, "channels_last": channels_last,
            "compile": False, "s_per_iteration": seconds}


def test_incremental_costs_against_step0_and_teacher():
    bench = load_benchmark()
    rows = [row("barm", "step0", 1.0), row("barm", "step1", 1.30), row("barm", "teacher", 0.25),
            row("mib", "step0", 2.0), row("mib", "step1", 2.2), row("mib", "teacher", 0.0999),
            row("ft", "step0", 1.0), row("ft", "eval", 0.2)]  # no step 1: no line
    lines = bench.incremental_costs(rows)
    assert lines[0].startswith("incremental step")
    assert len(lines) == 3
    # barm: 1.30 / 1.00 = 1.30x step 0; 1.30 / (1.00 + 0.25) = 1.04 <= 1.05: within
    assert "step 1 = 1.30x step 0" in lines[1] and "1.04x" in lines[1] and "within" in lines[1]
    # mib: 2.2 / 2.0999 = 1.0477 -> within; then a step 1 of 2.21 / 2.0999 = 1.0524 -> over
    assert "within" in lines[2]
    rows[4] = row("mib", "step1", 2.21)
    assert "over" in bench.incremental_costs(rows)[2]
    # configurations are kept apart: an fp32 step 0 does not pair with an amp step 1
    assert bench.incremental_costs([row("barm", "step0", 1.0, "fp32"), row("barm", "step1", 1.3)]) == []


def test_data_pipeline_case_runs(tmp_path, capsys):
    bench = load_benchmark()
    bench.main(["data", "--size", "65", "--images", "4", "--batch", "2", "--repeats", "1", "--device", "cpu",
                "--tmp", str(tmp_path)])
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()[1:]]
    assert [(words[0], words[1]) for words in lines] == [("barm", "decode"), ("barm", "--device_augment:"),
                                                         ("mib", "decode"), ("mib", "--device_augment:")]
    for words in lines:  # every rate printed is a positive number
        rates = [float(words[k - 1]) for k, word in enumerate(words) if word == "images/s"]
        assert rates and all(r > 0 for r in rates)


def test_train_cases_run_and_summarise(tmp_path):
    """Every case of ``train`` on a tiny configuration (ResNet-18, 49-pixel crops), as a user runs it (each
    case in a spawned process): rows with positive rates and FLOPs, no teacher case for FT (it has none), the
    incremental summary, the JSON and Markdown files."""
    import json
    import subprocess
    import sys
    out_json, out_md = tmp_path / "rows.json", tmp_path / "rows.md"
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "benchmark.py"), "train", "--methods", "ft", "lwf", "--backbone",
         "resnet18", "--crop", "49", "--batch", "2", "--images", "24", "--cases", "step0", "step1", "teacher", "eval", "--precisions", "fp32", "--channels_last",
         "off", "--repeats", "1", "--device", "cpu", "--json", str(out_json), "--markdown", str(out_md), "--tmp",
         str(tmp_path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out_json.read_text())
    assert [(r["method"], r["case"]) for r in rows] == [("ft", "step0"), ("ft", "step1"), ("ft", "eval"),
                                                        ("lwf", "step0"), ("lwf", "step1"), ("lwf", "teacher"),
                                                        ("lwf", "eval")]
    for r in rows:
        assert r["images_per_s"] > 0 and r["gflop_per_image"] > 0 and 0 < r["fraction_of_peak"]
    # LwF's step-1 iteration adds the teacher's forward to the student's forward and backward
    lwf = {r["case"]: r["gflop_per_image"] for r in rows if r["method"] == "lwf"}
    assert lwf["step1"] >= lwf["step0"] + 0.9 * lwf["teacher"]
    assert "ft      fp32  cl=off: step 1 = " in done.stdout and "(no teacher)" in done.stdout
    assert "lwf     fp32  cl=off: step 1 = " in done.stdout and "(step 0 + teacher forward)" in done.stdout
    assert out_md.read_text().count("\n| lwf |") == 4
