"""A sweep worker: takes trials from the study, one at a time, and trains each one's child.

For one trial the worker claims its point (another live trial or child may hold it already),
looks for earlier runs of that point (one FINISHED is reported again, not retrained; an
interrupted one is resumed in its own run), trains or resumes the child with `runner.run`, and
reports the outcome to Optuna: the child's last-epoch metric, pruned, or failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cityseg import checkpoints, tracking
from cityseg.errors import Interrupted
from cityseg.sweep.spec import Plan, SweepPoint
from cityseg.sweep.study import (
    Ledger,
    Study,
    TrialPruned,
    holder,
    ledger,
    pruning_hook,
    requeue,
    suggest,
    take_trial,
)
from cityseg.train import runner
from cityseg.train.resume import restored


class Duplicate(Exception):
    """Another live trial holds this point: this trial ends without training it."""


class ChildFailed(Exception):
    """A child's training failed; the trial FAILs and the sweep goes on."""


class Worker:
    """Trains the trials one `cityseg sweep` process takes from the study, one at a time."""

    def __init__(self, plan: Plan, study: Study, *, tracker: tracking.Tracker, parent_id: str,
                 report: Callable[[str], None], display: Callable[[], Any] | None = None) -> None:
        self.plan, self.study, self.tracker = plan, study, tracker
        self.parent_id, self.report = parent_id, report
        self.display = display  # a new display per child (its bar and epoch rows), or none
        self.failed: list[tuple[str, str]] = []  # (child, error) that failed in this worker
        # points this worker leaves alone: they failed here, or another worker holds them
        self.not_mine: list[dict[str, Any]] = []

    # -------------------------------------------------------------- the loop

    def work(self) -> list[tuple[str, str]]:
        """Take trials until the sweep has nothing left for this worker."""
        search = self.plan.config.search
        while self._has_work():
            take_trial(self.study, self, catch=(ChildFailed, Duplicate))
            if search and len(self.failed) >= search.trials:
                self.report("stopping: every trial of this worker failed")
                break
        return self.failed

    def _has_work(self) -> bool:
        """Whether to take another trial, after queueing the points Optuna will not hand out
        again by itself."""
        trials = ledger(self.study)
        if self.plan.config.grid is not None:
            return self._grid_has_work(trials)
        return self._search_has_work(trials)

    def _grid_has_work(self, trials: Ledger) -> bool:
        """The grid's next free point in the file's order is queued for the next trial
        (GridSampler alone draws them shuffled); a point whose trial failed (an interrupted or
        failed child) is free again."""
        wanted = [self.plan.encoded(p.values) for p in self.plan.points]
        open_ = [p for p in wanted if p not in trials.done and p not in self.not_mine]
        if not open_:
            return False
        free = [p for p in open_ if p not in trials.busy]
        if not free and not trials.waiting:
            self.report(f"{len(open_)} point(s) left, all being trained by other workers")
            return False
        if not trials.waiting:
            requeue(self.study, self.plan, free[0], like=trials.failed_trial(free[0]))
        return True

    def _search_has_work(self, trials: Ledger) -> bool:
        """A search's interrupted children are queued again, not replaced by new samples."""
        waiting, busy = trials.waiting, list(trials.busy)
        for params in self._interrupted_points():
            if params not in trials.done and params not in busy and params not in self.not_mine:
                requeue(self.study, self.plan, params)
                busy.append(params)
                waiting = True
        search = self.plan.config.search
        if trials.finished >= search.trials:
            return False
        if trials.finished + trials.running >= search.trials and not waiting:
            self.report(f"{search.trials - trials.finished} trial(s) left, being trained by "
                        f"other workers")
            return False
        return True

    def _interrupted_points(self) -> list[dict[str, Any]]:
        """The points (as trial params) of this sweep's interrupted children."""
        return [self.plan.encoded(self.plan.values_of(run))
                for run in tracking.sweep_children(self.tracker, self.plan.sweep_id)
                if tracking.interrupted(run)]

    # -------------------------------------------------------------- one trial

    def __call__(self, trial) -> float:
        """The objective: the value of the trial's child, trained unless it was already."""
        values = suggest(trial, self.plan)
        point = self.plan.point(values)
        trial.set_user_attr("child", point.label)
        mine = self.plan.encoded(values)
        self._claim(trial, point, mine)
        earlier = tracking.point_runs(self.tracker, self.plan.sweep_id, point.config_hash)
        finished = next((r for r in earlier if r.info.status == "FINISHED"), None)
        if finished is not None:
            return self._already_finished(trial, point, finished, mine)
        resume = self._resumable(trial, point, earlier, mine)
        return self._train(trial, point, values, resume, mine)

    def _leave(self, mine: dict[str, Any], error: Exception) -> Exception:
        """Never ask for this point again in this worker; the error that ends its trial."""
        self.not_mine.append(mine)
        return error

    def _claim(self, trial, point: SweepPoint, mine: dict[str, Any]) -> None:
        """Duplicate when an earlier live trial holds the same point."""
        owner = holder(self.study, trial)
        if owner is not None:
            trial.set_user_attr("duplicate_of_trial", owner)
            raise self._leave(mine, Duplicate(f"trial {owner} is training {point.label}"))

    def _already_finished(self, trial, point: SweepPoint, run, mine: dict[str, Any]) -> float:
        """The outcome of a FINISHED child of this point, reported again."""
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        self.report(f"{point.label}: already FINISHED ({run.info.run_id}), skipped")
        try:
            return self._outcome(trial, run)
        except ChildFailed as err:  # nothing to train: never ask for it again here
            raise self._leave(mine, err) from None

    def _resumable(self, trial, point: SweepPoint, earlier: list, mine: dict[str, Any]
                   ) -> str | None:
        """The newest earlier child's run id if it was interrupted with a last.pt to resume
        from; Duplicate while it is still training in another (live) process."""
        if not earlier:
            return None
        newest = earlier[0]
        if newest.info.status == "RUNNING" and not tracking.is_stale(newest):
            trial.set_user_attr("duplicate_of_run", newest.info.run_id)
            raise self._leave(mine, Duplicate(f"run {newest.info.run_id} is training "
                                              f"{point.label}"))
        if not tracking.interrupted(newest):
            return None
        run_id = newest.info.run_id
        try:
            tracked = point.experiment.tracking
            found = restored(tracked.dir, run_id, uri=tracked.uri)
        except checkpoints.Unreadable:
            return run_id  # damaged without an intact copy: resuming says so
        return run_id if found is not None else None

    def _train(self, trial, point: SweepPoint, values: dict[str, Any], resume: str | None,
               mine: dict[str, Any]) -> float:
        """Train (or resume) the child under the parent run; its outcome."""
        plan = self.plan
        tags = {"mlflow.parentRunId": self.parent_id, "sweep_id": plan.sweep_id,
                "sweep_role": "child", "sweep_point": point.config_hash,
                "optuna_study": plan.sweep_id, "optuna_trial": str(trial.number),
                **plan.tags(values)}
        self.report(f"{point.label}: " + (f"resuming {resume}" if resume else "training")
                    + f" (trial {trial.number})")
        hook = (pruning_hook(trial, metric=plan.config.metric,
                             epochs=point.experiment.trainer.epochs)
                if plan.config.pruning is not None else None)
        try:
            result = runner.run(point.experiment, run_name=point.label, tags=tags,
                                resume=resume, epoch_hook=hook, params=tuple(plan.keys),
                                display=self.display() if self.display else None)
        except (Interrupted, KeyboardInterrupt):
            raise  # the person wants the whole sweep to stop
        except Exception as err:  # noqa: BLE001  (a failed child is reported, the others go on)
            self.failed.append((point.label, str(err)))
            self.report(f"{point.label}: FAILED: {err}")
            raise self._leave(mine, ChildFailed(str(err))) from err
        trial.set_user_attr("mlflow_run_id", result.run_id)
        value = self._outcome(trial, self.tracker.get_run(result.run_id))
        self.report(f"{point.label}: FINISHED, {plan.config.metric} {value:.4f}")
        return value

    def _outcome(self, trial, run) -> float:
        """The trial's value, the child's last-epoch metric; a pruned child prunes the trial."""
        metric = self.plan.config.metric
        value, tags = run.data.metrics.get(metric), run.data.tags
        if tags.get("pruned") == "true":
            why = (f"{trial.user_attrs.get('child')}: pruned after epoch "
                   f"{tags.get('pruned_at_epoch')} ({metric} {value:.4f})")
            self.report(why)
            raise TrialPruned(why)
        if value is None:
            raise ChildFailed(f"the child logged no {metric}")
        return value
