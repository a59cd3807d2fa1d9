"""run(experiment): config -> components -> trainer -> tracking.

Components are built (and data located or generated) before the MLflow run opens, so a
missing dataset fails without leaving an empty run behind. Once open, the run session always
ends it: FINISHED; FAILED if training raised or diverged; KILLED on SIGINT/SIGTERM, after a
checkpoint that `--resume` continues from.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cityseg import tracking, viz
from cityseg.config import Experiment, flatten, to_yaml
from cityseg.data.cityscapes import IGNORE_INDEX, TRAIN_CLASSES, foreground_stats
from cityseg.data.datasets import DataSplits, EpochSampler, ShardSampler
from cityseg.data.device_augment import DeviceAugmenter
from cityseg.data.transforms import build_augmentations, device_augmentations, device_problem
from cityseg.engine import checkpoints, distributed
from cityseg.engine.display import NullDisplay
from cityseg.engine.environment import (
    device_name,
    resolve_device,
    run_tags,
    seed_everything,
    set_deterministic,
)
from cityseg.engine.predictor import Predictor
from cityseg.engine.resume import (
    ResumePoint,
    check_run_resumable,
    check_same_world,
    config_hash,
    resume_point,
)
from cityseg.engine.trainer import FitResult, StopFlag, Trainer, TrainerSettings, TrainState
from cityseg.errors import ConfigError, DataError, Interrupted  # noqa: F401  (tests catch it here)
from cityseg.optim import describe_groups
from cityseg.registry import DATASETS, LOSSES, MODELS, OPTIMIZERS, SCHEDULERS, Params

# after each epoch (rank 0): tags to stop the run with, FINISHED, or None to go on
EpochHook = Callable[[int, dict[str, float]], "dict[str, str] | None"]


@dataclass
class RunResult:
    run_id: str
    metrics: dict[str, float]  # the last epoch's
    best_epoch: int
    best_score: float
    checkpoints: dict[str, Path]
    stopped_early: bool
    resumed_from: int  # epochs already done when this call started (0: a fresh run)
    url: str = ""  # the run's page in the MLflow UI (rank 0)


@dataclass
class Components:
    """Everything a run trains with, built before its MLflow run opens."""

    splits: DataSplits
    train_loader: DataLoader
    sampler: EpochSampler
    val_loader: DataLoader
    samples: tuple[torch.Tensor, torch.Tensor] | None  # fixed validation images for panels
    device_augment: DeviceAugmenter | None  # set when augmentations run on the device
    model: torch.nn.Module  # plain: its state_dict goes into checkpoints
    predictor: Predictor  # validation and panels
    train_model: torch.nn.Module  # what trains: maybe compiled, DistributedDataParallel
    loss_fn: torch.nn.Module
    loss_logged: dict[str, str]  # the pos_weight that `auto` chose
    optimizer: torch.optim.Optimizer
    schedule: object
    data_tags: dict[str, str]
    class_frequencies: dict


def run(exp: Experiment, *, display=None, resume: str | None = None,
        fallback_best: bool = False, run_name: str | None = None,
        tags: dict[str, str] | None = None, epoch_hook: EpochHook | None = None) -> RunResult:
    """Train the experiment (or continue it: resume = RUN_ID, checkpoint path or auto) in MLflow.

    fallback_best: resume from best.pt when last.pt is corrupt. run_name defaults to the
    experiment's name; tags are added to the run's (sweeps use both). epoch_hook(epoch,
    metrics), called on rank 0 after each logged epoch, may return tags: the run gets them and
    stops there, FINISHED (a pruned sweep trial). Under torchrun, every process calls this;
    rank 0 alone opens the MLflow run, prints and writes checkpoints.
    """
    device = distributed.device_for(resolve_device(exp.trainer.device))
    world = distributed.setup(device)
    try:
        result = _run(exp, world, device, display=display if world.is_main else None,
                      resume=resume, fallback_best=fallback_best, run_name=run_name, tags=tags,
                      epoch_hook=epoch_hook)
    except BaseException:
        distributed.teardown(clean=False)
        raise
    distributed.teardown(clean=True)
    return result


def _run(exp: Experiment, world: distributed.World, device: torch.device, *, display,
         resume: str | None, fallback_best: bool, run_name: str | None,
         tags: dict[str, str] | None, epoch_hook: EpochHook | None) -> RunResult:
    display = display or NullDisplay()
    check_world(exp, world, device)
    seed_everything(exp.seed)
    set_deterministic(exp.trainer.deterministic)
    main = world.is_main
    tracker, point = distributed.together(
        lambda: _find_resume_point(exp, resume, display, fallback_best) if main else (None, None))
    point = distributed.broadcast(point)  # weights, optimizer and RNG states for every rank
    if point is not None:
        check_same_world(point, world.size)
    # local rank 0 first: it generates data and decode caches that the others then reuse
    splits = distributed.together(lambda: build_data(exp, display), local_main_first=True)
    parts = distributed.together(lambda: build_components(exp, splits, point, device))
    parts.train_model = wrap_for_training(parts.model, exp, world, device)
    if exp.trainer.compile and not world.distributed:
        parts.predictor.model = parts.train_model  # one compiled module serves both
    devices = distributed.gather(device_name(device))
    session = contextlib.ExitStack()

    def open_run() -> tuple[tracking.Tracker, str, str | None] | None:
        """Rank 0: start the MLflow run, or reattach to the one the checkpoint belongs to."""
        if not main:
            return None
        store = tracker or tracking.Tracker(root=exp.tracking.dir,
                                            experiment=exp.tracking.experiment,
                                            uri=exp.tracking.uri)
        crash = check_run_resumable(point, exp, store) if point is not None else None
        new_tags = (_new_run_tags(exp, parts, world, devices, tags) if point is None else None)
        run_id = session.enter_context(store.session(
            run_name=run_name or exp.name, tags=new_tags,
            reattach=point.run_id if point else None,
            system_metrics=exp.tracking.system_metrics))
        return store, run_id, crash

    with session:  # on rank 0, the MLflow run: it ends whatever happens after it started
        tracker, run_id, crash = distributed.together(open_run) or (None, None, None)
        run_id = distributed.broadcast(run_id)
        trainer = _trainer(exp, parts, run_id, tracker, display, epoch_hook)
        state = distributed.together(
            lambda: trainer.restore(point.checkpoint) if point is not None else TrainState())
        resumed_from = state.epoch - 1
        if main:
            _log_start(tracker, exp, parts, state, resumed=point is not None, crash=crash)
        try:
            with stop_on_signals(trainer.stop):
                result = trainer.fit(state)
        except BaseException:
            if main:
                with contextlib.suppress(Exception):  # keep what was saved; never hide the error
                    _upload_checkpoints(tracker, exp, run_id)
            raise
        if main:
            _upload_checkpoints(tracker, exp, run_id)
            _log_summary(tracker, trainer, result, exp)
    return RunResult(run_id=run_id, metrics=result.history[-1], best_epoch=result.best_epoch,
                     best_score=result.best_score, checkpoints=result.checkpoints,
                     stopped_early=result.stopped_early, resumed_from=resumed_from,
                     url=tracking.run_url(tracker.experiment_id, run_id, uri=tracker.uri)
                     if main else "")


def check_world(exp: Experiment, world: distributed.World, device: torch.device) -> None:
    """What the experiment asks must fit the processes it runs on (before anything happens)."""
    if exp.data.batch_size % world.size:
        raise ConfigError(f"data.batch_size: {exp.data.batch_size} is the global batch and must "
                          f"divide evenly over the {world.size} processes torchrun started "
                          f"(use a multiple of {world.size})")
    if exp.trainer.sync_bn is True and device.type != "cuda":
        raise ConfigError("trainer.sync_bn: true needs CUDA (SyncBatchNorm does not exist on the "
                          "CPU); use model.norm: group for several CPU processes")


# ---------------------------------------------------------------- steps of a run


def _find_resume_point(exp: Experiment, resume: str | None, display, fallback_best: bool
                       ) -> tuple[tracking.Tracker | None, ResumePoint | None]:
    """The store (only if resuming from one that exists: never created here) and the point."""
    if not resume:
        return None, None
    uri = tracking.tracking_uri(exp.tracking.dir, exp.tracking.uri)
    has_store = not tracking.is_local(uri) or (exp.tracking.dir / "mlflow.db").is_file()
    tracker = (tracking.Tracker(root=exp.tracking.dir, experiment=exp.tracking.experiment,
                                uri=exp.tracking.uri) if has_store else None)
    point = resume_point(resume, exp, tracker, fallback_best=fallback_best)
    if point is None:
        display.message("--resume auto: no interrupted run of this experiment and config; "
                        "starting a new one")
    return tracker, point


def build_data(exp: Experiment, display) -> DataSplits:
    """The dataset's splits (generated, indexed and cached on first use)."""
    if exp.data.cache:
        display.message(f"data: decode cache in {exp.data.cache_dir} "
                        f"(the first use decodes every image)")
    ctx = exp.build_context()
    return DATASETS.build(exp.data, ctx, train_transform=build_augmentations(exp.augment, ctx))


def build_components(exp: Experiment, splits: DataSplits, point: ResumePoint | None,
                     device: torch.device) -> Components:
    """Loaders, model, loss, optimizer and schedule; a checkpoint's weights must fit."""
    world = distributed.world()
    ctx = exp.build_context()
    device_augment = None
    if augment_on(exp, device) == "device":
        # the loader delivers cached frames and their augmentations' parameters
        device_augment = device_augmentations(exp.augment, ctx)
        splits.train.device_augment = device_augment
    train_loader, sampler, val_loader = _loaders(splits, exp, world,
                                                 pin_memory=device.type == "cuda")
    samples = splits.val.first(exp.tracking.num_samples)
    loss_params, loss_logged = resolve_loss(exp, splits)
    model = MODELS.build(exp.model, ctx)
    if point is not None:
        checkpoints.check_weights_fit(point.checkpoint, model, point.path)
    sync_bn = exp.trainer.sync_bn
    if sync_bn is True or (sync_bn == "auto" and device.type == "cuda" and world.distributed):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # moves the model to the device; validation and panels use it unwrapped
    predictor = Predictor.for_experiment(exp, model, device=str(device))
    optimizer = OPTIMIZERS.build(exp.optimizer, model)
    steps_per_epoch = math.ceil(sampler.batches / exp.trainer.accumulate)
    schedule = SCHEDULERS.build(exp.scheduler, optimizer, steps_per_epoch=steps_per_epoch,
                                epochs=exp.trainer.epochs, mode=exp.monitor_mode)
    data_tags, frequencies = _data_report(exp, splits)
    return Components(splits, train_loader, sampler, val_loader, samples, device_augment,
                      model, predictor,
                      model, LOSSES.build(loss_params, ctx), loss_logged, optimizer, schedule,
                      data_tags, frequencies)


def augment_on(exp: Experiment, device: torch.device) -> str:
    """Where the training augmentations run: data.augment_on, auto = the device on CUDA when
    every augmentation has a batched form (a GPU outruns per-sample augmentation in a few
    workers), else workers (on the CPU they run beside the step instead of inside it, and
    measured as fast)."""
    if exp.data.augment_on != "auto":
        return exp.data.augment_on
    batched = device_problem(exp.augment) is None
    return "device" if device.type == "cuda" and batched else "workers"


def wrap_for_training(model: torch.nn.Module, exp: Experiment, world: distributed.World,
                      device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel with several processes (a collective: every rank at once), then
    torch.compile if asked."""
    if world.distributed:
        # a frozen encoder gets no gradients for a while: DDP must not wait for them
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=getattr(exp.model, "freeze_encoder_epochs", 0) > 0)
    return torch.compile(model) if exp.trainer.compile else model


def _new_run_tags(exp: Experiment, parts: Components, world: distributed.World,
                  devices: list[str], extra: dict[str, str] | None) -> dict[str, str]:
    return {**run_tags(parts.predictor.device, parts.predictor.amp_dtype), **parts.data_tags,
            "world_size": str(world.size), "backend": world.backend,
            "augment_on": augment_on(exp, parts.predictor.device),
            "inference": exp.trainer.inference.describe(),
            "devices": "; ".join(f"rank {r}: {d}" for r, d in enumerate(devices)),
            "config_hash": config_hash(exp.model_dump(mode="json")),
            **({tracking.NOTE_TAG: exp.description} if exp.description else {}), **(extra or {})}


def _trainer(exp: Experiment, parts: Components, run_id: str,
             tracker: tracking.Tracker | None, display,
             epoch_hook: EpochHook | None = None) -> Trainer:
    """The trainer; on_epoch_end logs to MLflow on rank 0 (tracker None elsewhere)."""
    t = exp.trainer
    settings = TrainerSettings(
        epochs=t.epochs, grad_clip_norm=t.grad_clip_norm, accumulate=t.accumulate,
        boundary_tolerance=t.boundary_tolerance, monitor=exp.monitor, mode=exp.monitor_mode,
        patience=t.patience, min_delta=t.min_delta, tracking_dir=exp.tracking.dir,
        checkpoint_every_s=t.checkpoint_minutes * 60,
        freeze_encoder_epochs=getattr(exp.model, "freeze_encoder_epochs", 0))

    upload = exp.tracking.upload_checkpoints
    upload = tracker is not None and (tracker.remote if upload == "auto" else upload)
    uploaded: dict[str, int] = {}  # checkpoint -> mtime already uploaded

    def on_epoch_end(epoch: int, metrics: dict[str, float], sample_arrays) -> bool:
        tracker.beat()
        tracker.log_metrics(metrics, step=epoch)
        if sample_arrays is not None:
            tracker.log_image(viz.sample_panel(*sample_arrays, task=exp.task),
                              f"samples/epoch_{epoch:03d}.png")
        for which in ("last", "best") if upload else ():  # another machine can go on from here
            path = checkpoints.path_of(exp.tracking.dir, run_id, which)
            if path.is_file() and uploaded.get(which) != path.stat().st_mtime_ns:
                tracker.log_file(path, "checkpoints")
                uploaded[which] = path.stat().st_mtime_ns
        stop_tags = epoch_hook(epoch, metrics) if epoch_hook is not None else None
        if stop_tags:
            tracker.set_tags(stop_tags)
            display.message(f"stopped after epoch {epoch}: "
                            + ", ".join(f"{k}={v}" for k, v in stop_tags.items()))
        return bool(stop_tags)

    return Trainer(predictor=parts.predictor, raw_model=parts.model,
                   train_model=parts.train_model, loss_fn=parts.loss_fn,
                   optimizer=parts.optimizer, schedule=parts.schedule,
                   train_loader=parts.train_loader, sampler=parts.sampler,
                   val_loader=parts.val_loader, settings=settings,
                   config=exp.model_dump(mode="json"), run_id=run_id, samples=parts.samples,
                   on_epoch_end=on_epoch_end if tracker is not None else None,
                   display=display, device_augment=parts.device_augment)


def _log_start(tracker: tracking.Tracker, exp: Experiment, parts: Components, state: TrainState,
               *, resumed: bool, crash: str | None) -> None:
    """A new run: params, config and class frequencies. A resumed one: where it went on, and
    the epochs its checkpoint finished but a crash kept out of MLflow (a kill between saving
    the checkpoint and logging the epoch's metrics)."""
    if resumed:
        tracker.set_tags({"resumed_at": f"epoch {state.epoch}, batch {state.step_in_epoch + 1}",
                          "trainer.epochs_now": str(exp.trainer.epochs),
                          **({"resumed_after_crash": crash} if crash else {})})
        logged = set(tracker.metric_steps(exp.monitor))
        for epoch, metrics in enumerate(state.history, start=1):
            if epoch not in logged:
                tracker.log_metrics(metrics, step=epoch)
        return
    tracker.log_params({**flatten(exp.model_dump(mode="json")), **parts.loss_logged})
    tracker.log_datasets(_datasets(exp, parts.splits))
    tracker.log_text(to_yaml(exp), "config.yaml")
    groups = describe_groups(parts.optimizer)
    tracker.log_params({f"optimizer.group.{name}": f"{g['parameters']} parameters, lr "
                        f"{g['lr']:g}, weight decay {g['weight_decay']:g}"
                        for name, g in groups.items()})
    tracker.log_text(json.dumps(groups, indent=2), "optimizer_groups.json")
    tracker.log_text(json.dumps(parts.class_frequencies, indent=2), "data/class_frequencies.json")


def _upload_checkpoints(tracker: tracking.Tracker, exp: Experiment, run_id: str) -> None:
    """The run's checkpoints as artifacts, so any machine with the store can use them."""
    for path in checkpoints.run_dir(exp.tracking.dir, run_id).glob("*.pt"):
        tracker.log_file(path, "checkpoints")


def _log_summary(tracker: tracking.Tracker, trainer: Trainer, result: FitResult,
                 exp: Experiment) -> None:
    """End of a successful run: learning curves, confusion report, and the best model."""
    tracker.set_tags({"best_epoch": str(result.best_epoch),
                      "stopped_early": str(result.stopped_early).lower()})
    tracker.log_image(viz.learning_curves(result.history, exp.monitor), "learning_curves.png")
    _log_confusion(tracker, trainer.confusion, exp)
    if not exp.tracking.log_model:
        return
    best = checkpoints.load(result.checkpoints["best"])
    with tempfile.TemporaryDirectory(prefix="cityseg-model-") as folder:
        slim = Path(folder) / "checkpoint.pt"  # weights and config: what inference needs
        checkpoints.save_atomic({k: best[k] for k in ("format", "epoch", "metrics", "config",
                                                      "run_id", "state", "model")}, slim)
        height, width = exp.data.image_size
        example = np.random.default_rng(0).integers(0, 256, (1, height, width, 3), np.uint8)
        validation = {k: v for k, v in best["metrics"].items() if k.startswith("val/")}
        tracker.log_model(checkpoint=slim, example=example, metrics=validation,
                          step=best["epoch"], register=exp.tracking.register_model)


def _log_confusion(tracker: tracking.Tracker, counts: torch.Tensor | None,
                   exp: Experiment) -> None:
    """The last epoch's confusion matrix (JSON), and where the task asks for it, its image and
    a per-class IoU table."""
    if counts is None:
        return
    task, matrix = exp.task, counts.cpu().numpy()
    tracker.log_text(json.dumps({"rows": "ground truth", "columns": "prediction",
                                 "classes": list(task.class_names), "counts": matrix.tolist()},
                                indent=2), "confusion_matrix.json")
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


# ---------------------------------------------------------------- pieces


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


def _loaders(splits: DataSplits, exp: Experiment, world: distributed.World, *,
             pin_memory: bool) -> tuple[DataLoader, EpochSampler, DataLoader]:
    """Loaders of this rank's share: batch_size / world images per step, a shard of val."""
    common = {"batch_size": exp.data.batch_size // world.size,
              "num_workers": exp.data.num_workers, "pin_memory": pin_memory,
              "persistent_workers": exp.data.num_workers > 0, "worker_init_fn": _ignore_sigint,
              # the loader's own generator: creating an iterator must not draw from the global
              # RNG (dropout uses it), or a resumed run would differ from an uninterrupted one
              "generator": torch.Generator().manual_seed(exp.seed)}
    sampler = EpochSampler(len(splits.train), seed=exp.seed, shuffle=True,
                           batch_size=exp.data.batch_size, rank=world.rank, world=world.size)
    val = ShardSampler(len(splits.val), rank=world.rank, world=world.size)
    return (DataLoader(splits.train, sampler=sampler, **common), sampler,
            DataLoader(splits.val, sampler=val, **common))


def resolve_loss(exp: Experiment, splits: DataSplits) -> tuple[Params, dict[str, str]]:
    """The loss params with `pos_weight: auto` replaced by the training split's
    background/foreground pixel ratio, and the params to log about it."""
    loss = exp.loss
    if "pos_weight" not in type(loss).model_fields or loss.pos_weight != "auto":
        return loss, {}
    _, ratio = foreground_stats(splits.train_class_counts(), exp.data.foreground)
    if not math.isfinite(ratio):
        raise DataError("loss.pos_weight: auto, but the training split has no foreground pixels "
                        f"({', '.join(exp.data.foreground)}); set a number instead")
    value = round(ratio, 3)
    return loss.model_copy(update={"pos_weight": value}), {"loss.pos_weight_used": str(value)}


def _datasets(exp: Experiment, splits: DataSplits) -> list[tuple[str, dict]]:
    """The training and validation splits as MLflow dataset inputs: (context, description);
    the digest is the split's fingerprint (files, sizes, mtimes, layout, target size)."""
    found = []
    for context, split, dataset in (("training", "train", splits.train),
                                    ("validation", "val", splits.val)):
        fraction, _ = foreground_stats(dataset.reader.class_counts(), exp.data.foreground)
        height, width = exp.data.frame_size
        found.append((context, {
            "name": f"{exp.data.name}-{splits.index.layout}-{exp.data.task}-{split}",
            "digest": splits.fingerprints[split], "source": str(Path(exp.data.root).resolve()),
            "schema": {"image": {"dtype": "uint8", "shape": [height, width, 3]},
                       "mask": {"dtype": "uint8", "shape": [height, width],
                                "classes": list(exp.task.class_names)}},
            "profile": {"images": len(dataset), "image_size": [height, width],
                        "foreground_fraction": round(fraction, 5)}}))
    return found


def _data_report(exp: Experiment, splits: DataSplits) -> tuple[dict[str, str], dict]:
    """Tags describing the data (the splits themselves are the run's dataset inputs), and the
    class frequencies of the training split."""
    counts = splits.train_class_counts()
    labelled = int(counts[: len(TRAIN_CLASSES)].sum())
    fraction, _ = foreground_stats(counts, exp.data.foreground)
    tags = {"data.layout": splits.index.layout, "data.mask_encoding": splits.index.encoding.kind,
            "data.foreground_fraction": f"{fraction:.5f}"}
    frequencies = {"split": "train", "resized_to": list(exp.data.frame_size),
                   "ignored_pixels": int(counts[IGNORE_INDEX]), "labelled_pixels": labelled,
                   "classes": {name: {"pixels": int(counts[i]),
                                      "frequency": int(counts[i]) / max(1, labelled)}
                               for i, name in enumerate(TRAIN_CLASSES)}}
    return tags, frequencies
