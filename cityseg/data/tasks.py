"""The task table: what a segmentation task means, in one entry per task.

A task says how many logits the model outputs, which classes its confusion matrix counts, how
train ids map to its labels, how logits become labels, which metrics it scores, and how its
labels are drawn and written. Callers ask the table; nobody branches on a task's name. A new
task (say, drivable area: road vs the rest) is one more entry in TASKS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cityseg.data.cityscapes import (
    TRAIN_CLASSES,
    train_id_colors,
    train_id_to_binary_lut,
    train_ids_lut,
)
from cityseg.metrics import binary_predictions, binary_scores, multiclass_scores


@dataclass(frozen=True)
class Task:
    """One segmentation task; see TASKS."""

    name: str
    description: str
    class_names: tuple[str, ...]  # rows and columns of the confusion matrix, by label
    out_channels: int  # logits per pixel
    # one foreground logit turned into labels by sigmoid > threshold; else argmax over classes
    thresholded: bool
    score_names: tuple[str, ...]  # per-epoch scores (without val/), the default monitor first
    scorer: Callable[[torch.Tensor, tuple[str, ...]], dict[str, float]]
    label_lut: Callable[[list[str]], np.ndarray]  # foreground classes -> uint8[256] lut
    colors: np.ndarray  # (256, 3) uint8: how each label is drawn in panels
    overlay_colors: np.ndarray  # (256, 3) uint8: the colour blended over a photo per label
    overlay_alpha: np.ndarray  # (256,) float: how strongly each label is blended
    mask_values: np.ndarray  # (256,) uint8: label -> pixel value of the mask files predict writes
    per_class_report: bool  # log a confusion-matrix image and a per-class IoU table

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def monitors(self) -> tuple[str, ...]:
        """Metrics a run of this task logs per epoch, the default monitor first."""
        scores = tuple(f"val/{name}" for name in self.score_names)
        return (*scores, "val/bf_score", "val/boundary_iou", "val/loss", "train/loss")

    def lut(self, foreground: list[str] | tuple[str, ...]) -> np.ndarray:
        """uint8[256]: train id -> this task's label (255 = ignore)."""
        return self.label_lut(list(foreground))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) logits -> (B, H, W) foreground probability (thresholded tasks)."""
        if not self.thresholded:
            raise ValueError(f"the {self.name} task has no single foreground probability")
        return torch.sigmoid(logits[:, 0].float())

    def labels(self, logits: torch.Tensor, *, threshold: float) -> torch.Tensor:
        """(B, C, H, W) logits -> (B, H, W) labels: foreground where p > threshold, or argmax."""
        if self.thresholded:
            return binary_predictions(logits, threshold)
        return logits.argmax(dim=1)

    def scores(self, counts: torch.Tensor) -> dict[str, float]:
        """The task's scores (without val/) from its confusion matrix."""
        return self.scorer(counts, self.class_names)


def _table(default, at: dict[int, object], dtype) -> np.ndarray:
    """A 256-entry lookup table (of scalars or colours) holding `default` except at `at`."""
    table = np.array([default] * 256, dtype=dtype)
    for label, value in at.items():
        table[label] = value
    return table


_WHITE, _RED, _BLACK = (255, 255, 255), (255, 0, 0), (0, 0, 0)

TASKS: dict[str, Task] = {
    "binary": Task(
        name="binary", description="the foreground classes vs the rest",
        class_names=("background", "foreground"), out_channels=1, thresholded=True,
        score_names=("dice", "iou", "precision", "recall", "accuracy"),
        scorer=lambda counts, names: binary_scores(counts), label_lut=train_id_to_binary_lut,
        colors=_table(_BLACK, {1: _WHITE}, np.uint8),
        overlay_colors=_table(_BLACK, {1: _RED}, np.uint8),
        overlay_alpha=_table(0.0, {1: 0.5}, np.float64),
        mask_values=_table(0, {1: 255}, np.uint8), per_class_report=False),
    "multiclass": Task(
        name="multiclass", description="the 19 Cityscapes train classes",
        class_names=TRAIN_CLASSES, out_channels=len(TRAIN_CLASSES), thresholded=False,
        # not per-class IoU: a class absent from an epoch's data has none
        score_names=("miou", "pixel_accuracy"), scorer=multiclass_scores,
        label_lut=lambda foreground: train_ids_lut("train_ids"),
        colors=train_id_colors(), overlay_colors=train_id_colors(),
        overlay_alpha=np.full(256, 0.5), mask_values=np.arange(256, dtype=np.uint8),
        per_class_report=True),
}


# every per-epoch metric some task logs, each task's in its order: what a sweep's summary
# files hold where a run has them
LOGGED_METRICS: tuple[str, ...] = tuple(dict.fromkeys(
    metric for task in TASKS.values() for metric in task.monitors))

# what a table of runs shows beside the metric it ranks by: each task's two first scores and
# the BF score (every score would not fit a terminal)
HEADLINE_METRICS: tuple[str, ...] = tuple(dict.fromkeys(
    (*(metric for task in TASKS.values() for metric in task.monitors[:2]), "val/bf_score")))
