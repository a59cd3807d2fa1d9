"""Config -> the parts a run trains with: data, loaders, model, predictor, loss, optimizer.

Everything here is built before the MLflow run opens, so a missing dataset or weights that do
not fit a checkpoint fail without leaving an empty run behind. Nothing here logs or prints
beyond the display's one note about the decode cache.
"""

from __future__ import annotations

import functools
import math
import os
import signal
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from cityseg import checkpoints
from cityseg.config import Experiment
from cityseg.data.cityscapes import foreground_stats
from cityseg.data.datasets import DataSplits
from cityseg.data.device_augment import DeviceAugmenter
from cityseg.data.loader import EpochSampler, ShardSampler
from cityseg.data.transforms import build_augmentations, device_augmentations, device_problem
from cityseg.errors import DataError
from cityseg.infer.predictor import Predictor, place_model
from cityseg.registry import DATASETS, LOSSES, MODELS, OPTIMIZERS, SCHEDULERS, Params
from cityseg.runtime import distributed
from cityseg.train.resume import ResumePoint


@dataclass(kw_only=True)
class Components:
    """Everything a run trains with, built before its MLflow run opens."""

    splits: DataSplits
    train_loader: DataLoader
    sampler: EpochSampler
    val_loader: DataLoader
    device_augment: DeviceAugmenter | None  # set when augmentations run on the device
    model: torch.nn.Module  # plain: its state_dict goes into checkpoints
    predictor: Predictor  # validation and panels: never wrapped in DDP
    loss_fn: torch.nn.Module
    loss_logged: dict[str, str]  # the pos_weight that `auto` chose
    optimizer: torch.optim.Optimizer
    schedule: object
    # what trains: the model, maybe DistributedDataParallel and torch.compile'd (build_run)
    train_model: torch.nn.Module | None = None


def build_run(exp: Experiment, point: ResumePoint | None, world: distributed.World,
              device: torch.device, display) -> Components:
    """Every rank at once: the data (local rank 0 first: it generates data and decode caches
    that the others then reuse), the components, and the module that trains."""
    splits = distributed.together(lambda: build_data(exp, display), local_main_first=True)
    parts = distributed.together(lambda: build(exp, splits, point, device))
    parts.train_model = wrap_for_training(parts.model, exp, world, device)  # a collective
    if exp.trainer.compile and not world.distributed:
        parts.predictor.model = parts.train_model  # one compiled module serves both
    return parts


def build_data(exp: Experiment, display) -> DataSplits:
    """The dataset's splits (generated, indexed and cached on first use)."""
    # said once, and only when a split is decoded (a first use takes a while)
    decoding = functools.cache(lambda: display.message(
        f"data: decoding every image once into the cache in {exp.data.cache_dir} (later runs "
        f"read the arrays)"))
    ctx = exp.build_context()
    return DATASETS.build(exp.data, ctx, train_transform=build_augmentations(exp.augment, ctx),
                          before_decoding=decoding)


def build(exp: Experiment, splits: DataSplits, point: ResumePoint | None,
          device: torch.device) -> Components:
    """Loaders, model, loss, optimizer and schedule; a checkpoint's weights must fit."""
    world = distributed.world()
    ctx = exp.build_context()
    device_augment = None
    if augment_on(exp, device) == "device":
        # the loader delivers cached frames and their augmentations' parameters
        device_augment = device_augmentations(exp.augment, ctx)
        splits.train.device_augment = device_augment
    train_loader, sampler, val_loader = loaders(splits, exp, world,
                                                pin_memory=device.type == "cuda")
    loss_params, loss_logged = resolve_loss(exp, splits)
    model = MODELS.build(exp.model, ctx)
    if point is not None:
        checkpoints.check_weights_fit(point.checkpoint, model, point.path)
    sync_bn = exp.trainer.sync_bn
    if sync_bn is True or (sync_bn == "auto" and device.type == "cuda" and world.distributed):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = place_model(model, exp, device)
    predictor = Predictor.for_experiment(exp, model, device=device)
    optimizer = OPTIMIZERS.build(exp.optimizer, model)
    steps_per_epoch = math.ceil(sampler.batches / exp.trainer.accumulate)
    schedule = SCHEDULERS.build(exp.scheduler, optimizer, steps_per_epoch=steps_per_epoch,
                                epochs=exp.trainer.epochs, mode=exp.monitor_mode)
    return Components(splits=splits, train_loader=train_loader, sampler=sampler,
                      val_loader=val_loader, device_augment=device_augment, model=model,
                      predictor=predictor,
                      loss_fn=LOSSES.build(loss_params, ctx), loss_logged=loss_logged,
                      optimizer=optimizer, schedule=schedule)


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
            find_unused_parameters=exp.model.freeze_encoder_epochs > 0)
    return torch.compile(model) if exp.trainer.compile else model


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # what stops a run


def _leave_stops_to_the_main_process(worker_id: int) -> None:
    """Ctrl-C, `timeout`, Slurm's scancel and a closing terminal signal the whole process
    group: a worker leaves it for a group of its own, so the stop is the main process's, which
    checkpoints and stops, instead of the worker dying under it. SIGTERM keeps its default: the
    main process (PyTorch, or Python at exit) ends its workers with it, and a worker ignoring
    it would hang that exit."""
    os.setpgrp()
    for sig in STOP_SIGNALS:
        if sig != signal.SIGTERM:  # sent to the worker alone: still the main process's to act
            signal.signal(sig, signal.SIG_IGN)


def loaders(splits: DataSplits, exp: Experiment, world: distributed.World, *,
            pin_memory: bool) -> tuple[DataLoader, EpochSampler, DataLoader]:
    """Loaders of this rank's share: batch_size / world images per step, a shard of val."""
    workers = exp.data.workers
    common = {"batch_size": exp.data.batch_size // world.size,
              "num_workers": workers, "pin_memory": pin_memory,
              "persistent_workers": workers > 0, "worker_init_fn": _leave_stops_to_the_main_process,
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
