"""Use a trained model: load it from a run or a checkpoint, evaluate it on a split, calibrate
the binary threshold, and predict masks for any images (and videos: video.py)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cityseg import tracking, viz
from cityseg.config import Experiment, apply_overrides, validate
from cityseg.data.datasets import SegmentationDataset, data_index, reader_for, task_lut
from cityseg.data.layouts import IMAGE_EXTS, read_photo, read_sample
from cityseg.data.tasks import Task
from cityseg.engine import checkpoints, video
from cityseg.engine.predictor import Predictor, place_model
from cityseg.errors import CitysegError, DataError, StorageError
from cityseg.metrics import confusion_record
from cityseg.registry import MODELS

if TYPE_CHECKING:
    from rich.progress import Progress

HISTOGRAM_BINS = 1000  # threshold resolution of the calibration


@dataclass
class Trained:
    """A model ready for inference, with the experiment it was trained by."""

    exp: Experiment
    predictor: Predictor  # threshold: the calibrated one if the checkpoint has it
    checkpoint: dict
    path: Path
    run_id: str
    note: str | None = None  # the local checkpoint could not be used: which copy was instead

    @property
    def task(self) -> Task:
        return self.exp.task

    @property
    def threshold(self) -> float:
        return self.predictor.threshold


def load_trained(*, run_id: str | None, checkpoint: Path | None, runs: Path,
                 overrides: list[str] | tuple[str, ...] = (), device: str = "auto",
                 which: checkpoints.Which = "best", uri: str | None = None) -> Trained:
    """A run's best (or last) checkpoint, local else the run's artifact in the store at `uri`
    (its tracking.uri; None: MLFLOW_TRACKING_URI or the store under `runs`), or a checkpoint
    file, as a model whose weights fit, on the device, inside its Predictor."""
    if (run_id is None) == (checkpoint is None):
        raise CitysegError("give --run RUN_ID or --checkpoint PATH (one of them)")
    if checkpoint is not None:
        found = checkpoints.Fetched(checkpoint, checkpoints.load(checkpoint))
    else:
        found = checkpoints.intact(runs, run_id, which, uri=uri)
    path, saved = found.path, found.checkpoint
    raw = apply_overrides(copy.deepcopy(saved["config"]), overrides)
    exp = validate(raw, source=f"config of checkpoint {path}", saved=True)
    model = MODELS.build(exp.model, exp.build_context())
    checkpoints.check_weights_fit(saved, model, path)
    asked = any(o.startswith("trainer.threshold=") for o in overrides)
    # a threshold is in the checkpoint only once `evaluate --calibrate --write-threshold` put it
    threshold = float(saved["threshold"]) if "threshold" in saved and not asked else None
    model = place_model(model.eval(), exp, device)
    predictor = Predictor.for_experiment(exp, model, device=device, threshold=threshold)
    return Trained(exp, predictor, saved, path, saved["run_id"], found.note)


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
    reader, _ = reader_for(p, data_index(p, (split,)), split)
    dataset = SegmentationDataset(reader, lut=task_lut(p), transform=None)
    return DataLoader(dataset, batch_size=p.batch_size, num_workers=p.workers)


def evaluate(trained: Trained, *, split: str, full_resolution: bool
             ) -> tuple[dict[str, float], torch.Tensor]:
    """The training metrics of the model on a split; (scores, confusion counts).

    At the training size, the split is scored as validation scores it; at full resolution,
    every label of the files is scored against exactly what `predict` writes for the photo.
    """
    tolerance = trained.exp.trainer.boundary_tolerance_diagonal
    if full_resolution:
        found, counts = trained.predictor.evaluate_photos(_full_resolution(trained, split),
                                                          tolerance=tolerance)
    else:
        found, counts = trained.predictor.evaluate(split_loader(trained, split),
                                                   tolerance=tolerance)
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


def input_files(paths: list[Path]) -> list[Path]:
    """The files named, and the images and videos in the folders named (searched recursively)."""
    suffixes = (*IMAGE_EXTS, *video.VIDEO_EXTS)
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes)
        elif path.exists():
            files.append(path)
        else:
            raise CitysegError(f"{path}: no such file or folder")
    return files


def _as_uint8(images: np.ndarray) -> np.ndarray:
    """Whole values 0..255 as uint8; others refused (a cast would wrap 16-bit values and turn
    0..1 floats black)."""
    if images.dtype == np.uint8:
        return images
    numeric = images.dtype.kind in "iuf"
    whole = numeric and np.array_equal(images, np.round(images))
    if not whole or (images.size and (images.min() < 0 or images.max() > 255)):
        found = f" with values {images.min()}..{images.max()}" if numeric and images.size else ""
        raise CitysegError(f"expected RGB images with whole values 0..255 (uint8), "
                           f"got {images.dtype}{found}")
    return images.astype(np.uint8)


def predict_masks(trained: Trained, images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) or (H, W, 3) uint8 photos -> (N, H, W) uint8 masks as predict writes them."""
    images = _as_uint8(np.asarray(images))
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise CitysegError(f"expected uint8 RGB images of shape (N, H, W, 3), got {images.shape}")
    return np.stack([trained.task.mask_values[trained.predictor.predict_photo(image)[0]]
                     for image in images])


def check_out(out: Path) -> None:
    """--out must be a folder or creatable as one: refused before any model is loaded."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                what = "is a file" if folder == out else f"is inside {folder}, a file"
                raise CitysegError(f"--out {out}: {what}; give a folder (created if missing)")
            return


def make_out(out: Path) -> None:
    """Create the --out folder (and its parents); StorageError naming it if that fails."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"--out {out}: cannot create the folder ({err.strerror})") from None


def save_png(image: np.ndarray, path: Path, *, written: int) -> None:
    """One PNG; StorageError naming it (and how many inputs were done before it) on failure."""
    try:
        Image.fromarray(image).save(path)
    except OSError as err:
        raise StorageError(f"{path}: cannot write ({err.strerror or err}); {written} input(s) "
                           f"written before it") from None


def tracked(progress: Progress | None, files: list[Path], description: str):
    """The files, counted on the progress bar when there is one."""
    return files if progress is None else progress.track(files, description=description)


def _predict_photo(trained: Trained, path: Path, out: Path, stem: str, *, probabilities: bool,
                   written: int) -> Path:
    """<stem>_mask.png, <stem>_overlay.png (and <stem>_prob.png) of one image; its mask's path."""
    photo = read_photo(path)
    labels, prob = trained.predictor.predict_photo(photo)
    images = {"mask": trained.task.mask_values[labels],
              "overlay": viz.overlay(photo, labels, trained.task)}
    if probabilities and prob is not None:
        images["prob"] = (prob * 255).round().astype(np.uint8)
    for kind, image in images.items():
        save_png(image, out / f"{stem}_{kind}.png", written=written)
    return out / f"{stem}_mask.png"


def predict_files(trained: Trained, inputs: list[Path], out: Path, *, probabilities: bool,
                  masks: bool = False, progress: Progress | None = None
                  ) -> tuple[list[Path], list[str]]:
    """Write <stem>_mask.png, <stem>_overlay.png (and <stem>_prob.png) per image, and
    <stem>_overlay.mp4 (and with masks <stem>_mask.mp4) per video; an input that cannot or
    should not be decoded is skipped, named, and the rest go on. Two inputs of the same stem
    get <stem>, <stem>_1, ... (an image and a video of one stem need not: their files differ).
    Returns (written: each image's mask and each video's overlay, skipped: one
    "<path>: <reason>" each)."""
    check_out(out)
    files = input_files(inputs)
    make_out(out)
    written, skipped, used = [], [], set()
    for path in tracked(progress, files, "inputs"):
        is_video = path.suffix.lower() in video.VIDEO_EXTS
        stem, n = path.stem, 1
        while (stem, is_video) in used:
            stem, n = f"{path.stem}_{n}", n + 1
        try:
            if is_video:
                written.append(video.predict_video(trained, path, out, stem, masks=masks,
                                                   progress=progress))
            else:
                written.append(_predict_photo(trained, path, out, stem,
                                              probabilities=probabilities, written=len(written)))
        except DataError as err:
            skipped.append(str(err))
            continue
        used.add((stem, is_video))
    return written, skipped


def log_evaluation(trained: Trained, *, runs: Path, split: str, full_resolution: bool,
                   found: dict[str, float], confusion: torch.Tensor,
                   calibration: Calibration | None) -> str:
    """A new MLflow run holding the evaluation, linked to the run that trained the model."""
    tracker = tracking.open(runs, experiment=trained.exp.tracking.experiment,
                            uri=trained.exp.tracking.uri)
    task = trained.task
    tags = {"source_run": trained.run_id, "eval_split": split,
            "eval_resolution": "full" if full_resolution else "training",
            "checkpoint": str(trained.path), "threshold": str(trained.threshold),
            "inference": trained.exp.trainer.inference.describe()}
    with tracker.session(run_name=f"eval-{trained.exp.name}-{split}", tags=tags) as run_id:
        tracker.log_metrics({f"{split}/{k}": v for k, v in found.items()}, step=0)
        tracker.log_text(json.dumps(confusion_record(confusion, task.class_names), indent=2),
                         "confusion_matrix.json")
        if task.per_class_report:
            tracker.log_image(viz.confusion_image(confusion.numpy(), task.class_names),
                              "confusion_matrix.png")
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


def _sample_arrays(trained: Trained, split: str):
    found = split_loader(trained, split).dataset.first(trained.exp.tracking.num_samples)
    if found is None:
        return None
    images, masks = found
    return images.numpy(), masks.numpy(), trained.predictor.predict(images).cpu().numpy()
