"""scripts/report.py: mixed evaluation conventions are refused unless allowed, on the command line too."""
import importlib.util
import json
import os

import pytest

from reports import runs as report_runs, tables as report_tables
from tests.helpers import BARM, IOU_BARM, IOU_FT, MIB, REPO, SUMMARY_BARM, SUMMARY_FT, read_csv, write_run
from utils.errors import UserError


def test_mixed_conventions_refused_unless_allowed(tmp_path, capsys):
    ft = write_run(tmp_path, "ft", IOU_FT, SUMMARY_FT)
    mib = write_run(tmp_path, "mib", IOU_BARM, SUMMARY_BARM, convention=MIB)
    with pytest.raises(UserError, match="different evaluation conventions"):
        report_tables.write_report([report_runs.load_run(ft), report_runs.load_run(mib)], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "report.md")
    script = load_script()
    with pytest.raises(SystemExit) as exit_info:
        script.main([ft, mib, "--out", str(tmp_path / "cli")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--allow_mixed_conventions" in lines[0]
    written = script.main([ft, mib, "--out", str(tmp_path / "cli"), "--allow_mixed_conventions", "--no_plots"])
    text = open(written["report.md"], encoding="utf-8").read()
    assert "Mixed evaluation conventions" in text
    assert "| step | ft [A] | mib [B] |" in text
    assert "* [A] background with the old classes, absent classes count as 0" in text
    assert "* [B] background with the old classes, absent classes left out" in text
    conventions = {r["run"]: json.loads(r["convention"]) for r in read_csv(written["report.csv"])}
    assert conventions == {"ft": BARM, "mib": MIB}


def load_script():
    spec = importlib.util.spec_from_file_location("report_script", os.path.join(REPO, "scripts", "report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
