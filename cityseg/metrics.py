"""Segmentation metrics from counts accumulated over a whole dataset.

The counts live on the model's device and are updated batch by batch; the
caller copies them to the host once per epoch (all-reduced as sums under torchrun) and turns
them into scores here. Region scores are dataset-level: pixel counts are summed over every
validation image first, then turned into ratios (not a mean of per-batch or per-image scores).
Boundary scores follow their papers: the BF score is a mean over images, Boundary IoU is
dataset-level per class. Each validation frame's own counts are kept too (`PER_FRAME`): what
pairs two runs frame by frame (`cityseg compare A B`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cityseg.runtime.files import written_whole


def frame_confusions(pred: torch.Tensor, target: torch.Tensor, *, num_classes: int,
                     ignore_index: int) -> torch.Tensor:
    """counts[i, t, p] = valid pixels of frame i (the batch's first axis) with ground truth t
    and prediction p."""
    frames, n = target.shape[0], num_classes
    valid = target != ignore_index
    frame = torch.arange(frames, device=target.device).view(-1, *[1] * (target.dim() - 1))
    index = ((frame.expand_as(target)[valid] * n + target[valid].long()) * n
             + pred[valid].long())
    return torch.bincount(index, minlength=frames * n * n).view(frames, n, n)


class ConfusionMatrix:
    """counts[t, p] = number of valid pixels with ground truth t and prediction p; with
    keep_frames, each frame's own counts too (`frames`, in the order they came)."""

    def __init__(self, num_classes: int, *, ignore_index: int,
                 device: torch.device | str = "cpu", keep_frames: bool = False) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.frames: list[torch.Tensor] | None = [] if keep_frames else None

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and true labels (same shape; target may hold ignore_index)."""
        per_frame = frame_confusions(pred, target, num_classes=self.num_classes,
                                     ignore_index=self.ignore_index)
        self.counts += per_frame.sum(0)
        if self.frames is not None:
            self.frames.append(per_frame)


def confusion_record(counts: torch.Tensor | np.ndarray, class_names: tuple[str, ...] | list[str]
                     ) -> dict:
    """The one schema of confusion_matrix.json: counts[t][p] for ground truth t, prediction p."""
    if tuple(counts.shape) != (len(class_names), len(class_names)):
        raise ValueError(f"a confusion matrix of {len(class_names)} classes is "
                         f"{len(class_names)} x {len(class_names)}, got {tuple(counts.shape)}")
    return {"rows": "ground truth", "columns": "prediction", "classes": list(class_names),
            "counts": counts.tolist()}


PER_FRAME = "eval/per_frame.npz"  # a run's artifact: each validation frame's confusion counts


def write_frame_counts(path: Path, *, frames: list[str], counts: np.ndarray,
                       class_names: tuple[str, ...] | list[str], epoch: int) -> None:
    """The per-frame record (written whole): frame names (their image's path under the data
    root), counts[i, t, p] of frame i, the class names and the epoch scored. Two runs scored
    on the same frames are paired through it, without their models."""
    with written_whole(path) as partial, open(partial, "wb") as f:
        np.savez_compressed(f, frames=np.array(frames, dtype=str), counts=counts.astype(np.int64),
                            classes=np.array(list(class_names), dtype=str), epoch=epoch)


def read_frame_counts(path: Path) -> tuple[list[str], np.ndarray, list[str], int]:
    """(frames, counts, class names, epoch) of a per-frame record."""
    with np.load(path, allow_pickle=False) as record:
        return (record["frames"].tolist(), record["counts"], record["classes"].tolist(),
                int(record["epoch"]))


CONFIDENCE = 0.95  # of every interval cityseg reports


def t_interval(values: list[float]) -> tuple[float, float]:
    """The 95% Student's t interval of the mean of `values` (seeds' scores: training noise);
    NaN for fewer than two."""
    if len(values) < 2:
        return math.nan, math.nan
    mean, sem = float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))
    if sem == 0:
        return mean, mean
    from scipy import stats  # imported when asked: it takes a second

    low, high = stats.t.interval(CONFIDENCE, len(values) - 1, loc=mean, scale=sem)
    return float(low), float(high)


def lower_is_better(name: str) -> bool:
    """How a metric ranks runs: losses fall, scores rise (the one rule for monitor, sweeps and
    `cityseg compare`)."""
    return name.endswith("loss")


def best_name(name: str) -> str:
    """The name a metric's best-epoch value is logged under: 'val/dice' -> 'val/best/dice'.
    MLflow orders its chart sections by name; in a section after the per-epoch curves, these
    one-point charts never come first."""
    split, sep, rest = name.partition("/")
    return f"{split}/best/{rest}" if sep else f"best/{name}"


def binary_predictions(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, 1, H, W) logits -> (B, H, W) {0, 1}: foreground where sigmoid(logit) > threshold."""
    return (torch.sigmoid(logits[:, 0].float()) > threshold).long()


def _ratio(num, den, empty):
    """num / den, and `empty` where the denominator is zero (elementwise)."""
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), empty)


def binary_region_scores(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Foreground dice, iou, precision, recall and pixel accuracy of 2x2 confusion matrices
    (..., 2, 2), as float64 arrays of the batch's shape.

    A ratio whose denominator is zero means that class was absent where it is counted: with
    no foreground in ground truth or prediction, dice/iou/precision/recall are 1.0 (nothing
    to find, nothing wrongly found); otherwise a zero denominator gives 0.0.
    """
    m = np.asarray(counts, dtype=np.float64)
    tn, fp, fn, tp = m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1]
    empty = np.where(tp + fp + fn == 0, 1.0, 0.0)
    return {"dice": _ratio(2 * tp, 2 * tp + fp + fn, empty),
            "iou": _ratio(tp, tp + fp + fn, empty),
            "precision": _ratio(tp, tp + fp, empty), "recall": _ratio(tp, tp + fn, empty),
            "accuracy": _ratio(tp + tn, tp + tn + fp + fn, 1.0)}


def multiclass_region_scores(counts: np.ndarray, class_names: tuple[str, ...] | list[str]
                             ) -> dict[str, np.ndarray]:
    """mIoU, pixel accuracy and per-class IoU of C x C confusion matrices (..., C, C), as float64
    arrays of the batch's shape (Cityscapes definition).

    IoU_c = tp_c / (tp_c + fp_c + fn_c) over the whole dataset. A class absent from both ground
    truth and prediction has no IoU (NaN here): it is left out of the mean.
    """
    m = np.asarray(counts, dtype=np.float64)
    tp = np.diagonal(m, axis1=-2, axis2=-1)
    union = m.sum(-2) + m.sum(-1) - tp  # tp + fp + fn
    iou = _ratio(tp, union, np.nan)
    scores = {"miou": _ratio(np.nansum(iou, -1), (union > 0).sum(-1), 1.0),
              "pixel_accuracy": _ratio(tp.sum(-1), m.sum((-2, -1)), 1.0)}
    for i, name in enumerate(class_names):
        scores[f"iou/{name.replace(' ', '_')}"] = iou[..., i]
    return scores


def region_scores(counts: np.ndarray, class_names: tuple[str, ...] | list[str]
                  ) -> dict[str, np.ndarray]:
    """The region scores of a batch of confusion matrices (..., C, C) at once (what a bootstrap
    recomputes from each resample's summed counts): binary for two classes, else multiclass."""
    if len(class_names) == 2:
        return binary_region_scores(counts)
    return multiclass_region_scores(counts, class_names)


def binary_scores(counts: torch.Tensor) -> dict[str, float]:
    """`binary_region_scores` of one 2x2 confusion matrix (one device->host copy)."""
    return {k: float(v) for k, v in binary_region_scores(counts.cpu().numpy()).items()}


def multiclass_scores(counts: torch.Tensor, class_names: tuple[str, ...]) -> dict[str, float]:
    """`multiclass_region_scores` of one C x C confusion matrix (one device->host copy); a
    class absent from ground truth and prediction is not reported."""
    found = multiclass_region_scores(counts.cpu().numpy(), class_names)
    return {k: float(v) for k, v in found.items() if not np.isnan(v)}


# the band width of Cheng et al. 2021 ("Boundary IoU: Improving Object-Centric Image
# Segmentation Evaluation", CVPR), a fraction of the image diagonal
BOUNDARY_IOU_DILATION = 0.02


def _contours(labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: valid pixels with a valid 4-neighbour of another label, each on the
    contour of its own class (edges against ignored pixels or the image border are none)."""
    edge = torch.zeros_like(valid)
    for dim in (1, 2):
        n = labels.shape[dim] - 1
        a, b = labels.narrow(dim, 0, n), labels.narrow(dim, 1, n)
        differ = (a != b) & valid.narrow(dim, 0, n) & valid.narrow(dim, 1, n)
        edge.narrow(dim, 0, n).logical_or_(differ)
        edge.narrow(dim, 1, n).logical_or_(differ)
    return edge


def disk_or(bits: torch.Tensor, radius: float) -> torch.Tensor:
    """(B, H, W) int: the bitwise OR of `bits` over the Euclidean disk of `radius` pixels around
    each pixel (outside the image counts as 0).

    With one bit per class, it dilates every class's mask at once, exactly: the disk is its
    rows, half-width floor(sqrt(r^2 - dy^2)) at offset dy, and the OR over a row of any width is
    two lookups in a table of ORs over 2^k pixels. About 3r whole-image operations, not r^2.
    """
    reach = math.floor(radius)
    if reach <= 0:
        return bits.clone()
    width = bits.shape[-1]
    halves = [math.isqrt(math.floor(radius * radius - dy * dy)) for dy in range(reach + 1)]
    levels = [F.pad(bits, (reach, reach))]  # levels[k][..., x]: OR of padded[x : x + 2^k]
    while 2 ** len(levels) <= 2 * reach + 1:
        step, nxt = 2 ** (len(levels) - 1), levels[-1].clone()
        nxt[..., :-step] |= levels[-1][..., step:]
        levels.append(nxt)

    def row_or(half: int) -> torch.Tensor:  # OR over [x - half, x + half] along each row
        k = (2 * half + 1).bit_length() - 1
        left, right = reach - half, reach + half - 2**k + 1
        return levels[k][..., left : left + width] | levels[k][..., right : right + width]

    out, row = row_or(halves[0]), None
    for dy in range(1, reach + 1):
        if halves[dy] != halves[dy - 1] or row is None:
            row = row_or(halves[dy])
        out[:, :-dy] |= row[:, dy:]
        out[:, dy:] |= row[:, :-dy]
    return out


class BoundaryScores:
    """BF score and Boundary IoU of a dataset, per class, as sums kept on the device.

    Contours are those of `_contours`; ignored pixels belong to no class, in ground truth and
    prediction alike. Distances are Euclidean, in fractions of each image's diagonal, so a frame
    and its upscaled copy score alike.

    - BF score (Csurka et al. 2013): per image and class, precision is the share of the
      predicted contour within `tolerance` of the true one, recall the converse, F1 their
      harmonic mean; a class in ground truth or prediction but not both scores 0, one in both
      with no contour in either 1. The image's score is the mean over the classes in its ground
      truth or prediction; the dataset's, the mean over images with a labelled pixel.
    - Boundary IoU (Cheng et al. 2021): a mask's band is its pixels within `dilation` of its
      contour; intersection and union of the true and predicted bands of each class are summed
      over the dataset, and their ratio averaged over the classes with a band somewhere.
    """

    def __init__(self, num_classes: int, *, tolerance: float, ignore_index: int,
                 dilation: float = BOUNDARY_IOU_DILATION,
                 device: torch.device | str = "cpu") -> None:
        # one bit per class, in the narrowest integer that holds them (CPUs OR narrow ones faster)
        fits = [dtype for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64)
                if num_classes <= torch.iinfo(dtype).bits]
        if not fits:
            raise ValueError(f"{num_classes} classes: the boundary scores hold one bit per class, "
                             f"at most 64")
        self.bits_dtype = fits[0]
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.tolerance, self.dilation = tolerance, dilation
        # BF sum over images, images scored, then per class: band intersection, band union
        self.counts = torch.zeros(2 + 2 * num_classes, dtype=torch.float64, device=device)

    def _per_class(self, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C) int64: pixels of each class where mask holds, per image (no host sync)."""
        b, c = labels.shape[0], self.num_classes
        index = torch.arange(b, device=labels.device).view(b, 1, 1) * c + labels
        index = torch.where(mask, index, b * c).flatten()  # masked out: one extra bin
        return torch.bincount(index, minlength=b * c + 1)[: b * c].view(b, c)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and true labels (B, H, W); target may hold ignore_index."""
        valid = target != self.ignore_index
        truth = torch.where(valid, target, 0).int()  # ignored pixels are masked out below
        guess = torch.where(valid, pred, 0).int()
        diagonal = math.hypot(*target.shape[-2:])
        true_edge, pred_edge = _contours(truth, valid), _contours(guess, valid)
        # each contour pixel sets its class's bit; a pixel is near its class's contour if the
        # OR over the disk around it holds its own class's bit
        bit_of = truth.to(self.bits_dtype), guess.to(self.bits_dtype)
        true_bits = true_edge.to(self.bits_dtype) << bit_of[0]
        pred_bits = pred_edge.to(self.bits_dtype) << bit_of[1]

        def near(bits: torch.Tensor, own: torch.Tensor, fraction: float) -> torch.Tensor:
            return ((disk_or(bits, fraction * diagonal) >> own) & 1).bool() & valid

        n = self._per_class
        f1 = _f1(found_pred=n(guess, pred_edge & near(true_bits, bit_of[1], self.tolerance)),
                 n_pred=n(guess, pred_edge),
                 found_true=n(truth, true_edge & near(pred_bits, bit_of[0], self.tolerance)),
                 n_true=n(truth, true_edge))
        in_true, in_pred = n(truth, valid) > 0, n(guess, valid) > 0
        f1 = torch.where(in_true & in_pred, f1, 0.0)  # a class in one of them only
        present = (in_true | in_pred).double()  # (B, C)
        scored = present.sum(1) > 0  # images with a labelled pixel
        per_image = (f1 * present).sum(1) / present.sum(1).clamp_min(1)

        true_band = near(true_bits, bit_of[0], self.dilation)
        pred_band = near(pred_bits, bit_of[1], self.dilation)
        both = n(truth, true_band & pred_band & (truth == guess)).sum(0)
        union = n(truth, true_band).sum(0) + n(guess, pred_band).sum(0) - both
        self.counts += torch.cat([(per_image * scored).sum().view(1), scored.sum().view(1),
                                  both, union]).double()

    def compute(self) -> dict[str, float]:
        return boundary_scores(self.counts)


def _f1(*, found_pred: torch.Tensor, n_pred: torch.Tensor, found_true: torch.Tensor,
        n_true: torch.Tensor) -> torch.Tensor:
    """Contour F1 from pixel counts: 1 with no contour in either, 0 with a contour in one only."""
    precision = found_pred.double() / n_pred.clamp_min(1)
    recall = found_true.double() / n_true.clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)  # 0 when both are
    return torch.where((n_pred == 0) & (n_true == 0), 1.0, f1)


def boundary_scores(counts: torch.Tensor) -> dict[str, float]:
    """bf_score and boundary_iou from BoundaryScores counts. With no labelled image the BF
    score, and with no band anywhere the Boundary IoU, is 1.0 (nothing to find, none found)."""
    bf_sum, images, *bands = counts.double().cpu().tolist()  # one device->host copy
    c = len(bands) // 2
    pairs = [(i, u) for i, u in zip(bands[:c], bands[c:], strict=True) if u > 0]
    return {"bf_score": bf_sum / images if images else 1.0,
            "boundary_iou": sum(i / u for i, u in pairs) / len(pairs) if pairs else 1.0}
