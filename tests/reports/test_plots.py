"""reports/plots.py: the report's figures are PNGs of the expected size."""
import os

import numpy as np
import pytest
from PIL import Image

from reports import runs as report_runs, tables as report_tables
from reports.plots import heatmap_size
from tests.helpers import IOU_BARM, IOU_FT, SUMMARY_BARM, SUMMARY_FT, write_run


@pytest.mark.slow  # ~1 s: renders the figures with matplotlib
def test_figures_are_pngs_of_the_expected_size(tmp_path):
    ft = write_run(tmp_path / "ckpt", "ft", IOU_FT, SUMMARY_FT)
    barm = write_run(tmp_path / "ckpt", "barm", IOU_BARM, SUMMARY_BARM)
    out = str(tmp_path / "out")
    written = report_tables.write_report([report_runs.load_run(ft), report_runs.load_run(barm)], out)
    pngs = sorted(name for name in written if name.endswith(".png"))
    assert pngs == ["heatmap_0_ft.png", "heatmap_1_barm.png", "miou_voc_2-1_overlap.png"]
    sizes = {}
    for name in pngs:
        with open(os.path.join(out, name), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
        with Image.open(os.path.join(out, name)) as image:
            image.verify()
        with Image.open(os.path.join(out, name)) as image:
            sizes[name] = image.size
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 0  # something is drawn
    assert sizes["miou_voc_2-1_overlap.png"] == (1200, 450)
    assert sizes["heatmap_0_ft.png"] == (800, 200 + 20 * 4) == heatmap_size(4)
    text = open(written["report.md"], encoding="utf-8").read()
    assert "![mIoU per step](miou_voc_2-1_overlap.png)" in text and "(heatmap_1_barm.png)" in text
