"""End to end, ``--accumulate``: a step trained with 2 micro-batches per optimizer step counts the same optimizer
steps (schedule, iterations) as one batch of their size (tests/engine/test_accumulation.py checks the update
itself), and says in its log and ``config.json`` what its batch was."""
import csv
import json
import os
import re

import torch

from tests.helpers import copy_run, run_inline, step_dir, train_cmd, weights


def _step1(tiny_voc, step0, tmp_path, name, *flags):
    ckpt = copy_run(step0, tmp_path / name)
    result = run_inline(train_cmd(tiny_voc, ckpt, "--curr_step", "1", "--end_step", "1", "--train_epoch", "2", *flags))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(step_dir(ckpt, 1), "config.json"), encoding="utf-8") as handle:
        return result.stdout + result.stderr, json.load(handle), weights(os.path.join(step_dir(ckpt, 1), "final.pth"))


def test_accumulated_step_matches_the_full_batch(tiny_voc, step0, tmp_path):
    plain_log, plain_config, plain = _step1(tiny_voc, step0, tmp_path, "plain")
    log, config, accumulated = _step1(tiny_voc, step0, tmp_path, "accumulated", "--accumulate", "2")
    assert config["total_iterations"] == plain_config["total_iterations"] > 0  # optimizer steps, not micro-batches
    assert config["batch"] == {"global": 4, "per_process": 4, "micro_batch": 2, "accumulate": 2, "processes": 1,
                               "batchnorm_statistics": "per micro-batch"}
    assert "2 micro-batches of 2 accumulated" in log and "BatchNorm statistics" in log
    # provenance in results.json and summary.csv: seed, class order, batch, accumulation, processes, software, device
    ckpt = tmp_path / "accumulated" / "ckpt"
    with open(os.path.join(step_dir(ckpt, 1), "results.json"), encoding="utf-8") as handle:
        origin = json.load(handle)["provenance"]
    assert origin["seed"] == 1 and origin["class_order"] == [list(range(16))] + [[c] for c in range(16, 21)]
    assert (origin["global_batch"], origin["batch_per_process"], origin["micro_batch"], origin["accumulate"],
            origin["processes"]) == (4, 4, 2, 2, 1)
    assert origin["torch"] == torch.__version__ and origin["device"]
    with open(os.path.join(os.path.dirname(step_dir(ckpt, 1)), "summary.csv"), encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[-1]["step"] == "1" and rows[-1]["accumulate"] == "2" and rows[-1]["global_batch"] == "4"
    assert rows[-1]["class_order"].startswith("0 1 2 3 ") and rows[-1]["class_order"].endswith("| 19 | 20")
    assert accumulated.keys() == plain.keys()
    assert all(torch.isfinite(v).all() for v in accumulated.values() if v.is_floating_point())
    # the schedule moves once per optimizer step: the epochs end at the same learning rates
    rates = [re.findall(r"step 1 epoch \d+/2: .*? \| lr (\S+) \|", text) for text in (plain_log, log)]
    assert len(rates[0]) == 2 and rates[0] == rates[1]
