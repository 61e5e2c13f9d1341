"""Prediction panels: image | ground truth | prediction, coloured with the dataset's palette,
with a legend of the classes present; PNG files and arrays for tensorboard.

Labels and predictions are channel positions (the model's output order, 255 = ignore), as the test loader
and ``Method.predict`` give them; ``class_ids`` maps channel c to the dataset's class id (the task's classes
in step order), which picks the palette colour and the name. A channel beyond ``class_ids`` (none when
``class_ids`` covers the whole task) is drawn like void.

Panel layout (pixels, H x W the image's size, k = 3 panes with a ground truth, 2 without)::

    width  = k·W + (k − 1)·PANE_GAP
    height = TITLE_HEIGHT + H + legend_height(entries, width)
    legend_height(n, width) = 2·LEGEND_PADDING + ceil(n / max(1, width // LEGEND_COLUMN_WIDTH))·LEGEND_ROW_HEIGHT

pane i starts at x = i·(W + PANE_GAP), y = TITLE_HEIGHT; the legend lists the classes present in the ground
truth or the prediction (channel order), then "void / ignored" when the ground truth has ignored pixels,
row-major in ``per_row = max(1, width // LEGEND_COLUMN_WIDTH)`` columns ``width // per_row`` pixels wide;
entry n's swatch (LEGEND_SWATCH px with a 1 px outline) starts at x = (n mod per_row)·(width // per_row) +
LEGEND_PADDING, y = TITLE_HEIGHT + H + LEGEND_PADDING + (n div per_row)·LEGEND_ROW_HEIGHT + 2.
"""
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from datasets import get_layout
from datasets.transforms import normalize
from engine.data import eval_loader
from engine.models import build_eval_model, to_device, use_channels_last

IGNORE_INDEX = 255
VOID_INDEX = 255  # palette entry of ignored pixels
PANE_GAP = 4
TITLE_HEIGHT = 14
LEGEND_PADDING = 4
LEGEND_ROW_HEIGHT = 14
LEGEND_COLUMN_WIDTH = 120
LEGEND_SWATCH = 10
TEXT_OFFSET = 2  # between a swatch or a pane's edge and its text
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
IGNORED_NAME = "void / ignored"
PANE_TITLES = ("image", "ground truth", "prediction")
PANEL_DIR = "panels"
TENSORBOARD_TAG = "predictions"


def dataset_palette(dataset, data_root=None):
    """The (256, 3) uint8 palette of ``dataset`` ("voc", "ade"; "custom" with its ``data_root``): its layout's
    ``palette()``."""
    return get_layout(dataset, data_root).palette()


def _numpy(array):
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def palette_indices(labels, class_ids=None, ignore_index=IGNORE_INDEX):
    """Palette index per pixel of channel positions ``labels`` (H, W): ``class_ids[label]`` (the label itself
    without ``class_ids``); ignored pixels and channels without a class id -> ``VOID_INDEX``."""
    labels = _numpy(labels).astype(np.int64)
    if class_ids is None:
        lut = np.arange(VOID_INDEX + 1)
    else:
        lut = np.full(VOID_INDEX + 1, VOID_INDEX)
        lut[:len(class_ids)] = class_ids
    valid = (labels >= 0) & (labels < len(lut)) & (labels != ignore_index)
    return np.where(valid, lut[np.clip(labels, 0, len(lut) - 1)], VOID_INDEX)


def colorize(labels, palette, class_ids=None, ignore_index=IGNORE_INDEX):
    """(H, W, 3) uint8 colours of the channel positions ``labels`` (H, W) (see :func:`palette_indices`)."""
    return np.asarray(palette, dtype=np.uint8)[palette_indices(labels, class_ids, ignore_index)]


def legend_entries(maps, class_names, class_ids=None, ignore_index=IGNORE_INDEX, ignored_map=None):
    """``[(palette index, name)]`` of the channels present in any of ``maps`` (channel order), then void when
    ``ignored_map`` (the ground truth) has ignored pixels. ``class_names`` is indexed by class id."""
    present = set()
    for labels in maps:
        values = np.unique(_numpy(labels))
        present.update(int(v) for v in values if v != ignore_index)
    n_channels = VOID_INDEX if class_ids is None else len(class_ids)
    entries = []
    for channel in sorted(present):
        if channel < n_channels:
            class_id = channel if class_ids is None else int(class_ids[channel])
            entries.append((class_id, class_names[class_id] if class_id < len(class_names) else str(class_id)))
    ignored = ignored_map is not None and bool(np.any(_numpy(ignored_map) == ignore_index))
    if ignored or any(channel >= n_channels for channel in present):
        entries.append((VOID_INDEX, IGNORED_NAME))
    return entries


def legend_height(n_entries, width):
    """Height in pixels of a legend of ``n_entries`` under a panel ``width`` pixels wide (0 entries: 0)."""
    if n_entries == 0:
        return 0
    per_row = max(1, width // LEGEND_COLUMN_WIDTH)
    return 2 * LEGEND_PADDING + math.ceil(n_entries / per_row) * LEGEND_ROW_HEIGHT


def _fit(draw, text, font, width):
    """``text`` cut (with "…") to at most ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…" if text else ""


def _image_hwc(image):
    image = _numpy(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be uint8 (3, H, W), got shape {image.shape}")
    return np.ascontiguousarray(image.transpose(1, 2, 0)).astype(np.uint8)


def prediction_panel(image, prediction, palette, class_names, label=None, class_ids=None,
                     ignore_index=IGNORE_INDEX):
    """One panel as a (height, width, 3) uint8 array (module docstring: layout and sizes).

    ``image``: uint8 (3, H, W) (the evaluation transform's output, before normalisation); ``prediction`` and
    ``label`` (optional ground truth): channel positions (H, W), 255 = ignore in ``label``; ``palette``:
    (256, 3) colours by class id (:func:`dataset_palette`); ``class_names``: names by class id;
    ``class_ids``: class id of each channel (None: channel = class id).
    """
    pixels = _image_hwc(image)
    h, w = pixels.shape[:2]
    panes = [pixels]
    maps = [prediction]
    if label is not None:
        panes.append(colorize(label, palette, class_ids, ignore_index))
        maps.insert(0, label)
    panes.append(colorize(prediction, palette, class_ids, ignore_index))
    for labels in maps:
        if tuple(_numpy(labels).shape) != (h, w):
            raise ValueError(f"label map of shape {tuple(_numpy(labels).shape)} for an image of {h}x{w}")
    titles = PANE_TITLES if label is not None else (PANE_TITLES[0], PANE_TITLES[2])
    entries = legend_entries(maps, class_names, class_ids, ignore_index, ignored_map=label)
    width = len(panes) * w + (len(panes) - 1) * PANE_GAP
    height = TITLE_HEIGHT + h + legend_height(len(entries), width)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (pane, title) in enumerate(zip(panes, titles)):
        x = i * (w + PANE_GAP)
        canvas.paste(Image.fromarray(pane), (x, TITLE_HEIGHT))
        draw.text((x + TEXT_OFFSET, 1), _fit(draw, title, font, w - TEXT_OFFSET), fill=TEXT_COLOUR, font=font)
    per_row = max(1, width // LEGEND_COLUMN_WIDTH)
    column = width // per_row
    colours = np.asarray(palette, dtype=np.uint8)
    for n, (index, name) in enumerate(entries):
        x = (n % per_row) * column + LEGEND_PADDING
        y = TITLE_HEIGHT + h + LEGEND_PADDING + (n // per_row) * LEGEND_ROW_HEIGHT
        top = y + (LEGEND_ROW_HEIGHT - LEGEND_SWATCH) // 2
        draw.rectangle((x, top, x + LEGEND_SWATCH - 1, top + LEGEND_SWATCH - 1),
                       fill=tuple(int(c) for c in colours[index]), outline=TEXT_COLOUR)
        text_x = x + LEGEND_SWATCH + TEXT_OFFSET
        draw.text((text_x, y), _fit(draw, name, font, column - (text_x - (n % per_row) * column) - LEGEND_PADDING),
                  fill=TEXT_COLOUR, font=font)
    return np.asarray(canvas)


def save_prediction_panels(images, predictions, out_dir, names, palette, class_names, labels=None, class_ids=None,
                           ignore_index=IGNORE_INDEX):
    """Write one panel per image to ``out_dir/{name}.png`` and return the panels ((h, w, 3) uint8 arrays, for
    tensorboard: :func:`add_panels_to_tensorboard`).

    ``images``: uint8 (B, 3, H, W) (or a list of (3, H_i, W_i)); ``predictions``: channel positions (B, H, W)
    (or a list); ``labels``: the ground truth the same way, or None (panels without it); ``names``: B file
    stems. The other arguments as in :func:`prediction_panel`.
    """
    os.makedirs(out_dir, exist_ok=True)
    panels = []
    for i, name in enumerate(names):
        panel = prediction_panel(images[i], predictions[i], palette, class_names,
                                 label=None if labels is None else labels[i], class_ids=class_ids,
                                 ignore_index=ignore_index)
        Image.fromarray(panel).save(os.path.join(out_dir, f"{name}.png"))
        panels.append(panel)
    return panels


def add_panels_to_tensorboard(writer, panels, names, step, tag=TENSORBOARD_TAG):
    """``writer.add_image(f"{tag}/{name}", panel, step, dataformats="HWC")`` for every panel (a tensorboardX
    ``SummaryWriter`` or anything with that method)."""
    for panel, name in zip(panels, names):
        writer.add_image(f"{tag}/{name}", panel, step, dataformats="HWC")


def write_panels_to_tensorboard(folder, panels, names, step, tag=TENSORBOARD_TAG):
    """The panels as images of a tensorboard events file in ``folder`` (a new ``SummaryWriter``)."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(folder)
    try:
        add_panels_to_tensorboard(writer, panels, names, step, tag)
    finally:
        writer.close()


def predict_panels(model, method, loader, count, out_dir, palette, class_names, class_ids, device,
                   channels_last=False):
    """Panels of the first ``count`` images of a test ``loader`` (batches ``(images uint8, labels, extras,
    ids)`` as ``engine.data.eval_loader`` gives them) predicted by ``model`` in eval mode with
    ``method.predict``; written to ``out_dir/{id}.png``. Returns ``(panels, ids)``."""
    model.eval()
    panels, ids = [], []
    with torch.no_grad():
        for images, labels, _, batch_ids in loader:
            if len(ids) >= count:
                break
            take = min(count - len(ids), len(batch_ids))
            inputs = normalize(images[:take].to(device))
            if channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            logits, _ = model(inputs)
            predictions = method.predict(logits, labels.shape[-2:])
            names = [str(i) for i in batch_ids[:take]]
            panels += save_prediction_panels(images[:take], predictions.cpu(), out_dir, names, palette, class_names,
                                             labels=labels[:take], class_ids=class_ids)
            ids += names
    return panels, ids


def visualize_test_step(ctx, config, method, spec, state, path, dist_info, count, folder):
    """``--test --visualize N`` for one step: panels of the first ``count`` test images of rank 0's share (image
    | ground truth | prediction) in ``folder/panels/{id}.png`` and as tensorboard images (tag ``predictions/{id}``,
    global step = the step) in ``folder``. Call it on every rank (building the test loader is collective);
    only rank 0 predicts and writes. The model is built and loaded as for the test (``build_eval_model``).
    Returns the panels (rank 0; ``[]`` elsewhere)."""
    loader = eval_loader(ctx, config, "test", dist_info, method)
    if not dist_info.is_main or count <= 0:
        return []
    model = to_device(build_eval_model(method, spec, ctx, state, path), config, dist_info.device)
    panels, ids = predict_panels(model, method, loader, count, os.path.join(folder, PANEL_DIR),
                                 get_layout(ctx.dataset, ctx.data_root).palette(),
                                 get_layout(ctx.dataset, ctx.data_root).CLASS_NAMES,
                                 [c for s in ctx.steps for c in s], dist_info.device,
                                 use_channels_last(config, dist_info.device))
    write_panels_to_tensorboard(folder, panels, ids, ctx.step)
    return panels
