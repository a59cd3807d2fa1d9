"""Use a trained model: load it from a run or a checkpoint, evaluate it on a split, calibrate
the binary threshold, and predict masks for any images."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import DataLoader

from cityseg import tracking, viz
from cityseg.config import Experiment, apply_overrides, validate
from cityseg.data.cityscapes import IGNORE_INDEX, TRAIN_CLASSES, train_id_colors
from cityseg.data.datasets import SegmentationDataset, data_index, reader_for, task_lut
from cityseg.data.layouts import IMAGE_EXTS, read_sample
from cityseg.engine.environment import resolve_device, resolve_precision
from cityseg.engine.resume import check_weights_fit, load_checkpoint
from cityseg.engine.trainer import autocast_for, evaluate_batches, model_inputs, save_atomic
from cityseg.errors import CitysegError
from cityseg.metrics import predict
from cityseg.registry import MODELS, BuildContext

HISTOGRAM_BINS = 1000  # threshold resolution of the calibration


@dataclass
class Trained:
    """A model ready for inference, with the experiment it was trained by."""

    exp: Experiment
    model: nn.Module
    checkpoint: dict
    path: Path
    run_id: str
    threshold: float  # the calibrated one if the checkpoint has it, else trainer.threshold
    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def task(self) -> str:
        return self.exp.data.task

    @property
    def class_names(self) -> tuple[str, ...]:
        return ("background", "foreground") if self.task == "binary" else TRAIN_CLASSES


def load_trained(*, run_id: str | None, checkpoint: Path | None, runs: Path,
                 overrides: list[str] | tuple[str, ...] = (), device: str = "auto") -> Trained:
    """The best checkpoint of a run (local, else the run's artifact) or a checkpoint file."""
    if (run_id is None) == (checkpoint is None):
        raise CitysegError("give --run RUN_ID or --checkpoint PATH (one of them)")
    path = checkpoint if checkpoint is not None else tracking.fetch_checkpoint(runs, run_id)
    saved = load_checkpoint(path)
    raw = apply_overrides(copy.deepcopy(saved["config"]), overrides)
    exp = validate(raw, source=f"config of checkpoint {path}")
    task = exp.data.task
    ctx = BuildContext(task=task, out_channels=1 if task == "binary" else len(TRAIN_CLASSES),
                       ignore_index=IGNORE_INDEX, image_size=exp.data.image_size, seed=exp.seed)
    model = MODELS.build(exp.model, ctx)
    check_weights_fit(saved, model, path)
    dev = resolve_device(device)
    asked = any(o.startswith("trainer.threshold=") for o in overrides)
    threshold = float(saved["threshold"]) if "threshold" in saved and not asked else exp.trainer.threshold
    return Trained(exp, model.to(dev).eval(), saved, path, saved["run_id"], threshold, dev,
                   resolve_precision(exp.trainer.precision, dev))


def _prepare(trained: Trained):
    return lambda images, masks: model_inputs(images, masks, device=trained.device,
                                              channels_last=trained.exp.trainer.channels_last)


def _full_resolution(trained: Trained, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(image at the training size, mask at its own size) one sample at a time."""
    index = data_index(trained.exp.data, (split,))
    lut = task_lut(trained.exp.data)
    height, width = trained.exp.data.image_size
    for sample in index.samples[split]:
        photo, train_ids = read_sample(sample, layout=index.layout, encoding=index.encoding)
        small = np.array(Image.fromarray(photo).resize((width, height), Image.BILINEAR))
        yield (torch.from_numpy(small).permute(2, 0, 1)[None], torch.from_numpy(lut[train_ids])[None])


def split_loader(trained: Trained, split: str) -> DataLoader:
    """The split at the training size, exactly as validation saw it."""
    p = trained.exp.data
    reader, _ = reader_for(p, data_index(p, (split,)), split)
    dataset = SegmentationDataset(reader, lut=task_lut(p), transform=None)
    return DataLoader(dataset, batch_size=p.batch_size, num_workers=p.num_workers)


def evaluate(trained: Trained, *, split: str, full_resolution: bool) -> tuple[dict[str, float], torch.Tensor]:
    """The training metrics of the model on a split; (scores, confusion counts)."""
    batches = _full_resolution(trained, split) if full_resolution else split_loader(trained, split)
    found, counts = evaluate_batches(
        trained.model, batches, prepare=_prepare(trained), autocast=lambda: autocast_for(trained.device, trained.amp_dtype),
        threshold=trained.threshold, loss_fn=None, num_classes=len(trained.class_names),
        class_names=trained.class_names, task=trained.task, tolerance=trained.exp.trainer.boundary_tolerance,
        device=trained.device)
    if counts.sum() == 0:
        raise CitysegError(f"split {split!r} has no labelled pixels (Cityscapes' test labels are not public); "
                           f"evaluate on val or train")
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
    if trained.task != "binary":
        raise CitysegError("--calibrate is for binary models; this one is multiclass")
    fg = torch.zeros(HISTOGRAM_BINS + 1, dtype=torch.int64, device=trained.device)
    bg = torch.zeros_like(fg)
    prepare = _prepare(trained)
    for images, masks in split_loader(trained, split):
        x, y = prepare(images, masks)
        with autocast_for(trained.device, trained.amp_dtype):
            prob = torch.sigmoid(trained.model(x)[:, 0].float())
        # bin k holds p in (k/1000, (k+1)/1000], so "bin >= k" is exactly "p > k/1000", as predictions use
        bins = (torch.ceil(prob * HISTOGRAM_BINS) - 1).long().clamp_(0, HISTOGRAM_BINS)
        fg += torch.bincount(bins[y == 1], minlength=HISTOGRAM_BINS + 1)
        bg += torch.bincount(bins[y == 0], minlength=HISTOGRAM_BINS + 1)
    fg_at_least = fg.flip(0).cumsum(0).flip(0).cpu().numpy()  # pixels with bin >= k: predicted foreground
    bg_at_least = bg.flip(0).cumsum(0).flip(0).cpu().numpy()
    # thresholds k/1000 for k = 1..999 (a valid trainer.threshold lies strictly between 0 and 1)
    tp, fp = fg_at_least[1:HISTOGRAM_BINS].astype(np.float64), bg_at_least[1:HISTOGRAM_BINS].astype(np.float64)
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
    save_atomic(checkpoint, trained.path)


def _inputs_of(paths: list[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        elif path.exists():
            files.append(path)
        else:
            raise CitysegError(f"{path}: no such file or folder")
    return files


@torch.inference_mode()
def predict_image(trained: Trained, photo: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W, 3) uint8 photo of any size -> (labels at the photo's size, foreground probability or None)."""
    height, width = trained.exp.data.image_size
    small = np.array(Image.fromarray(photo).resize((width, height), Image.BILINEAR))
    x, _ = model_inputs(torch.from_numpy(small).permute(2, 0, 1)[None], torch.zeros(1, 1, 1),
                        device=trained.device, channels_last=trained.exp.trainer.channels_last)
    with autocast_for(trained.device, trained.amp_dtype):
        logits = trained.model(x).float()
    logits = F.interpolate(logits, size=photo.shape[:2], mode="bilinear", align_corners=False)
    if trained.task == "binary":
        prob = torch.sigmoid(logits[0, 0])
        return (prob > trained.threshold).cpu().numpy().astype(np.uint8), prob.cpu().numpy()
    return logits[0].argmax(0).cpu().numpy().astype(np.uint8), None


def overlay(photo: np.ndarray, labels: np.ndarray, task: str) -> np.ndarray:
    """The photo with the prediction blended over it (binary: red foreground; multiclass: class colours)."""
    if task == "binary":
        colours = np.zeros_like(photo)
        colours[labels == 1] = (255, 0, 0)
        alpha = (labels == 1)[..., None] * 0.5
    else:
        colours = train_id_colors()[labels]
        alpha = np.full((*labels.shape, 1), 0.5)
    return (photo * (1 - alpha) + colours * alpha).astype(np.uint8)


def predict_files(trained: Trained, inputs: list[Path], out: Path, *, probabilities: bool,
                  progress=lambda files: files) -> tuple[list[Path], list[str]]:
    """Write <stem>_mask.png, <stem>_overlay.png (and <stem>_prob.png) per image; (written, skipped)."""
    out.mkdir(parents=True, exist_ok=True)
    written, skipped, used = [], [], set()
    for path in progress(_inputs_of(inputs)):
        try:
            with Image.open(path) as f:
                photo = np.array(f.convert("RGB"))
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            skipped.append(f"{path}: unreadable ({err})")
            continue
        stem, n = path.stem, 1
        while stem in used:
            stem, n = f"{path.stem}_{n}", n + 1
        used.add(stem)
        labels, prob = predict_image(trained, photo)
        mask = labels * 255 if trained.task == "binary" else labels  # binary 0/255, multiclass train ids
        Image.fromarray(mask).save(out / f"{stem}_mask.png")
        Image.fromarray(overlay(photo, labels, trained.task)).save(out / f"{stem}_overlay.png")
        written.append(out / f"{stem}_mask.png")
        if probabilities and prob is not None:
            Image.fromarray((prob * 255).round().astype(np.uint8)).save(out / f"{stem}_prob.png")
    return written, skipped


def log_evaluation(trained: Trained, *, runs: Path, split: str, full_resolution: bool,
                   found: dict[str, float], confusion: torch.Tensor, calibration: Calibration | None) -> str:
    """A new MLflow run holding the evaluation, linked to the run that trained the model."""
    tracker = tracking.Tracker(root=runs, experiment=trained.exp.tracking.experiment)
    resolution = "full" if full_resolution else "training"
    run_id = tracker.start(run_name=f"eval-{trained.exp.name}-{split}", tags={
        "source_run": trained.run_id, "eval_split": split, "eval_resolution": resolution,
        "checkpoint": str(trained.path), "threshold": str(trained.threshold)})
    status = "FAILED"
    try:
        tracker.log_metrics({f"{split}/{k}": v for k, v in found.items()}, step=0)
        tracker.log_text(json.dumps({"classes": list(trained.class_names), "counts": confusion.tolist()}, indent=2),
                         "confusion_matrix.json")
        if trained.task == "multiclass":
            tracker.log_image(viz.confusion_image(confusion.numpy(), trained.class_names), "confusion_matrix.png")
        samples = _sample_arrays(trained, split)
        if samples is not None:
            tracker.log_image(viz.sample_panel(*samples, task=trained.task), f"samples/{split}.png")
        if calibration is not None:
            tracker.log_image(viz.pr_curve(calibration), "precision_recall.png")
            tracker.log_metrics({f"{split}/calibrated_threshold": float(calibration.thresholds[calibration.best]),
                                 f"{split}/calibrated_dice": float(calibration.dice[calibration.best])}, step=0)
        status = "FINISHED"
    finally:
        tracker.end(status)
    return run_id


@torch.inference_mode()
def _sample_arrays(trained: Trained, split: str):
    count = trained.exp.tracking.num_samples
    if count == 0:
        return None
    dataset = split_loader(trained, split).dataset
    pairs = [dataset[i] for i in range(min(count, len(dataset)))]
    images, masks = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    x, _ = _prepare(trained)(images, masks)
    with autocast_for(trained.device, trained.amp_dtype):
        logits = trained.model(x)
    pred = predict(logits, task=trained.task, threshold=trained.threshold)
    return images.numpy(), masks.numpy(), pred.cpu().numpy()
