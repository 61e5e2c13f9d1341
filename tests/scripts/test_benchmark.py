"""scripts/benchmark.py: the incremental-cost summary (hand-made rows)."""
from tests.helpers import load_benchmark


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
