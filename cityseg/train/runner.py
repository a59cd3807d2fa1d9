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

import torch

from cityseg import tracking
from cityseg.config import Experiment
from cityseg.errors import ConfigError
from cityseg.runtime import distributed
from cityseg.runtime.device import (
    resolve_device,
    seed_everything,
    set_deterministic,
)
from cityseg.train.build import STOP_SIGNALS, build_run
from cityseg.train.display import NullDisplay
from cityseg.train.recorder import EpochHook, NullRecorder, Recorder
from cityseg.train.resume import agreed_resume_point
from cityseg.train.trainer import FitResult, StopFlag, Trainer


@dataclass
class RunResult(FitResult):
    """What one `cityseg run` made: the fit's result, and the MLflow run that holds it."""

    run_id: str = ""
    resumed_from: int = 0  # epochs already done when this call started (0: a fresh run)
    resumed_at: str = ""  # where in training it went on (TrainState.position); "": fresh
    url: str = ""  # the run's page in the MLflow UI (rank 0)

    @property
    def metrics(self) -> dict[str, float]:
        """The last epoch's."""
        return self.history[-1]


def run(exp: Experiment, *, display=None, resume: str | None = None,
        fallback_best: bool = False, run_name: str | None = None,
        tags: dict[str, str] | None = None, epoch_hook: EpochHook | None = None,
        params: tuple[str, ...] = ()) -> RunResult:
    """Train the experiment (or continue it: resume = RUN_ID, checkpoint path or auto) in MLflow.

    fallback_best: resume from best.pt when last.pt is corrupt. run_name defaults to the
    experiment's name; tags are added to the run's, and the config keys in params are logged
    as params beside RUN_PARAMS (sweeps use all three). epoch_hook(epoch,
    metrics), called on rank 0 after each logged epoch, may return tags: the run gets them and
    stops there, FINISHED (a pruned sweep trial). Under torchrun, every process calls this
    (each step below agrees across ranks); rank 0 alone opens the MLflow run, prints and
    writes checkpoints.
    """
    device = distributed.device_for(resolve_device(exp.trainer.device))
    with distributed.joined(device) as world:
        display = display if display is not None and world.is_main else NullDisplay()
        check_world(exp, world, device)
        seed_everything(exp.seed)
        set_deterministic(exp.trainer.deterministic)
        tracker, point = agreed_resume_point(resume, exp, world, fallback_best=fallback_best,
                                             display=display)
        parts = build_run(exp, point, world, device, display)
        recorder = (Recorder(exp, tracker=tracker, display=display, run_name=run_name, tags=tags,
                             epoch_hook=epoch_hook, params=params)
                    if world.is_main else NullRecorder())
        with recorder:  # rank 0: the MLflow run, ended whatever happens once it started
            run_id = recorder.open(point, parts, world=world, device=device)
            trainer = Trainer.for_run(exp, parts, run_id=run_id, recorder=recorder,
                                      display=display)
            state = trainer.initial_state(point)
            resumed_from, resumed_at = state.epoch - 1, state.position if point else ""
            # a signal from here on stops the run at a checkpoint, the start included (params,
            # datasets, the untrained model's samples): the run never stays RUNNING
            with stop_on_signals(trainer.stop):
                recorder.start(state, parts)
                fitted = trainer.fit(state)
                recorder.finish(fitted, trainer.confusion, trainer.stop)
    return RunResult(**vars(fitted), run_id=run_id, resumed_from=resumed_from,
                     resumed_at=resumed_at, url=recorder.url)


def check_world(exp: Experiment, world: distributed.World, device: torch.device) -> None:
    """What the experiment asks must fit the processes it runs on (before anything happens)."""
    if exp.data.batch_size % world.size:
        raise ConfigError(f"data.batch_size: {exp.data.batch_size} is the global batch and must "
                          f"divide evenly over the {world.size} processes torchrun started "
                          f"(use a multiple of {world.size})")
    if exp.trainer.sync_bn is True and device.type != "cuda":
        raise ConfigError("trainer.sync_bn: true needs CUDA (SyncBatchNorm does not exist on the "
                          "CPU); use model.norm: group for several CPU processes")


@contextmanager
def stop_on_signals(flag: StopFlag):
    """SIGINT, SIGTERM and SIGHUP set the flag (the trainer checkpoints and stops) instead of
    killing, and end a wait for a silent tracking server. A server silent past
    tracking.outage_minutes sets it too (as SIGTERM would: a checkpoint at the next step; the
    tracker says why)."""
    def handler(signum, frame):
        flag.signum = signum
        tracking.interrupt_waits(signum)

    def outage_over_limit() -> None:
        flag.signum = signal.SIGTERM

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        with tracking.on_outage_limit(outage_over_limit):
            yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
