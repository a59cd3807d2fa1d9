"""run(experiment): the path of one training run, top to bottom.

World (the processes torchrun started, or this one), resume point (rank 0 finds the checkpoint
to continue from, every rank loads it), build (data, loaders, model, loss, optimizer: before
the MLflow run opens, so a missing dataset leaves no empty run), record (rank 0's Recorder
opens the MLflow run; other ranks hold a NullRecorder), fit (the Trainer, which calls the
recorder at checkpoints and epoch ends). Leaving the recorder's block ends the run FINISHED;
FAILED if training raised or diverged; KILLED on SIGINT/SIGTERM, after a checkpoint that
`--resume` continues from.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from cityseg import tracking
from cityseg.config import Experiment
from cityseg.engine import distributed
from cityseg.engine.build import Components, build, build_data, wrap_for_training
from cityseg.engine.checkpoints import TrainState
from cityseg.engine.display import NullDisplay
from cityseg.engine.environment import (
    device_name,
    resolve_device,
    seed_everything,
    set_deterministic,
)
from cityseg.engine.recorder import EpochHook, NullRecorder, Recorder
from cityseg.engine.resume import check_same_world, find_resume_point
from cityseg.engine.trainer import StopFlag, Trainer, TrainerSettings
from cityseg.errors import ConfigError


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
    main = world.is_main
    display = display if display is not None and main else NullDisplay()
    try:
        check_world(exp, world, device)
        seed_everything(exp.seed)
        set_deterministic(exp.trainer.deterministic)
        tracker, point = distributed.together(
            lambda: find_resume_point(resume, exp, fallback_best, display) if main
            else (None, None))
        point = distributed.broadcast(point)  # weights, optimizer and RNG states for every rank
        if point is not None:
            check_same_world(point, world.size)
        # local rank 0 first: it generates data and decode caches that the others then reuse
        splits = distributed.together(lambda: build_data(exp, display), local_main_first=True)
        parts = distributed.together(lambda: build(exp, splits, point, device))
        train_model = wrap_for_training(parts.model, exp, world, device)  # every rank at once
        if exp.trainer.compile and not world.distributed:
            parts.predictor.model = train_model  # one compiled module serves both
        devices = distributed.gather(device_name(device))
        recorder = (Recorder(exp, tracker=tracker, display=display, run_name=run_name,
                             tags=tags, epoch_hook=epoch_hook) if main else NullRecorder())
        with recorder:  # rank 0: the MLflow run, ended whatever happens once it started
            run_id = distributed.broadcast(distributed.together(
                lambda: recorder.open(point, parts, devices=devices, world=world)))
            trainer = _trainer(exp, parts, train_model, run_id, recorder, display)
            state = distributed.together(
                lambda: trainer.restore(point.checkpoint) if point is not None else TrainState())
            resumed_from = state.epoch - 1
            # a signal from here on stops the run at a checkpoint, the start included (params,
            # datasets, the untrained model's samples): the run never stays RUNNING
            with stop_on_signals(trainer.stop):
                recorder.start(state, parts)
                fitted = trainer.fit(state)
                recorder.finish(fitted, trainer.confusion, trainer.stop)
    except BaseException:
        distributed.teardown(clean=False)
        raise
    distributed.teardown(clean=True)
    return RunResult(run_id=run_id, metrics=fitted.history[-1], best_epoch=fitted.best_epoch,
                     best_score=fitted.best_score, checkpoints=fitted.checkpoints,
                     stopped_early=fitted.stopped_early, resumed_from=resumed_from,
                     url=recorder.url)


def check_world(exp: Experiment, world: distributed.World, device: torch.device) -> None:
    """What the experiment asks must fit the processes it runs on (before anything happens)."""
    if exp.data.batch_size % world.size:
        raise ConfigError(f"data.batch_size: {exp.data.batch_size} is the global batch and must "
                          f"divide evenly over the {world.size} processes torchrun started "
                          f"(use a multiple of {world.size})")
    if exp.trainer.sync_bn is True and device.type != "cuda":
        raise ConfigError("trainer.sync_bn: true needs CUDA (SyncBatchNorm does not exist on the "
                          "CPU); use model.norm: group for several CPU processes")


def _trainer(exp: Experiment, parts: Components, train_model: torch.nn.Module, run_id: str,
             recorder: NullRecorder, display) -> Trainer:
    """The trainer of this run, its settings read from the experiment."""
    t = exp.trainer
    settings = TrainerSettings(
        epochs=t.epochs, grad_clip_norm=t.grad_clip_norm, accumulate=t.accumulate,
        boundary_tolerance_diagonal=t.boundary_tolerance_diagonal, monitor=exp.monitor,
        mode=exp.monitor_mode,
        patience=t.patience, min_delta=t.min_delta, tracking_dir=exp.tracking.dir,
        checkpoint_every_s=t.checkpoint_minutes * 60,
        freeze_encoder_epochs=exp.model.freeze_encoder_epochs)
    return Trainer(predictor=parts.predictor, raw_model=parts.model, train_model=train_model,
                   loss_fn=parts.loss_fn, optimizer=parts.optimizer, schedule=parts.schedule,
                   train_loader=parts.train_loader, sampler=parts.sampler,
                   val_loader=parts.val_loader, settings=settings,
                   config=exp.model_dump(mode="json"), run_id=run_id, recorder=recorder,
                   display=display, device_augment=parts.device_augment)


@contextmanager
def stop_on_signals(flag: StopFlag):
    """SIGINT and SIGTERM set the flag (the trainer checkpoints and stops) instead of killing,
    and end a wait for a silent tracking server. A server silent past tracking.outage_minutes
    sets it too (as SIGTERM would: a checkpoint at the next step; the tracker says why)."""
    def handler(signum, frame):
        flag.signum = signum
        tracking.interrupt_waits(signum)

    def outage_over_limit() -> None:
        flag.signum = signal.SIGTERM

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tracking.on_outage_limit(outage_over_limit):
            yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
