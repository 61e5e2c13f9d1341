"""engine/panels.py: prediction panels (sizes, palette colours at known pixels, legends), tensorboard, the
panels of a test loader and of ``--test --visualize``."""
import os
import types

import numpy as np
import torch
from PIL import Image

from datasets import ade, voc
from engine import panels as visualize
from engine.models import model_spec
from tests.helpers import GAP, TITLE, VOID
from utils.tasks import get_task


def panel_inputs():
    """A 6x5 image, its ground truth and a prediction, in channel positions of a task whose channels are the
    classes (0, 5, 3): channel 1 = bottle, channel 2 = bird."""
    image = torch.arange(3 * 6 * 5, dtype=torch.uint8).reshape(3, 6, 5)
    label = torch.zeros(6, 5, dtype=torch.long)
    label[1, 1], label[2, 3], label[5, 4] = 1, 2, 255
    prediction = torch.zeros(6, 5, dtype=torch.long)
    prediction[1, 1], prediction[2, 3] = 2, 1
    return image, label, prediction, [0, 5, 3]


def test_panel_size_and_palette_colours_at_known_pixels(tmp_path):
    image, label, prediction, class_ids = panel_inputs()
    panels = visualize.save_prediction_panels(image[None], prediction[None], str(tmp_path), ["x"], voc.palette(),
                                              voc.CLASS_NAMES, labels=label[None], class_ids=class_ids)
    panel = panels[0]
    # 3 panes of 5 px with 2 gaps = 23 px wide; legend: background, bottle, bird, void = 4 entries, one per row
    # (23 px < one 120 px column): 2*4 + 4*14 = 64 px; 14 + 6 + 64 = 84 px high
    assert panel.shape == (84, 23, 3) and panel.dtype == np.uint8
    assert np.array_equal(panel[TITLE:TITLE + 6, 0:5], image.permute(1, 2, 0).numpy())
    gt, pred = panel[TITLE:TITLE + 6, 5 + GAP:10 + GAP], panel[TITLE:TITLE + 6, 10 + 2 * GAP:15 + 2 * GAP]
    assert tuple(gt[0, 0]) == (0, 0, 0) and tuple(gt[1, 1]) == (128, 0, 128) and tuple(gt[2, 3]) == (128, 128, 0)
    assert tuple(gt[5, 4]) == VOID
    assert tuple(pred[1, 1]) == (128, 128, 0) and tuple(pred[2, 3]) == (128, 0, 128) and tuple(pred[5, 4]) == (0, 0, 0)
    assert tuple(panel[TITLE, 5]) == (255, 255, 255)  # the gap
    # legend swatches (inside their 1 px outline): row r's swatch starts at y = 14 + 6 + 4 + 14 r + 2, x = 4
    for row, colour in enumerate([(0, 0, 0), (128, 0, 128), (128, 128, 0), VOID]):
        assert tuple(panel[TITLE + 6 + 4 + 14 * row + 2 + 1, 4 + 1]) == colour, row
    with Image.open(tmp_path / "x.png") as written:
        assert np.array_equal(np.asarray(written), panel)
    names = [n for _, n in visualize.legend_entries([label, prediction], voc.CLASS_NAMES, class_ids,
                                                    ignored_map=label)]
    assert names == ["background", "bottle", "bird", "void / ignored"]


def test_panel_without_ground_truth_and_a_wide_legend():
    image = torch.zeros(3, 10, 130, dtype=torch.uint8)
    prediction = torch.zeros(10, 130, dtype=torch.long)
    prediction[:, 60:] = 1
    panel = visualize.prediction_panel(image, prediction, ade.palette(), ade.CLASS_NAMES)
    # 2 panes: 2*130 + 4 = 264 px, two 120 px legend columns: "other" and "wall" on one row (8 + 14 px)
    assert panel.shape == (TITLE + 10 + 22, 264, 3)
    assert tuple(panel[TITLE + 5, 134 + 70]) == tuple(ade.palette()[1])
    assert tuple(panel[TITLE + 10 + 4 + 3, 264 // 2 + 4 + 1]) == tuple(ade.palette()[1])  # second column swatch


def test_panels_go_to_tensorboard(tmp_path):
    calls = []
    writer = types.SimpleNamespace(add_image=lambda *args, **kwargs: calls.append((args, kwargs)))
    panels = [np.zeros((7, 9, 3), np.uint8), np.ones((4, 5, 3), np.uint8)]
    visualize.add_panels_to_tensorboard(writer, panels, ["a", "b"], 3)
    assert [(c[0][0], c[0][1].shape, c[0][2], c[1]) for c in calls] == [
        ("predictions/a", (7, 9, 3), 3, {"dataformats": "HWC"}),
        ("predictions/b", (4, 5, 3), 3, {"dataformats": "HWC"})]
    visualize.write_panels_to_tensorboard(str(tmp_path), panels, ["a", "b"], 0)
    events = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
    assert len(events) == 1 and os.path.getsize(tmp_path / events[0]) > sum(p.size for p in panels) // 10


def test_predict_panels_of_a_test_loader(tmp_path, tiny_checkpoint):
    """The ``--test --visualize N`` path: the first N images of the test loader's batches, with ground truth."""
    _, model, method = tiny_checkpoint
    images = torch.randint(0, 256, (2, 3, 17, 21), dtype=torch.uint8)
    labels = torch.zeros(2, 17, 21, dtype=torch.uint8)
    labels[:, 0] = 255
    loader = [(images, labels, {}, ("id0", "id1")), (images, labels, {}, ("id2", "id3"))]
    steps = get_task("voc", "15-1")
    panels, ids = visualize.predict_panels(model, method, loader, 3, str(tmp_path), voc.palette(), voc.CLASS_NAMES,
                                           [c for s in steps for c in s], torch.device("cpu"))
    assert ids == ["id0", "id1", "id2"] and sorted(os.listdir(tmp_path)) == ["id0.png", "id1.png", "id2.png"]
    assert all(p.shape[1] == 3 * 21 + 2 * GAP for p in panels)
    assert tuple(panels[0][TITLE, 21 + GAP]) == VOID  # ignored first row of the ground truth
    assert np.array_equal(panels[2][TITLE:TITLE + 17, :21], images[0].permute(1, 2, 0).numpy())


def test_visualize_test_step_on_a_synthetic_voc(tmp_path, tiny_checkpoint):
    """``--test --visualize 2``'s call: the test loader of the run's flags, panels with ground truth, tensorboard."""
    from datasets.synthetic import generate
    from engine.models import model_state
    from engine.context import make_context
    from methods import get_method_class
    from engine.cli import parse_args
    from engine.resolve import resolve_step
    from utils.checkpoint import load_checkpoint_file
    from utils.distributed import DistInfo

    path, _, method = tiny_checkpoint
    root = str(tmp_path / "VOC2012")
    generate("voc", root, n_train=2, n_val=3, size=48, seed=0, workers=1)
    args = parse_args(["--method", "ft", "--data_root", root, "--ckpt_dir", str(tmp_path / "ckpt"), "--task", "15-1",
                       "--overlap", "--backbone", "resnet18", "--crop_size", "49", "--crop_val", "--num_workers", "0",
                       "--test", "--device", "cpu"])
    args = resolve_step(args, method, 1, 1)
    ctx = make_context(args, 1)
    spec = model_spec(args, get_method_class("ft"))
    folder = str(tmp_path / "eval" / "step1")
    panels = visualize.visualize_test_step(ctx, args, method, spec, model_state(load_checkpoint_file(path)), path,
                                           DistInfo(), 2, folder)
    assert len(panels) == 2 and all(p.shape[1] == 3 * 49 + 2 * GAP for p in panels)
    assert len(os.listdir(os.path.join(folder, "panels"))) == 2
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(folder))
