"""predict.py on a folder of two images with a checkpoint of a tiny model built with the trainer's calls, and its
one-line errors."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import predict
from datasets import voc
from engine import panels as visualize
from tests.helpers import GAP, TITLE


def test_predict_folder_of_two_images(tmp_path, tiny_checkpoint):
    path, model, _ = tiny_checkpoint
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a": (40, 30), "b": (33, 47)}  # (width, height)
    for stem, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{stem}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    written = predict.main(["--ckpt", path, "--images", str(folder), "--out", str(out), "--device", "cpu"])
    assert [os.path.basename(p) for p in written] == ["a.png", "b.png"]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for stem, (w, h) in sizes.items():
        pixels = np.asarray(Image.open(folder / f"{stem}.png").convert("RGB"))
        # the expected prediction, by hand: normalise, forward, upsample the logits, argmax (as MiB train.py::Trainer)
        x = torch.from_numpy(((pixels / 255.0 - mean) / std).transpose(2, 0, 1)[None]).float()
        with torch.no_grad():
            logits = model(x)[0]
        expected = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).argmax(1)[0].numpy()
        with Image.open(out / f"{stem}.png") as result:
            assert result.mode == "P" and result.size == (w, h)
            values = np.asarray(result)
            assert tuple(result.getpalette()[3 * 15:3 * 16]) == (192, 128, 128)  # VOC's person colour
        assert np.array_equal(values, expected)  # channels 0..16 are class ids 0..16 in 15-1
        assert len(np.unique(values)) > 1
        with Image.open(out / "panels" / f"{stem}.png") as panel:
            entries = len(np.unique(values))
            assert panel.size == (2 * w + GAP, TITLE + h + visualize.legend_height(entries, 2 * w + GAP))
            panel = np.asarray(panel)
        assert np.array_equal(panel[TITLE:TITLE + h, :w], pixels)
        assert np.array_equal(panel[TITLE:TITLE + h, w + GAP:], voc.palette()[values])


def test_predict_errors_are_one_line(tmp_path, tiny_checkpoint, capsys):
    path = tiny_checkpoint[0]
    (tmp_path / "empty").mkdir()
    cases = [(["--ckpt", path, "--images", str(tmp_path / "empty"), "--device", "cpu"], "holds no image"),
             (["--ckpt", str(tmp_path / "none.pth"), "--images", str(tmp_path), "--device", "cpu"], "does not exist")]
    if not torch.cuda.is_available():
        cases.append((["--ckpt", path, "--images", str(tmp_path), "--device", "cuda"], "CUDA is not available"))
    for argv, fragment in cases:
        with pytest.raises(SystemExit) as exit_info:
            predict.main(argv + ["--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], lines
    not_ciss = str(tmp_path / "plain.pth")
    torch.save({"model_state": {}}, not_ciss)
    with pytest.raises(SystemExit):
        predict.main(["--ckpt", not_ciss, "--images", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert "expected a ciss checkpoint" in capsys.readouterr().err
