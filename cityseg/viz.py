"""Pictures for MLflow: sample panels (Input | Ground truth | Prediction | Error) and a
confusion-matrix image."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from cityseg.data.cityscapes import IGNORE_INDEX
from cityseg.data.tasks import Task

COLUMNS = ("Input", "Ground truth", "Prediction", "Error")
IGNORED = (110, 110, 110)
# Error colours of a thresholded task: true positive white, false positive red, false negative
# blue; of any other task: a wrong pixel red.
TP, FP, FN = (255, 255, 255), (230, 40, 40), (40, 120, 255)
WRONG = (230, 40, 40)
MIN_HEIGHT = 128  # small training images are upscaled so the panel stays readable


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


def _with_header(grid: Image.Image, titles: tuple[str, ...]) -> np.ndarray:
    header = Image.new("RGB", (grid.width, 18), (255, 255, 255))
    draw, cell_width = ImageDraw.Draw(header), grid.width // len(titles)
    for i, title in enumerate(titles):
        draw.text((i * cell_width + 6, 3), title, fill=(0, 0, 0))
    panel = Image.new("RGB", (grid.width, grid.height + header.height))
    panel.paste(header, (0, 0))
    panel.paste(grid, (0, header.height))
    return np.asarray(panel)


def _panel(rows: list[list[np.ndarray]], titles: tuple[str, ...]) -> np.ndarray:
    """A grid of equally sized RGB cells, upscaled to stay readable, under a row of titles."""
    lines = [np.concatenate([np.pad(c, ((2, 2), (2, 2), (0, 0))) for c in cells], axis=1)
             for cells in rows]
    grid = Image.fromarray(np.concatenate(lines, axis=0))
    scale = max(1, -(-MIN_HEIGHT // rows[0][0].shape[0]))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return _with_header(grid, titles)


def sample_panel(images: np.ndarray, targets: np.ndarray, preds: np.ndarray, *,
                 task: Task) -> np.ndarray:
    """(N, 3, H, W) uint8 images, (N, H, W) targets and predictions -> one RGB panel (uint8)."""
    rows = [[image.transpose(1, 2, 0), _labels_rgb(target, task), _labels_rgb(pred, task),
             _error_rgb(target, pred, task)]
            for image, target, pred in zip(images, targets, preds, strict=True)]
    return _panel(rows, COLUMNS)


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
    return figure_image(fig)


def metrics_against(rows: list[dict], *, key: str, metrics: list[str],
                    scatter: bool = False) -> np.ndarray:
    """Each metric against the values of one swept key: mean over the children sharing a value
    (e.g. several seeds), with the min-max spread as a band. `scatter`: one point per child (a
    search, whose children differ in every key)."""
    plt = _pyplot()
    finished = [r for r in rows if r.get("status") == "FINISHED"]
    values = sorted({_hashable(r[key]) for r in finished}, key=lambda v: (isinstance(v, str), v))
    numeric = all(isinstance(v, (int, float)) for v in values)
    fig, axis = plt.subplots(figsize=(6.5, 4), dpi=100)
    if scatter and numeric:
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
    for metric in metrics:
        groups = [[r[metric] for r in finished if _hashable(r[key]) == v and metric in r]
                  for v in values]
        if not all(groups):
            continue
        means = [float(np.mean(g)) for g in groups]
        axis.plot(positions, means, marker="o", label=metric)
        if any(len(g) > 1 for g in groups):
            axis.fill_between(positions, [min(g) for g in groups], [max(g) for g in groups],
                              alpha=0.2)
    if numeric and len(values) > 2 and min(values) > 0 and max(values) / min(values) >= 8:
        axis.set_xscale("log", base=2)
    axis.set_xticks(positions, [str(v) for v in values])
    axis.set(xlabel=key, ylabel="value", title=f"metrics against {key}")
    axis.legend()
    return figure_image(fig)


def _hashable(value):
    """A swept value as a set member: lists (an image size) as tuples."""
    return tuple(value) if isinstance(value, list) else value


def comparison_panel(images: np.ndarray, targets: np.ndarray, columns: dict[str, np.ndarray], *,
                     task: Task) -> np.ndarray:
    """Input | Ground truth | one prediction column per label (e.g. per sweep child)."""
    rows = [[image.transpose(1, 2, 0), _labels_rgb(target, task),
             *(_labels_rgb(pred[i], task) for pred in columns.values())]
            for i, (image, target) in enumerate(zip(images, targets, strict=True))]
    return _panel(rows, ("Input", "Ground truth", *columns))


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
