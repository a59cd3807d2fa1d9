"""run(experiment): config -> components -> trainer -> tracking.

Components are built (and data located or generated) before the MLflow run opens, so a
missing dataset fails without leaving an empty run behind. Once open, the run always ends:
FINISHED, FAILED if training raised, KILLED on Ctrl-C.
"""

from __future__ import annotations

import json
import math
import platform
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import cityseg
from cityseg import tracking, viz
from cityseg.config import Experiment, flatten, to_yaml
from cityseg.data.cityscapes import IGNORE_INDEX, TRAIN_CLASSES, foreground_stats
from cityseg.data.datasets import DataSplits
from cityseg.data.transforms import build_augmentations
from cityseg.engine.display import NullDisplay
from cityseg.engine.trainer import FitResult, Trainer, TrainerSettings
from cityseg.errors import ConfigError, DataError
from cityseg.metrics import multiclass_scores
from cityseg.registry import DATASETS, LOSSES, MODELS, OPTIMIZERS, SCHEDULERS, BuildContext, Params


@dataclass
class RunResult:
    run_id: str
    metrics: dict[str, float]  # the last epoch's
    best_epoch: int
    best_score: float
    checkpoints: dict[str, Path]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device: {name!r} asked for, but CUDA is not available on this machine")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def _loader(dataset: Dataset, *, batch_size: int, shuffle: bool, num_workers: int, seed: int,
            device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _tags(device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, str]:
    import torchvision

    return {"git_commit": _git_commit(), "cityseg_version": cityseg.__version__,
            "torch_version": torch.__version__, "torchvision_version": torchvision.__version__,
            "mlflow_version": tracking.mlflow_version(), "python_version": platform.python_version(),
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "precision": "bf16" if amp_dtype else "fp32"}


def resolve_loss(exp: Experiment, splits: DataSplits) -> tuple[Params, dict[str, str]]:
    """The loss params with `pos_weight: auto` replaced by the training split's background/foreground
    pixel ratio, and the params to log about it."""
    loss = exp.loss
    if "pos_weight" not in type(loss).model_fields or loss.pos_weight != "auto":
        return loss, {}
    _, ratio = foreground_stats(splits.train_class_counts(), exp.data.foreground)
    if not math.isfinite(ratio):
        raise DataError("loss.pos_weight: auto, but the training split has no foreground pixels "
                        f"({', '.join(exp.data.foreground)}); set a number instead")
    value = round(ratio, 3)
    return loss.model_copy(update={"pos_weight": value}), {"loss.pos_weight_used": str(value)}


def _data_report(exp: Experiment, splits: DataSplits) -> tuple[dict[str, str], dict]:
    """Tags describing the data, and the class frequencies of the training split."""
    counts = splits.train_class_counts()
    labelled = int(counts[: len(TRAIN_CLASSES)].sum())
    fraction, _ = foreground_stats(counts, exp.data.foreground)
    tags = {"data.layout": splits.index.layout, "data.mask_encoding": splits.index.encoding.kind,
            "data.fingerprint.train": splits.fingerprints["train"],
            "data.fingerprint.val": splits.fingerprints["val"],
            "data.train_images": str(len(splits.train)), "data.val_images": str(len(splits.val)),
            "data.foreground_fraction": f"{fraction:.5f}"}
    frequencies = {"split": "train", "resized_to": list(exp.data.image_size),
                   "ignored_pixels": int(counts[IGNORE_INDEX]), "labelled_pixels": labelled,
                   "classes": {name: {"pixels": int(counts[i]), "frequency": int(counts[i]) / max(1, labelled)}
                               for i, name in enumerate(TRAIN_CLASSES)}}
    return tags, frequencies


def run(exp: Experiment, *, display=None) -> RunResult:
    """Train the experiment and track it in MLflow; returns the final metrics."""
    display = display or NullDisplay()
    seed_everything(exp.seed)
    device = resolve_device(exp.trainer.device)
    amp_dtype = resolve_precision(exp.trainer.precision, device)
    task = exp.data.task
    class_names = ("background", "foreground") if task == "binary" else TRAIN_CLASSES
    ctx = BuildContext(task=task, out_channels=1 if task == "binary" else len(TRAIN_CLASSES),
                       ignore_index=IGNORE_INDEX, image_size=exp.data.image_size)

    if exp.data.cache:
        display.message(f"data: preparing the decode cache in {exp.data.cache_dir} (first use decodes every image)")
    splits = DATASETS.build(exp.data, ctx, train_transform=build_augmentations(exp.augment, ctx))
    loader_args = {"batch_size": exp.data.batch_size, "num_workers": exp.data.num_workers,
                   "seed": exp.seed, "device": device}
    train_loader = _loader(splits.train, shuffle=True, **loader_args)
    val_loader = _loader(splits.val, shuffle=False, **loader_args)
    sample_ids = range(min(exp.tracking.num_samples, len(splits.val)))
    samples = None
    if sample_ids:
        pairs = [splits.val[i] for i in sample_ids]
        samples = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))

    loss_params, loss_logged = resolve_loss(exp, splits)
    model = MODELS.build(exp.model, ctx)
    loss_fn = LOSSES.build(loss_params, ctx)
    optimizer = OPTIMIZERS.build(exp.optimizer, model)
    scheduler = SCHEDULERS.build(exp.scheduler, optimizer, steps_per_epoch=len(train_loader),
                                 epochs=exp.trainer.epochs)
    data_tags, frequencies = _data_report(exp, splits)

    tracker = tracking.Tracker(root=exp.tracking.dir, experiment=exp.tracking.experiment)
    run_id = tracker.start(run_name=exp.name, tags={**_tags(device, amp_dtype), **data_tags})
    status = "FAILED"
    settings = TrainerSettings(
        task=task, num_classes=len(class_names), class_names=class_names,
        epochs=exp.trainer.epochs, device=device, amp_dtype=amp_dtype,
        channels_last=exp.trainer.channels_last, grad_clip_norm=exp.trainer.grad_clip_norm,
        threshold=exp.trainer.threshold, boundary_tolerance=exp.trainer.boundary_tolerance,
        monitor=exp.monitor,
        checkpoint_dir=exp.tracking.dir / "checkpoints" / run_id)

    def on_epoch_end(epoch: int, metrics: dict[str, float], sample_arrays) -> None:
        tracker.log_metrics(metrics, step=epoch)
        if sample_arrays is not None:
            tracker.log_image(viz.sample_panel(*sample_arrays, task=task), f"samples/epoch_{epoch:03d}.png")

    trainer = Trainer(model=model, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
                      train_loader=train_loader, val_loader=val_loader, settings=settings,
                      config=exp.model_dump(mode="json"), samples=samples,
                      on_epoch_end=on_epoch_end, display=display)
    result: FitResult | None = None
    try:
        tracker.log_params({**flatten(exp.model_dump(mode="json")), **loss_logged})
        tracker.log_text(to_yaml(exp), "config.yaml")
        tracker.log_text(json.dumps(frequencies, indent=2), "data/class_frequencies.json")
        result = trainer.fit()
        tracker.set_tags({"best_epoch": str(result.best_epoch)})
        _log_confusion(tracker, trainer.confusion, class_names, task)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        for path in settings.checkpoint_dir.glob("*.pt"):  # whatever was saved, even on failure
            tracker.log_file(path, "checkpoints")
        tracker.end(status)
    return RunResult(run_id=run_id, metrics=result.history[-1], best_epoch=result.best_epoch,
                     best_score=result.best_score, checkpoints=result.checkpoints)


def _log_confusion(tracker: tracking.Tracker, counts: torch.Tensor | None, class_names: tuple[str, ...],
                   task: str) -> None:
    """The last epoch's confusion matrix (JSON), and for multiclass its image and a per-class IoU table."""
    if counts is None:
        return
    matrix = counts.cpu().numpy()
    tracker.log_text(json.dumps({"rows": "ground truth", "columns": "prediction", "classes": list(class_names),
                                 "counts": matrix.tolist()}, indent=2), "confusion_matrix.json")
    if task == "binary":
        return
    tracker.log_image(viz.confusion_image(matrix, class_names), "confusion_matrix.png")
    found = multiclass_scores(counts, class_names)
    lines = ["| class | IoU |", "|---|---|"]
    for name in class_names:
        key = f"iou/{name.replace(' ', '_')}"
        lines.append(f"| {name} | {found[key]:.4f} |" if key in found else f"| {name} | absent |")
    lines.append(f"| **mean (present classes)** | {found['miou']:.4f} |")
    tracker.log_text("\n".join(lines) + "\n", "per_class_iou.md")
