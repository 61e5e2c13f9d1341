"""Figures of the report, drawn with matplotlib's Agg canvas (no display, no pyplot state).

* :func:`plot_miou_per_step`: mIoU of the old, new and all classes per step (three panels), every run on one
  figure;
* :func:`plot_class_heatmap`: one run's IoU per class (rows) and step (columns);
* :func:`plot_miou_band`: the same panels for experiments (runs that differ only by seed and class order): the
  mean per step as a line, ± the standard deviation as a shaded band and error bars.

Figures have a fixed size in pixels (documented per function), so reports stay comparable and tests can check
them; values are fractions in, percent on the axes.
"""
import math

import numpy as np

DPI = 100
MIOU_FIGURE_PX = (1200, 450)  # width, height
HEATMAP_WIDTH_PX = 800
HEATMAP_BASE_HEIGHT_PX = 200  # title, axis labels and colour bar
HEATMAP_ROW_PX = 20  # per class
HEATMAP_ANNOTATE_MAX_CELLS = 400  # write the IoU in each cell up to this many cells
HEATMAP_MISSING_COLOUR = "lightgrey"  # class not yet introduced, or absent and left out by the convention
HEATMAP_COLOUR_MAP = "viridis"
PERCENT = 100.0
LINE_STYLES = (("mIoU_old", "old"), ("mIoU_new", "new"), ("mIoU", "all"))  # one panel each
PANEL_KEYS = tuple(key for key, _ in LINE_STYLES)  # the summary keys a series gives, one per panel
RUN_COLOURS = "tab10"  # up to 10 runs
RUN_COLOURS_MANY = "tab20"  # more runs
RUN_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LEGEND_WIDTH_RATIO = 0.45  # the legend column's width relative to a panel
BAND_ALPHA = 0.25  # opacity of the ± standard deviation band
ERROR_BAR_CAP = 3  # points


def _figure(width_px, height_px):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path, width_px, height_px):
    """Save at exactly ``width_px`` x ``height_px`` (the size in inches is set from the pixels again, so
    floating-point rounding of inches x dpi cannot lose a pixel)."""
    figure.set_size_inches((width_px + 0.5) / DPI, (height_px + 0.5) / DPI)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def _percent(values):
    return [math.nan if v is None else PERCENT * float(v) for v in values]


def plot_miou_per_step(series, path, title=""):
    """mIoU per step of every run, one panel per class set: old, new, all (1200 x 450 px PNG at ``path``).

    ``series``: ``[(label, steps, {"mIoU_old": [...], "mIoU_new": [...], "mIoU": [...]}), ...]`` with fractions
    per step (None where undefined, e.g. new at step 0). One colour and marker per run (the same in the three
    panels; up to 20 distinct colours), one legend to the right. Returns ``path``.
    """
    width, height = MIOU_FIGURE_PX
    figure = miou_figure([(label, steps, values, None) for label, steps, values in series], title)
    return _save(figure, path, width, height)


def heatmap_size(n_classes):
    """``(width, height)`` in pixels of :func:`plot_class_heatmap` for ``n_classes`` rows:
    ``(800, 200 + 20 · n_classes)``."""
    return HEATMAP_WIDTH_PX, HEATMAP_BASE_HEIGHT_PX + HEATMAP_ROW_PX * n_classes


def plot_class_heatmap(matrix, class_labels, steps, path, title=""):
    """IoU per class and step as a heat map (PNG at ``path``, :func:`heatmap_size` pixels).

    ``matrix``: (C, T) fractions, NaN where a class has no IoU (not yet introduced, or absent and left out by
    the convention; drawn light grey); ``class_labels``: C row names; ``steps``: T column names. Cells hold
    their value in % when the map has at most 400 cells. Returns ``path``.
    """
    from matplotlib import colormaps

    values = np.asarray(matrix, dtype=np.float64) * PERCENT
    n_classes, n_steps = values.shape
    width, height = heatmap_size(n_classes)
    figure = _figure(width, height)
    axes = figure.add_subplot(1, 1, 1)
    colour_map = colormaps[HEATMAP_COLOUR_MAP].with_extremes(bad=HEATMAP_MISSING_COLOUR)
    image = axes.imshow(np.ma.masked_invalid(values), cmap=colour_map, vmin=0, vmax=PERCENT, aspect="auto",
                        interpolation="nearest")
    axes.set_xticks(range(n_steps), [str(s) for s in steps])
    axes.set_yticks(range(n_classes), list(class_labels), fontsize="small")
    axes.set_xlabel("step")
    axes.set_title(title)
    if n_classes * n_steps <= HEATMAP_ANNOTATE_MAX_CELLS:
        for c in range(n_classes):
            for t in range(n_steps):
                if not math.isnan(values[c, t]):
                    axes.text(t, c, f"{values[c, t]:.0f}", ha="center", va="center", fontsize="x-small",
                              color="white" if values[c, t] < PERCENT / 2 else "black")
    figure.colorbar(image, ax=axes, label="IoU (%)")
    figure.tight_layout()
    return _save(figure, path, width, height)


def miou_figure(series, title=""):
    """The three panels (old, new, all) of :func:`plot_miou_per_step` and :func:`plot_miou_band`, a matplotlib
    ``Figure``: ``series`` = ``[(label, steps, means, stds), ...]``; where ``stds`` is not None, a band of ± the
    standard deviation (the ``PolyCollection`` s that ``fill_between`` adds to the panels, in ``series`` order) and
    error bars."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    width, height = MIOU_FIGURE_PX
    figure = _figure(width, height)
    banded = any(stds is not None for _, _, _, stds in series)
    colours = colormaps[RUN_COLOURS if len(series) <= colormaps[RUN_COLOURS].N else RUN_COLOURS_MANY]
    style = [(colours(i % colours.N), RUN_MARKERS[i % len(RUN_MARKERS)]) for i in range(len(series))]
    grid = figure.add_gridspec(1, len(LINE_STYLES) + 1, width_ratios=[1] * len(LINE_STYLES) + [LEGEND_WIDTH_RATIO])
    all_steps = sorted({step for _, steps, _, _ in series for step in steps})
    for k, (key, name) in enumerate(LINE_STYLES):
        axes = figure.add_subplot(grid[0, k])
        for (label, steps, means, stds), (colour, marker) in zip(series, style):
            centre = np.asarray(_percent(means.get(key, [None] * len(steps))))
            axes.plot(steps, centre, color=colour, marker=marker, markersize=4, linewidth=1.2)
            if stds is None:
                continue
            spread = np.asarray(_percent(stds.get(key, [None] * len(steps))))
            defined = np.isfinite(centre) & np.isfinite(spread)
            lower, upper = np.where(defined, centre - spread, 0.0), np.where(defined, centre + spread, 0.0)
            axes.fill_between(steps, lower, upper, where=defined, color=colour, alpha=BAND_ALPHA, linewidth=0)
            if defined.any():  # a step whose neighbours have no spread still shows it
                axes.errorbar(np.asarray(steps)[defined], centre[defined], yerr=spread[defined], fmt="none",
                              ecolor=colour, capsize=ERROR_BAR_CAP, linewidth=1)
        axes.set_xticks(all_steps)
        axes.set_xlabel("step")
        axes.set_ylim(0, PERCENT)
        axes.grid(True, alpha=0.3)
        axes.set_title(f"{name} classes")
        if k == 0:
            axes.set_ylabel("mIoU (%), mean ± std" if banded else "mIoU (%)")
        else:
            axes.tick_params(labelleft=False)
    legend = figure.add_subplot(grid[0, -1])
    legend.axis("off")
    handles = [Line2D([], [], color=colour, marker=marker, label=label)
               for (label, _, _, _), (colour, marker) in zip(series, style)]
    if banded:
        handles.append(Patch(color="grey", alpha=BAND_ALPHA, label="± standard deviation"))
    legend.legend(handles=handles, loc="center left", fontsize="small", frameon=False)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_miou_band(series, path, title=""):
    """Mean mIoU per step of every experiment, ± its standard deviation as a shaded band (and error bars), one panel
    per class set: old, new, all (1200 x 450 px PNG at ``path``, as :func:`plot_miou_per_step`).

    ``series``: ``[(label, steps, means, stds), ...]``, ``means`` and ``stds`` as ``{"mIoU_old": [...], "mIoU_new":
    [...], "mIoU": [...]}`` with fractions per step (None where undefined: no band where the standard deviation is
    None, e.g. a step only one run reached). Returns ``path``.
    """
    width, height = MIOU_FIGURE_PX
    return _save(miou_figure(series, title), path, width, height)
