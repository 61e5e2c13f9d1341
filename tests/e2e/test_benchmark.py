"""End to end: scripts/benchmark.py's cases run: the data pipeline case in-process and every case of ``train``
as a user runs it."""
import json
import os
import subprocess
import sys

from tests.helpers import REPO, load_benchmark


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


def _bench_train(tmp_path, methods, cases, name):
    out_json, out_md = tmp_path / f"{name}.json", tmp_path / f"{name}.md"
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "benchmark.py"), "train", "--methods", *methods, "--backbone",
         "resnet18", "--crop", "49", "--batch", "2", "--images", "24", "--cases", *cases,
         "--precisions", "fp32", "--channels_last", "off", "--repeats", "1", "--device", "cpu", "--json",
         str(out_json), "--markdown", str(out_md), "--tmp", str(tmp_path)], capture_output=True, text=True,
        check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, json.loads(out_json.read_text()), out_md.read_text()


def test_train_cases_run_and_summarise(tmp_path):
    """Every case of ``train`` on a tiny configuration (ResNet-18, 49-pixel crops), as a user runs it (each
    case in a spawned process): rows with positive rates and FLOPs, the incremental summary, the JSON and
    Markdown files; FT has no teacher case (it trains without one)."""
    stdout, rows, md = _bench_train(tmp_path, ["lwf"], ["step0", "step1", "teacher", "eval"], "lwf")
    assert [(r["method"], r["case"]) for r in rows] == [("lwf", "step0"), ("lwf", "step1"), ("lwf", "teacher"),
                                                        ("lwf", "eval")]
    for r in rows:
        assert r["images_per_s"] > 0 and r["gflop_per_image"] > 0 and 0 < r["fraction_of_peak"]
    # LwF's step-1 iteration adds the teacher's forward to the student's forward and backward
    lwf = {r["case"]: r["gflop_per_image"] for r in rows}
    assert lwf["step1"] >= lwf["step0"] + 0.9 * lwf["teacher"]
    assert "lwf     fp32  cl=off: step 1 = " in stdout and "(step 0 + teacher forward)" in stdout
    assert md.count("\n| lwf |") == 4
    stdout, rows, _ = _bench_train(tmp_path, ["ft"], ["teacher"], "ft")
    assert rows == [] and "ft      teacher fp32  cl=off (no teacher)" in stdout
