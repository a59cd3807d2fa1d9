"""Segmentation metrics from a confusion matrix accumulated over a whole dataset.

The matrix lives on the model's device and is updated with one bincount per batch; the caller
copies the counts to the host once per epoch and turns them into scores here. Scores are
dataset-level: pixel counts are summed over every validation image first, then turned into
ratios (not a mean of per-batch or per-image scores).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import numpy as np


class ConfusionMatrix:
    """counts[t, p] = number of valid pixels with ground truth t and prediction p."""

    def __init__(self, num_classes: int, *, ignore_index: int,
                 device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and true labels (same shape; target may hold ignore_index)."""
        valid = target != self.ignore_index
        index = target[valid].long() * self.num_classes + pred[valid].long()
        self.counts += torch.bincount(index,
                                      minlength=self.num_classes**2).view(self.num_classes, -1)


def confusion_record(counts: torch.Tensor | np.ndarray, class_names: tuple[str, ...] | list[str]
                     ) -> dict:
    """The one schema of confusion_matrix.json: counts[t][p] for ground truth t, prediction p."""
    if tuple(counts.shape) != (len(class_names), len(class_names)):
        raise ValueError(f"a confusion matrix of {len(class_names)} classes is "
                         f"{len(class_names)} x {len(class_names)}, got {tuple(counts.shape)}")
    return {"rows": "ground truth", "columns": "prediction", "classes": list(class_names),
            "counts": counts.tolist()}


def lower_is_better(name: str) -> bool:
    """How a metric ranks runs: losses fall, scores rise (the one rule for monitor, sweeps and
    `cityseg compare`)."""
    return name.endswith("loss")


def binary_predictions(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, 1, H, W) logits -> (B, H, W) {0, 1}: foreground where sigmoid(logit) > threshold."""
    return (torch.sigmoid(logits[:, 0].float()) > threshold).long()


def _ratio(num: int, den: int, *, empty: float) -> float:
    return num / den if den else empty


def binary_scores(counts: torch.Tensor) -> dict[str, float]:
    """Foreground dice, iou, precision, recall and pixel accuracy from a 2x2 confusion matrix.

    A ratio whose denominator is zero means that class was absent where it is counted: with
    no foreground in ground truth or prediction, dice/iou/precision/recall are 1.0 (nothing
    to find, nothing wrongly found); otherwise a zero denominator gives 0.0.
    """
    (tn, fp), (fn, tp) = counts.tolist()  # one device->host copy
    no_foreground = tp + fp + fn == 0
    empty = 1.0 if no_foreground else 0.0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, empty=empty),
        "iou": _ratio(tp, tp + fp + fn, empty=empty),
        "precision": _ratio(tp, tp + fp, empty=empty),
        "recall": _ratio(tp, tp + fn, empty=empty),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn, empty=1.0),
    }


def multiclass_scores(counts: torch.Tensor, class_names: tuple[str, ...]) -> dict[str, float]:
    """mIoU, pixel accuracy and per-class IoU from a C x C confusion matrix (Cityscapes definition).

    IoU_c = tp_c / (tp_c + fp_c + fn_c) over the whole dataset. A class absent from both ground
    truth and prediction has no IoU: it is left out of the mean and not reported.
    """
    m = counts.double().cpu()  # one device->host copy
    tp = m.diag()
    union = m.sum(0) + m.sum(1) - tp  # tp + fp + fn
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.zeros_like(tp))
    total = m.sum().item()
    scores = {"miou": iou[present].mean().item() if present.any() else 1.0,
              "pixel_accuracy": tp.sum().item() / total if total else 1.0}
    for name, value, here in zip(class_names, iou.tolist(), present.tolist(), strict=True):
        if here:
            scores[f"iou/{name.replace(' ', '_')}"] = value
    return scores


def _max_pool(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Maximum over the (2r+1) x (2r+1) square around each pixel of a (B, H, W) tensor."""
    return F.max_pool2d(x[:, None].float(), 2 * radius + 1, stride=1, padding=radius)[:, 0]


def label_boundaries(labels: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: pixels whose 3x3 neighbourhood holds more than one label."""
    x = labels.float()
    return _max_pool(x, 1) != -_max_pool(-x, 1)


class BoundaryF1:
    """Boundary F-measure with a pixel tolerance (as in BSDS / DAVIS), accumulated over a dataset.

    A predicted boundary pixel is correct if a ground-truth boundary pixel lies within
    `tolerance` pixels (Chebyshev distance), and a ground-truth boundary pixel is found if a
    predicted one does; precision and recall are those fractions over every image of the
    dataset, and F1 their harmonic mean. Boundaries next to ignored pixels are not counted.
    """

    def __init__(self, *, tolerance: int, ignore_index: int,
                 device: torch.device | str = "cpu") -> None:
        self.tolerance, self.ignore_index = tolerance, ignore_index
        # matched predicted, all predicted, matched ground truth, all ground truth
        self.counts = torch.zeros(4, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        near_ignore = _max_pool(target == self.ignore_index, 1) > 0
        gt = label_boundaries(target) & ~near_ignore
        pr = label_boundaries(pred) & ~near_ignore
        gt_near = _max_pool(gt, self.tolerance) > 0
        pr_near = _max_pool(pr, self.tolerance) > 0
        self.counts += torch.stack([(pr & gt_near).sum(), pr.sum(), (gt & pr_near).sum(), gt.sum()])

    def compute(self) -> float:
        return boundary_f1(self.counts)


def boundary_f1(counts: torch.Tensor) -> float:
    """F1 from BoundaryF1 counts (matched predicted, predicted, matched true, true)."""
    matched_pred, n_pred, matched_gt, n_gt = counts.tolist()
    if n_pred == 0 and n_gt == 0:
        return 1.0  # no boundary to find and none found
    precision = matched_pred / n_pred if n_pred else 0.0
    recall = matched_gt / n_gt if n_gt else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0
