"""The rules of resuming: which checkpoint a run continues from, and when it may not."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from cityseg import checkpoints, tracking
from cityseg.config import (
    RESUMABLE_CHANGES,
    Experiment,
    config_hash,
    legacy_config_hash,
    unresumable_changes,
)
from cityseg.errors import ConfigError
from cityseg.runtime import distributed
from cityseg.tracking import Liveness, Tracker, liveness
from cityseg.train.state import saved_state


@dataclass(frozen=True)
class ResumePoint:
    """A loaded checkpoint that the experiment may continue from."""

    path: Path
    checkpoint: dict
    crash: str | None = None  # why its RUNNING run is taken over (the process crashed)
    note: str | None = None  # what was used instead of a damaged file (to show)

    @property
    def run_id(self) -> str:
        return self.checkpoint["run_id"]


def agreed_resume_point(spec: str | None, exp: Experiment, world: distributed.World, *,
                        fallback_best: bool, display
                        ) -> tuple[Tracker | None, ResumePoint | None]:
    """Every rank at once: rank 0 finds the point to continue from (and the store, opened only
    if it exists), every rank receives it (weights, optimizer and RNG states) and checks it
    fits the world; (None, None) when not resuming (the store: rank 0 only)."""
    tracker, point = distributed.together(
        lambda: find_resume_point(spec, exp, fallback_best, display) if world.is_main
        else (None, None))
    point = distributed.broadcast(point)
    if point is not None:
        check_same_world(point, world.size)
    return tracker, point


def find_resume_point(spec: str | None, exp: Experiment, fallback_best: bool, display
                      ) -> tuple[Tracker | None, ResumePoint | None]:
    """`--resume spec`: the store (opened only if it exists: resuming never creates one) and
    the point to continue from; (None, None) when not resuming."""
    if not spec:
        return None, None
    t = exp.tracking
    try:
        tracker = tracking.open(t.dir, experiment=t.experiment, uri=t.uri, create=False,
                                outage_minutes=t.outage_minutes)
    except tracking.NoStore:
        tracker = None
    point = resume_point(spec, exp, tracker, fallback_best=fallback_best)
    if point is None:
        display.message("--resume auto: no interrupted run of this experiment and config; "
                        "starting a new one")
        return tracker, None
    if point.note:
        display.message(point.note)
    crash = check_run_resumable(point, exp, tracker)
    check_epochs_left(point, exp, finished=tracker.get_run(point.run_id).info.status == "FINISHED")
    display.message(f"resuming run {point.run_id} from {saved_state(point.checkpoint).position} "
                    f"({point.path})")
    return tracker, dataclasses.replace(point, crash=crash)


def store_path(exp: Experiment) -> Path:
    return exp.tracking.dir / "mlflow.db"


def find_checkpoint(spec: str, exp: Experiment, tracker: Tracker | None
                    ) -> checkpoints.Fetched | None:
    """RUN_ID, a checkpoint path or auto -> the checkpoint to resume from, loaded, a run's
    damaged files replaced by their intact artifact copies (None: auto found nothing);
    checkpoints.Unreadable when it is damaged and no intact copy exists."""
    root = exp.tracking.dir
    if Path(spec).is_file():
        return checkpoints.Fetched(Path(spec), checkpoints.load(Path(spec)))
    if tracker is None:  # no store yet
        if spec == "auto":
            return None
        raise ConfigError(f"--resume {spec}: no MLflow store at {store_path(exp)}")
    spec = tracking.full_run_id(tracker.store, spec)  # an id's start, as tables print them
    if spec == "auto":
        run_id = tracking.resumable_run(tracker, config_hash(exp), legacy_config_hash(exp))
        found = restored(root, run_id, uri=tracker.uri) if run_id else None
        if run_id and found is None:  # crashed before its first checkpoint: nothing to resume
            tracker.mark_crashed(run_id)
        return found
    if tracker.run_exists(spec):  # whether it is alive is checked with its checkpoint
        found = restored(root, spec, uri=tracker.uri)
        if found is None:
            refuse_if_alive(tracker, spec)  # a live run may not have checkpointed yet
            raise ConfigError(f"--resume {spec}: the run has no checkpoint, neither at "
                              f"{checkpoints.path_of(root, spec, 'last')} nor among its artifacts")
        return found
    raise ConfigError(f"--resume {spec}: neither a checkpoint file nor a run of MLflow experiment "
                      f"'{exp.tracking.experiment}' in {store_path(exp)}")


def restored(root: Path, run_id: str, *, uri: str | None) -> checkpoints.Fetched | None:
    """`checkpoints.restore` of a run, its artifact copies looked up in the store at `uri` (the
    experiment's tracking.uri)."""
    return checkpoints.restore(root, run_id, copies=tracking.run_artifacts(root, run_id, uri=uri))


def resume_point(spec: str, exp: Experiment, tracker: Tracker | None, *,
                 fallback_best: bool = False) -> ResumePoint | None:
    """The checkpoint `--resume spec` continues from, checked against the experiment; None when
    `auto` finds no interrupted run. A damaged last.pt without an intact copy in the run's
    artifacts is refused, naming it and the run's best.pt (advised only if it loads), unless
    the person asked to fall back to best.pt."""
    try:
        found = find_checkpoint(spec, exp, tracker)
    except checkpoints.Unreadable as err:
        found = best_instead(err, fallback_best=fallback_best)
    if found is None:
        return None
    check_same_experiment(found.checkpoint, exp, found.path)
    return ResumePoint(found.path, found.checkpoint, note=found.note)


def best_instead(err: checkpoints.Unreadable, *, fallback_best: bool) -> checkpoints.Fetched:
    """--fallback-best: the best.pt beside an unusable last.pt, when it loads; else a
    ConfigError that advises it only if it does."""
    best = err.path.with_name("best.pt")
    if best == err.path:  # --resume named best.pt itself
        raise ConfigError(f"{err}\n  train afresh without --resume") from None
    try:
        checkpoint = checkpoints.load(best)
    except checkpoints.Unreadable as other:
        there = f"cannot be used either ({other.reason})"
    else:
        if fallback_best:
            return checkpoints.Fetched(best, checkpoint, note=(
                f"{err}\n  resuming from {best} (--fallback-best): the epochs after its own "
                f"are trained again"))
        there = ("loads: resume from it with --fallback-best (the epochs after its own are "
                 "trained again)")
    raise ConfigError(f"{err}\n  the run's best checkpoint {best} {there}; or train afresh "
                      f"without --resume") from None


def check_run_resumable(point: ResumePoint, exp: Experiment, tracker: Tracker | None
                        ) -> str | None:
    """A checkpoint continues its own run, which must be in this store and not alive in
    another process (two writers would corrupt it). Returns why a RUNNING run is taken over
    (its process crashed), or None."""
    if tracker is None or not tracker.run_exists(point.run_id):
        raise ConfigError(f"{point.path}: its run {point.run_id} is not in {store_path(exp)}; "
                          f"resume with the tracking.dir it was trained with")
    state = refuse_if_alive(tracker, point.run_id)
    return state.reason if state is not None else None


def refuse_if_alive(tracker: Tracker, run_id: str) -> Liveness | None:
    """ConfigError when the run is RUNNING in a live process; else its liveness (None: ended)."""
    state = liveness(tracker.get_run(run_id))
    if state is not None and state.alive:
        raise ConfigError(f"run {run_id} is RUNNING and alive ({state.reason}); two commands "
                          f"must not write into one run. Stop that process first (it "
                          f"checkpoints on Ctrl-C or SIGTERM), then resume")
    return state


def check_same_world(point: ResumePoint, world_size: int) -> None:
    """A checkpoint from the middle of an epoch resumes only with the processes that wrote it
    (their ranks hold its position); one from an epoch's end resumes with any number."""
    state = saved_state(point.checkpoint)
    saved = state.world_size
    if state.step_in_epoch and saved != world_size:
        raise ConfigError(
            f"{point.path}: stopped mid-epoch, at {state.position}, with {saved} "
            f"process(es); resume it with {saved}, not "
            f"{world_size} (torchrun --nproc-per-node). A checkpoint from an epoch's end "
            f"resumes with any number")


def check_same_experiment(checkpoint: dict, exp: Experiment, path: Path) -> None:
    """Refuse to resume when anything but the epoch count differs from the checkpoint's config."""
    changed = unresumable_changes(checkpoint["config"], exp)
    if changed:
        lines = "\n  ".join(f"{k}: {was} in the checkpoint, {now} now"
                            for k, (was, now) in list(changed.items())[:12])
        raise ConfigError(f"{path}: cannot resume, the experiment differs from the checkpoint's "
                          f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change):\n  {lines}")


def check_epochs_left(point: ResumePoint, exp: Experiment, *, finished: bool) -> None:
    """A checkpoint continues training while epochs are left; one whose training is over (every
    epoch done, or stopped early) resumes only to finish the run's end (uploads, reports, the
    model), which a FINISHED run already has."""
    state = saved_state(point.checkpoint)
    epoch, step, path = state.epoch, state.step_in_epoch, point.path
    over = state.stopped_early or (epoch == exp.trainer.epochs + 1 and step == 0)
    if over and not finished:
        return
    if state.stopped_early:
        raise ConfigError(f"{path}: the run stopped early after epoch {epoch - 1} and FINISHED; "
                          f"there is nothing to resume (train afresh without --resume)")
    if epoch > exp.trainer.epochs:
        done = f"already trained {epoch - 1} epochs"
        if step:
            done += f" and {step} batches of epoch {epoch}"
        raise ConfigError(f"{path}: {done}; set trainer.epochs to at least {epoch} to continue "
                          f"(--set trainer.epochs=N)")
