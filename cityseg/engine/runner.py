"""run(experiment): config -> components -> trainer -> tracking.

Components are built (and data located or generated) before the MLflow run opens, so a
missing dataset fails without leaving an empty run behind. Once open, the run always ends:
FINISHED; FAILED if training raised or diverged; KILLED on SIGINT/SIGTERM, after a checkpoint
that `--resume` continues from.
"""

from __future__ import annotations

import json
import math
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cityseg import tracking, viz
from cityseg.config import Experiment, flatten, to_yaml
from cityseg.data.cityscapes import IGNORE_INDEX, TRAIN_CLASSES, foreground_stats
from cityseg.data.datasets import DataSplits, EpochSampler
from cityseg.data.transforms import build_augmentations
from cityseg.engine.display import NullDisplay
from cityseg.engine.environment import (
    resolve_device,
    resolve_precision,
    run_tags,
    seed_everything,
    set_deterministic,
)
from cityseg.engine.resume import (
    check_same_experiment,
    check_weights_fit,
    config_hash,
    find_checkpoint,
    load_checkpoint,
)
from cityseg.engine.trainer import FitResult, StopFlag, Trainer, TrainerSettings, TrainState
from cityseg.errors import ConfigError, DataError, Interrupted, TrainingDiverged
from cityseg.metrics import multiclass_scores
from cityseg.registry import DATASETS, LOSSES, MODELS, OPTIMIZERS, SCHEDULERS, BuildContext, Params


@dataclass
class RunResult:
    run_id: str
    metrics: dict[str, float]  # the last epoch's
    best_epoch: int
    best_score: float
    checkpoints: dict[str, Path]
    stopped_early: bool
    resumed_from: int  # epochs already done when this call started (0: a fresh run)


@contextmanager
def stop_on_signals(flag: StopFlag):
    """SIGINT and SIGTERM set the flag (the trainer checkpoints and stops) instead of killing."""
    def handler(signum, frame):
        flag.signum = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _ignore_sigint(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: workers leave it to the main process, which
    checkpoints and stops, instead of dying under it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _loaders(splits: DataSplits, exp: Experiment, device: torch.device) -> tuple[DataLoader, EpochSampler, DataLoader]:
    common = {"batch_size": exp.data.batch_size, "num_workers": exp.data.num_workers,
              "pin_memory": device.type == "cuda", "persistent_workers": exp.data.num_workers > 0,
              "worker_init_fn": _ignore_sigint,
              # the loader's own generator: creating an iterator must not draw from the global RNG
              # (dropout uses it), or a resumed run would differ from an uninterrupted one
              "generator": torch.Generator().manual_seed(exp.seed)}
    sampler = EpochSampler(len(splits.train), seed=exp.seed, shuffle=True)
    return DataLoader(splits.train, sampler=sampler, **common), sampler, DataLoader(splits.val, **common)


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


def run(exp: Experiment, *, display=None, resume: str | None = None, run_name: str | None = None,
        tags: dict[str, str] | None = None) -> RunResult:
    """Train the experiment (or continue it: resume = RUN_ID, checkpoint path or auto) in MLflow.

    run_name defaults to the experiment's name; tags are added to the run's (sweeps use both).
    """
    display = display or NullDisplay()
    seed_everything(exp.seed)
    set_deterministic(exp.trainer.deterministic)
    device = resolve_device(exp.trainer.device)
    amp_dtype = resolve_precision(exp.trainer.precision, device)
    task = exp.data.task
    class_names = ("background", "foreground") if task == "binary" else TRAIN_CLASSES
    ctx = BuildContext(task=task, out_channels=1 if task == "binary" else len(TRAIN_CLASSES),
                       ignore_index=IGNORE_INDEX, image_size=exp.data.image_size, seed=exp.seed)

    # the store is opened late for a new run, so a data error leaves nothing behind; resuming
    # reads an existing one (and never creates it)
    has_store = (exp.tracking.dir / "mlflow.db").is_file()
    tracker = tracking.Tracker(root=exp.tracking.dir, experiment=exp.tracking.experiment) if resume and has_store else None
    checkpoint_path = find_checkpoint(resume, exp, tracker) if resume else None
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path else None
    if checkpoint is not None:
        check_same_experiment(checkpoint, exp, checkpoint_path)
    elif resume == "auto":
        display.message("--resume auto: no interrupted run of this experiment and config; starting a new one")

    if exp.data.cache:
        display.message(f"data: decode cache in {exp.data.cache_dir} (the first use decodes every image)")
    splits = DATASETS.build(exp.data, ctx, train_transform=build_augmentations(exp.augment, ctx))
    train_loader, sampler, val_loader = _loaders(splits, exp, device)
    sample_ids = range(min(exp.tracking.num_samples, len(splits.val)))
    samples = None
    if sample_ids:
        pairs = [splits.val[i] for i in sample_ids]
        samples = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))

    loss_params, loss_logged = resolve_loss(exp, splits)
    model = MODELS.build(exp.model, ctx)
    if checkpoint is not None:
        check_weights_fit(checkpoint, model, checkpoint_path)
    loss_fn = LOSSES.build(loss_params, ctx)
    optimizer = OPTIMIZERS.build(exp.optimizer, model)
    steps_per_epoch = math.ceil(len(train_loader) / exp.trainer.accumulate)
    schedule = SCHEDULERS.build(exp.scheduler, optimizer, steps_per_epoch=steps_per_epoch,
                                epochs=exp.trainer.epochs, mode=exp.monitor_mode)
    data_tags, frequencies = _data_report(exp, splits)
    config = exp.model_dump(mode="json")

    tracker = tracker or tracking.Tracker(root=exp.tracking.dir, experiment=exp.tracking.experiment)
    if checkpoint is not None:
        run_id = checkpoint["run_id"]
        if not tracker.run_exists(run_id):
            raise ConfigError(f"{checkpoint_path}: its run {run_id} is not in {exp.tracking.dir / 'mlflow.db'}; "
                              f"resume with the tracking.dir it was trained with")
        tracker.reattach(run_id)
    else:
        run_id = tracker.start(run_name=run_name or exp.name, tags={
            **run_tags(device, amp_dtype), **data_tags, "config_hash": config_hash(config), **(tags or {})})
    checkpoint_dir = exp.tracking.dir / "checkpoints" / run_id
    status, result, resumed_from = "FAILED", None, 0
    try:  # from here on the run always ends with a status, whatever fails
        settings = TrainerSettings(
            task=task, num_classes=len(class_names), class_names=class_names,
            epochs=exp.trainer.epochs, device=device, amp_dtype=amp_dtype,
            channels_last=exp.trainer.channels_last, grad_clip_norm=exp.trainer.grad_clip_norm,
            accumulate=exp.trainer.accumulate, threshold=exp.trainer.threshold,
            boundary_tolerance=exp.trainer.boundary_tolerance, monitor=exp.monitor, mode=exp.monitor_mode,
            patience=exp.trainer.patience, min_delta=exp.trainer.min_delta, checkpoint_dir=checkpoint_dir)

        def on_epoch_end(epoch: int, metrics: dict[str, float], sample_arrays) -> None:
            tracker.log_metrics(metrics, step=epoch)
            if sample_arrays is not None:
                tracker.log_image(viz.sample_panel(*sample_arrays, task=task), f"samples/epoch_{epoch:03d}.png")

        trainer = Trainer(model=torch.compile(model) if exp.trainer.compile else model, raw_model=model,
                          loss_fn=loss_fn, optimizer=optimizer, schedule=schedule, train_loader=train_loader,
                          sampler=sampler, val_loader=val_loader, settings=settings, config=config,
                          run_id=run_id, samples=samples, on_epoch_end=on_epoch_end, display=display)
        state = trainer.restore(checkpoint) if checkpoint is not None else TrainState()
        resumed_from = state.epoch - 1
        if checkpoint is None:
            tracker.log_params({**flatten(config), **loss_logged})
            tracker.log_text(to_yaml(exp), "config.yaml")
            tracker.log_text(json.dumps(frequencies, indent=2), "data/class_frequencies.json")
        else:
            tracker.set_tags({"resumed_at": f"epoch {state.epoch}, batch {state.step_in_epoch + 1}",
                              "trainer.epochs_now": str(exp.trainer.epochs)})
        with stop_on_signals(trainer.stop):
            result = trainer.fit(state)
        tracker.set_tags({"best_epoch": str(result.best_epoch), "stopped_early": str(result.stopped_early).lower()})
        _log_summary(tracker, trainer, result, exp, model)
        status = "FINISHED"
    except (Interrupted, KeyboardInterrupt):
        status = "KILLED"
        raise
    except TrainingDiverged as err:
        tracker.set_tags({"failure": str(err)})
        raise
    finally:
        try:
            for path in checkpoint_dir.glob("*.pt"):  # whatever was saved, even on failure
                tracker.log_file(path, "checkpoints")
        finally:
            tracker.end(status)
    return RunResult(run_id=run_id, metrics=result.history[-1], best_epoch=result.best_epoch,
                     best_score=result.best_score, checkpoints=result.checkpoints,
                     stopped_early=result.stopped_early, resumed_from=resumed_from)


def _log_summary(tracker: tracking.Tracker, trainer: Trainer, result: FitResult, exp: Experiment,
                 model: torch.nn.Module) -> None:
    """End of a successful run: learning curves, confusion report, and the best model."""
    tracker.log_image(viz.learning_curves(result.history, exp.monitor), "learning_curves.png")
    _log_confusion(tracker, trainer.confusion, trainer.s.class_names, exp.data.task)
    if not exp.tracking.log_model:
        return
    best = torch.load(result.checkpoints["best"], map_location="cpu", weights_only=True)
    model = model.to("cpu", memory_format=torch.contiguous_format)
    model.load_state_dict(best["model"])
    height, width = exp.data.image_size
    example = np.random.default_rng(0).standard_normal((1, 3, height, width)).astype(np.float32)
    tracker.log_model(model, example)


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
