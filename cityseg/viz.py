"""Pictures for MLflow: sample panels (Input | Ground truth | Prediction over the photo | Error,
with a legend), one card per sample for MLflow's step-indexed images, a confusion-matrix image
and plots."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cityseg.data.cityscapes import IGNORE_INDEX
from cityseg.data.tasks import Task
from cityseg.metrics import t_interval

COLUMNS = ("Input", "Ground truth", "Prediction", "Error")
IGNORED = (110, 110, 110)
# Error colours of a thresholded task: true positive white, false positive orange, false
# negative blue; of any other task: a wrong pixel orange (true negatives and right pixels stay
# black). Not red: red is the predicted foreground in the Prediction panel beside it.
TP, FP, FN = (255, 255, 255), (255, 150, 0), (40, 120, 255)
WRONG = (255, 150, 0)
MIN_HEIGHT = 128  # small training images are upscaled so the panel stays readable
CARD_MAX_SIDE = 512  # a card's cells at most this long: it is a preview, the panel is full size
# Titles and legend in a font sized to the cell's longer side: a card (2x2 cells) shown as
# MLflow's 256-px thumbnail keeps them about 14 px tall, whatever the image size.
TEXT_SCALE = 0.11
MIN_FONT = 10
WHITE, INK, OUTLINE = (255, 255, 255), (0, 0, 0), (60, 60, 60)

Legend = list[tuple[str, list[tuple[str, tuple[int, int, int]]]]]  # (heading, [(name, rgb)])


def overlay(photo: np.ndarray, labels: np.ndarray, task: Task) -> np.ndarray:
    """The photo with the prediction blended over it in the task's overlay colours."""
    alpha = task.overlay_alpha[labels][..., None]
    return (photo * (1 - alpha) + task.overlay_colors[labels] * alpha).astype(np.uint8)


def _labels_rgb(labels: np.ndarray, task: Task) -> np.ndarray:
    """Labels in the task's colours (binary: foreground white on black); ignore grey."""
    rgb = task.colors[labels]
    rgb[labels == IGNORE_INDEX] = IGNORED
    return rgb


def _error_rgb(target: np.ndarray, pred: np.ndarray, task: Task) -> np.ndarray:
    rgb = np.zeros((*target.shape, 3), dtype=np.uint8)
    if task.thresholded:  # labels are 0 (background) and 1 (foreground)
        rgb[(target == 1) & (pred == 1)] = TP
        rgb[(target == 0) & (pred == 1)] = FP
        rgb[(target == 1) & (pred == 0)] = FN
    else:
        rgb[target != pred] = WRONG
    rgb[target == IGNORE_INDEX] = IGNORED
    return rgb


def legend(targets: np.ndarray, preds: np.ndarray, task: Task, *, errors: bool = True) -> Legend:
    """What a panel's legend lists: the error colours (`errors`) and, for a task drawn in a
    palette (multiclass), the classes present in the targets or the predictions, by label."""
    sections: Legend = []
    if errors:
        entries = ([("false positive", FP), ("false negative", FN), ("true positive", TP)]
                   if task.thresholded else [("wrong class", WRONG)])
        sections.append(("Error:", [*entries, ("ignored", IGNORED)]))
    if not task.thresholded:
        present = np.unique(np.concatenate([np.ravel(targets), np.ravel(preds)]))
        sections.append(("Classes:", [(task.class_names[label], tuple(task.colors[label]))
                                      for label in present if label < task.num_classes]))
    return sections


def _cells(image: np.ndarray, target: np.ndarray, pred: np.ndarray, task: Task) -> list:
    photo = image.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    return [photo, _labels_rgb(target, task), overlay(photo, pred, task),
            _error_rgb(target, pred, task)]


def sample_panel(images: np.ndarray, targets: np.ndarray, preds: np.ndarray, *,
                 task: Task) -> np.ndarray:
    """(N, 3, H, W) uint8 images, (N, H, W) targets and predictions -> one RGB panel (uint8):
    a row per image under the column titles, the legend below."""
    rows = [_cells(image, target, pred, task)
            for image, target, pred in zip(images, targets, preds, strict=True)]
    return _sheet(rows, [COLUMNS] + [()] * (len(rows) - 1), legend(targets, preds, task))


def sample_card(image: np.ndarray, target: np.ndarray, pred: np.ndarray, *,
                task: Task) -> np.ndarray:
    """One (3, H, W) image with its (H, W) target and prediction as a 2x2 card (Prediction,
    Error / Input, Ground truth, each titled) above its legend: readable as a small thumbnail.
    The prediction comes first: MLflow's image card shows the upper half of a picture until
    it is opened."""
    cells = _cells(image, target, pred, task)
    return _sheet([cells[2:], cells[:2]], [COLUMNS[2:], COLUMNS[:2]],
                  legend(target, pred, task), max_side=CARD_MAX_SIDE)


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans at `size` px: the TrueType font matplotlib ships."""
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path(), "fonts", "ttf",
                                       "DejaVuSans.ttf")), size)


def _fitted(text: str, size: int, width: int) -> tuple[ImageFont.FreeTypeFont, str]:
    """A font no larger than `size` in which `text` fits `width` (shortened if even the
    smallest does not)."""
    while size > MIN_FONT and _font(size).getlength(text) > width:
        size -= 1
    while len(text) > 1 and _font(size).getlength(text) > width:
        text = text[:-2] + "…"
    return _font(size), text


def _cell_size(shape: tuple[int, ...], max_side: int | None) -> tuple[int, int]:
    """(height, width) of a cell as drawn: upscaled by a whole factor to MIN_HEIGHT, or
    shrunk to `max_side`."""
    height, width = shape[:2]
    if max_side is not None and max(height, width) > max_side:
        factor = max_side / max(height, width)
        return max(1, round(height * factor)), max(1, round(width * factor))
    scale = max(1, -(-MIN_HEIGHT // height))
    return height * scale, width * scale


def _sheet(rows: list[list[np.ndarray]], titles: list[tuple[str, ...]], sections: Legend, *,
           max_side: int | None = None) -> np.ndarray:
    """Rows of equally sized RGB cells, each row under its titles (if any), the legend's
    sections below (swatch and name, wrapped to the width), text sized to the cell."""
    height, width = _cell_size(rows[0][0].shape, max_side)
    size = max(MIN_FONT, round(TEXT_SCALE * max(height, width)))
    gap, band = max(2, size // 5), round(size * 1.45)
    sheet_width = max(len(cells) for cells in rows) * (width + gap) + gap
    lines = _legend_lines(sections, size, sheet_width - 2 * gap, gap)
    sheet_height = (gap + sum(band * bool(t) + height + gap for t in titles)
                    + len(lines) * band + gap * bool(lines))
    sheet = Image.new("RGB", (sheet_width, sheet_height), WHITE)
    draw, y = ImageDraw.Draw(sheet), gap
    for cells, names in zip(rows, titles, strict=True):
        for i, name in enumerate(names):
            face, shown = _fitted(name, size, width)
            draw.text((gap + i * (width + gap) + width // 2, y + band // 2), shown, font=face,
                      fill=INK, anchor="mm")
        y += band * bool(names)
        for i, cell in enumerate(cells):
            picture = Image.fromarray(cell)
            method = Image.NEAREST if picture.height <= height else Image.BOX
            sheet.paste(picture.resize((width, height), method), (gap + i * (width + gap), y))
        y += height + gap
    for line in lines:
        for x, name, colour in line:
            if colour is not None:
                draw.rectangle((gap + x, y + (band - size) // 2, gap + x + size - 1,
                                y + (band + size) // 2 - 1), fill=colour, outline=OUTLINE)
                x += size + gap
            draw.text((gap + x, y + band // 2), name, font=_font(size), fill=INK, anchor="lm")
        y += band
    return np.asarray(sheet)


def _legend_lines(sections: Legend, size: int, width: int, gap: int) -> list[list[tuple]]:
    """The legend as lines of (x, name, swatch colour or None for a heading); each section
    starts a line."""
    lines = []
    for heading, entries in sections:
        line, x = [(0, heading, None)], _font(size).getlength(heading) + 2 * gap
        for name, colour in entries:
            step = size + gap + _font(size).getlength(name) + 3 * gap
            if x + step - 3 * gap > width:
                lines.append(line)
                line, x = [], 0
            line.append((round(x), name, colour))
            x += step
        lines.append(line)
    return lines


def confusion_image(counts: np.ndarray, class_names: tuple[str, ...], cell: int = 28) -> np.ndarray:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction) as an RGB image."""
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n, margin = len(class_names), 110
    image = Image.new("RGB", (margin + n * cell, margin + n * cell), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i in range(n):
        draw.text((4, margin + i * cell + cell // 3), class_names[i][:16], fill=(0, 0, 0))
        for j in range(n):
            shade = int(255 * (1 - rows[i, j]))
            box = (margin + j * cell, margin + i * cell,
                   margin + (j + 1) * cell - 1, margin + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255))
            if rows[i, j] >= 0.005:
                draw.text((box[0] + 2, box[1] + cell // 3), f"{rows[i, j] * 100:.0f}",
                          fill=(0, 0, 0) if shade > 120 else (255, 255, 255))
    for j in range(n):  # column labels, written vertically
        label = Image.new("RGB", (margin - 4, cell), (255, 255, 255))
        ImageDraw.Draw(label).text((2, cell // 3), class_names[j][:16], fill=(0, 0, 0))
        image.paste(label.rotate(90, expand=True), (margin + j * cell, 2))
    return np.asarray(image)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def figure_image(fig) -> np.ndarray:
    """Render a finished matplotlib figure to an RGB array and close it."""
    for axis in fig.axes:
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    fig.clf()
    _pyplot().close(fig)
    return image


def learning_curves(history: list[dict[str, float]], monitor: str) -> np.ndarray:
    """Loss (train and val) and the monitored metric per epoch, as an RGB image."""
    plt = _pyplot()
    epochs = list(range(1, len(history) + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for key in ("train/loss", "val/loss"):
        left.plot(epochs, [h[key] for h in history], marker="o", label=key)
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    left.legend()
    right.plot(epochs, [h[monitor] for h in history], marker="o", color="tab:green")
    right.set(xlabel="epoch", ylabel=monitor, title=monitor)
    from matplotlib.ticker import MaxNLocator

    for axis in (left, right):  # epochs are whole: no ticks at half epochs
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure_image(fig)


def metrics_against(rows: list[dict], *, key: str, metrics: list[str],
                    scatter: bool = False, ranked_by: str | None = None,
                    lower_better: bool = False) -> np.ndarray:
    """Each metric against the values of one swept key: every child's value as a dot, and the
    mean over the children sharing a value (several seeds) with its 95% t-interval as error
    bars. `scatter`: one point per child (a
    search, whose children differ in every key). `ranked_by` (a metric among `metrics`) gets
    its own panel with its best value starred; the others share one, their legend beside it."""
    plt = _pyplot()
    finished = [r for r in rows if r.get("status") == "FINISHED"]
    values = sorted({_hashable(r[key]) for r in finished}, key=lambda v: (isinstance(v, str), v))
    numeric = all(isinstance(v, (int, float)) for v in values)
    if scatter and numeric:
        fig, axis = plt.subplots(figsize=(6.5, 4), dpi=100)
        for metric in metrics:
            points = [(r[key], r[metric]) for r in finished if metric in r]
            axis.scatter(*zip(*points, strict=True), label=metric, alpha=0.8)
        if len(values) > 1 and min(values) > 0 and max(values) / min(values) >= 8:
            from matplotlib.ticker import ScalarFormatter

            axis.set_xscale("log")
            axis.xaxis.set_major_formatter(ScalarFormatter())
            axis.xaxis.set_minor_formatter(ScalarFormatter())
        axis.set(xlabel=key, ylabel="value", title=f"metrics against {key} (one point per child)")
        axis.legend()
        return figure_image(fig)
    positions = values if numeric else list(range(len(values)))
    others = [m for m in metrics if m != ranked_by]
    panels = ([ranked_by] if ranked_by in metrics else []) + ([others] if others else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1.5, 4), dpi=100,
                             squeeze=False)
    for axis, shown in zip(axes[0], panels, strict=True):
        for metric in [shown] if isinstance(shown, str) else shown:
            groups = [[r[metric] for r in finished if _hashable(r[key]) == v and metric in r]
                      for v in values]
            if not all(groups):
                continue
            means = [float(np.mean(g)) for g in groups]
            line, = axis.plot(positions, means, marker="o", label=metric)
            if any(len(g) > 1 for g in groups):  # seeds: each one, and the mean's interval
                for position, group in zip(positions, groups, strict=True):
                    axis.scatter([position] * len(group), group, s=12, alpha=0.5,
                                 color=line.get_color())
                spans = [t_interval(g) for g in groups]
                axis.errorbar(positions, means, fmt="none", capsize=4, color=line.get_color(),
                              yerr=[[m - lo if lo == lo else 0 for m, (lo, _) in
                                     zip(means, spans, strict=True)],
                                    [hi - m if hi == hi else 0 for m, (_, hi) in
                                     zip(means, spans, strict=True)]])
            if metric == ranked_by:
                best = int(np.argmin(means) if lower_better else np.argmax(means))
                axis.scatter([positions[best]], [means[best]], marker="*", s=260, zorder=5,
                             color="gold", edgecolor="black",
                             label=f"best: {key} = {values[best]}")
        if numeric and len(values) > 2 and min(values) > 0 and max(values) / min(values) >= 8:
            axis.set_xscale("log", base=2)
        axis.set_xticks(positions, [str(v) for v in values])
        title = shown if isinstance(shown, str) else "other scores"
        axis.set(xlabel=key, ylabel="value", title=f"{title} against {key}")
        # beside the plot, never over its lines
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return figure_image(fig)


def _hashable(value):
    """A swept value as a set member: lists (an image size) as tuples."""
    return tuple(value) if isinstance(value, list) else value


def comparison_panel(images: np.ndarray, targets: np.ndarray, columns: dict[str, np.ndarray], *,
                     task: Task) -> np.ndarray:
    """Input | Ground truth | one prediction over the photo per label (e.g. per sweep child)."""
    rows = [[image.transpose(1, 2, 0), _labels_rgb(target, task),
             *(overlay(image.transpose(1, 2, 0), pred[i], task) for pred in columns.values())]
            for i, (image, target) in enumerate(zip(images, targets, strict=True))]
    preds = np.stack(list(columns.values()))
    return _sheet(rows, [("Input", "Ground truth", *columns)] + [()] * (len(rows) - 1),
                  legend(targets, preds, task, errors=False))


def pr_curve(calibration) -> np.ndarray:
    """Precision against recall over thresholds, with 0.5 and the Dice-best threshold marked."""
    plt = _pyplot()
    c = calibration
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    left.plot(c.recall, c.precision, color="tab:blue")
    for index, label, colour in ((c.at_half, "0.5", "tab:gray"),
                                 (c.best, f"best {c.thresholds[c.best]:.3f}", "tab:red")):
        left.scatter([c.recall[index]], [c.precision[index]], color=colour, zorder=3,
                     label=f"threshold {label}")
    left.set(xlabel="recall", ylabel="precision", title="precision / recall",
             xlim=(0, 1.02), ylim=(0, 1.02))
    left.legend()
    right.plot(c.thresholds, c.dice, label="dice")
    right.plot(c.thresholds, c.iou, label="iou")
    right.axvline(c.thresholds[c.best], color="tab:red", linestyle="--")
    right.set(xlabel="threshold", ylabel="score", title="scores against threshold")
    right.legend()
    return figure_image(fig)
