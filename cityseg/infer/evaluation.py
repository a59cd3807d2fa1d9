"""A trained model scored on a split (at the training size, or at the files' own size), the
binary threshold calibrated, and the evaluation logged as an MLflow run of its own."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from cityseg import checkpoints, tracking, viz
from cityseg.data.datasets import data_index, frame_names, split_dataset, task_lut
from cityseg.data.layouts import read_sample
from cityseg.data.tasks import Task
from cityseg.errors import CitysegError
from cityseg.infer.loading import Trained
from cityseg.metrics import PER_FRAME, confusion_record, write_frame_counts

HISTOGRAM_BINS = 1000  # threshold resolution of the calibration


def _full_resolution(trained: Trained, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(photo, labels) at the files' own size, one sample at a time."""
    index = data_index(trained.exp.data, (split,))
    lut = task_lut(trained.exp.data)
    for sample in index.samples[split]:
        photo, train_ids = read_sample(sample, layout=index.layout, encoding=index.encoding)
        yield photo, lut[train_ids]


def split_loader(trained: Trained, split: str) -> DataLoader:
    """The split at the training size, exactly as validation saw it."""
    p = trained.exp.data
    dataset, _ = split_dataset(p, split)
    return DataLoader(dataset, batch_size=p.batch_size, num_workers=p.workers)


def evaluate(trained: Trained, *, split: str, full_resolution: bool,
             per_frame: dict[str, Any] | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """The training metrics of the model on a split; (scores, confusion counts); each frame's
    own counts into `per_frame` ("frames": names, "counts": array) if given.

    At the training size, the split is scored as validation scores it; at full resolution,
    every label of the files is scored against exactly what `predict` writes for the photo.
    """
    tolerance = trained.exp.trainer.boundary_tolerance_diagonal
    counted: list[np.ndarray] | None = [] if per_frame is not None else None
    if full_resolution:
        found, counts = trained.predictor.evaluate_photos(_full_resolution(trained, split),
                                                          tolerance=tolerance, frames=counted)
    else:
        found, counts = trained.predictor.evaluate(split_loader(trained, split),
                                                   tolerance=tolerance, frames=counted)
    if per_frame is not None and counted:
        index = data_index(trained.exp.data, (split,))
        per_frame.update(frames=frame_names(index, split), counts=np.stack(counted))
    if counts.sum() == 0:
        raise CitysegError(f"split {split!r} has no labelled pixels (Cityscapes' test labels are "
                           f"not public); evaluate on val or train")
    return found, counts


@dataclass
class Calibration:
    thresholds: np.ndarray  # (K,)
    dice: np.ndarray
    iou: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    best: int  # index of the best threshold
    at_half: int  # index of 0.5


@torch.inference_mode()
def calibrate(trained: Trained, *, split: str) -> Calibration:
    """The probability threshold that maximises Dice on the split (binary models).

    One pass collects histograms of the foreground probability of foreground and background
    pixels; Dice, IoU, precision and recall follow for every threshold k / 1000.
    """
    if not trained.task.thresholded:
        raise CitysegError(f"--calibrate is for models with a foreground threshold; this one is "
                           f"{trained.task.name}")
    predictor = trained.predictor
    fg = torch.zeros(HISTOGRAM_BINS + 1, dtype=torch.int64, device=predictor.device)
    bg = torch.zeros_like(fg)
    for images, masks in split_loader(trained, split):
        prob, y = predictor.probabilities(images), predictor.targets(masks)
        # bin k holds p in (k/1000, (k+1)/1000], so "bin >= k" is exactly "p > k/1000", as
        # predictions use
        bins = (torch.ceil(prob * HISTOGRAM_BINS) - 1).long().clamp_(0, HISTOGRAM_BINS)
        fg += torch.bincount(bins[y == 1], minlength=HISTOGRAM_BINS + 1)
        bg += torch.bincount(bins[y == 0], minlength=HISTOGRAM_BINS + 1)
    # pixels with bin >= k: predicted foreground at threshold k/1000
    fg_at_least = fg.flip(0).cumsum(0).flip(0).cpu().numpy()
    bg_at_least = bg.flip(0).cumsum(0).flip(0).cpu().numpy()
    # thresholds k/1000 for k = 1..999 (a valid trainer.threshold lies strictly between 0 and 1)
    tp = fg_at_least[1:HISTOGRAM_BINS].astype(np.float64)
    fp = bg_at_least[1:HISTOGRAM_BINS].astype(np.float64)
    fn = fg.sum().item() - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 1.0)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), 1.0)
        precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 1.0)
    thresholds = np.arange(1, HISTOGRAM_BINS) / HISTOGRAM_BINS
    return Calibration(thresholds, dice, iou, precision, recall, best=int(np.argmax(dice)),
                       at_half=HISTOGRAM_BINS // 2 - 1)


def write_threshold(trained: Trained, threshold: float) -> None:
    """Store the threshold in the checkpoint file, where `predict` and `evaluate` pick it up."""
    checkpoint = dict(trained.checkpoint, threshold=threshold)
    checkpoints.save_atomic(checkpoint, trained.path)


def log_evaluation(trained: Trained, *, runs: Path, split: str, full_resolution: bool,
                   found: dict[str, float], confusion: torch.Tensor,
                   calibration: Calibration | None,
                   per_frame: dict[str, Any] | None = None) -> str:
    """A new MLflow run holding the evaluation, linked to the run that trained the model (with
    each frame's counts, eval/per_frame.npz, when given: `cityseg compare` pairs two of them)."""
    tracker = tracking.open(runs, experiment=trained.exp.tracking.experiment,
                            uri=trained.exp.tracking.uri)
    task = trained.task
    tags = {"source_run": trained.run_id, "eval_split": split,
            "eval_resolution": "full" if full_resolution else "training",
            "checkpoint": str(trained.path), "threshold": str(trained.threshold),
            "inference": trained.exp.trainer.inference.describe()}
    folder = tempfile.TemporaryDirectory(prefix="cityseg-eval-")  # outlives the run's writes
    with folder, tracker.session(run_name=f"eval-{trained.exp.name}-{split}",
                                 tags=tags) as run_id:
        tracker.log_metrics({f"{split}/{k}": v for k, v in found.items()}, step=0)
        log_confusion(tracker, task, confusion)
        if per_frame:
            path = Path(folder.name) / Path(PER_FRAME).name
            write_frame_counts(path, frames=per_frame["frames"], counts=per_frame["counts"],
                               class_names=task.class_names,
                               epoch=int(trained.checkpoint.get("epoch", 0)))
            tracker.log_file(path, str(Path(PER_FRAME).parent))
        samples = _sample_arrays(trained, split)
        if samples is not None:
            tracker.log_image(viz.sample_panel(*samples, task=task), f"samples/{split}.png")
        if calibration is not None:
            best = calibration.best
            tracker.log_image(viz.pr_curve(calibration), "precision_recall.png")
            tracker.log_metrics({
                f"{split}/calibrated_threshold": float(calibration.thresholds[best]),
                f"{split}/calibrated_dice": float(calibration.dice[best])}, step=0)
    return run_id


def log_confusion(tracker: tracking.Tracker, task: Task, counts: torch.Tensor) -> None:
    """A confusion matrix as the run's artifacts: JSON, and where the task asks for it, its
    image and a per-class IoU table (training logs its last epoch's, evaluation its split's)."""
    matrix = counts.cpu().numpy()
    tracker.log_text(json.dumps(confusion_record(matrix, task.class_names), indent=2),
                     "confusion_matrix.json")
    if not task.per_class_report:
        return
    tracker.log_image(viz.confusion_image(matrix, task.class_names), "confusion_matrix.png")
    found = task.scores(counts)
    lines = ["| class | IoU |", "|---|---|"]
    for name in task.class_names:
        key = f"iou/{name.replace(' ', '_')}"
        lines.append(f"| {name} | {found[key]:.4f} |" if key in found else f"| {name} | absent |")
    lines.append(f"| **mean (present classes)** | {found['miou']:.4f} |")
    tracker.log_text("\n".join(lines) + "\n", "per_class_iou.md")


def _sample_arrays(trained: Trained, split: str):
    found = split_loader(trained, split).dataset.spread(trained.exp.tracking.num_samples)
    if found is None:
        return None
    images, masks = found
    return images.numpy(), masks.numpy(), trained.predictor.predict(images).cpu().numpy()
