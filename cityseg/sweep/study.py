"""The Optuna study: the sweep's shared queue of trials, and the only module that imports optuna.

The study lives in a storage: SQLite next to the local MLflow store by default, PostgreSQL or
MySQL for many machines (RDB storages, with heartbeats), or a journal file on a shared
filesystem. Every `cityseg sweep` process that names the same sweep and storage is one more
worker of the same study. A worker killed outright leaves a RUNNING trial whose heartbeat stops;
once it is stale, Optuna fails it and queues it again (RetryHeartbeatStaleTrialCallback). Points
that Optuna will not hand out again by itself (a grid point whose trial failed, a search's
interrupted child) are queued again here, as WAITING trials taken before anything new.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages import fail_stale_trials as _fail_stale_trials
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, Trial, TrialState, create_trial
from optuna.visualization import matplotlib as optuna_plots

from cityseg import viz
from cityseg.errors import ConfigError
from cityseg.runtime.files import SQLITE, sqlite_path, sqlite_uri
from cityseg.sweep.spec import Plan

TrialPruned = optuna.TrialPruned  # raised by an objective: the trial ends PRUNED
Study = optuna.Study

# what a worker sees when another creates a new database's tables at the same moment
_CREATE_RACE = ("already exists", "UNIQUE constraint", "duplicate key", "IntegrityError")


# ---------------------------------------------------------------- storage and study


def default_storage(plan: Plan) -> str:
    """A SQLite file next to the local MLflow store: one machine's sweeps."""
    return sqlite_uri(plan.base.tracking.dir.resolve() / "optuna.db")


def _connect(plan: Plan, storage: str):
    """A URL (sqlite://, postgresql://, mysql://) is an RDB storage with heartbeats; a plain
    path is Optuna's journal file."""
    if "://" not in storage:
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(storage))
    if storage.startswith(SQLITE):
        sqlite_path(storage).parent.mkdir(parents=True, exist_ok=True)
    heartbeat = plan.config.heartbeat_seconds
    return RDBStorage(
        storage, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
        engine_kwargs=({"connect_args": {"timeout": 60}} if storage.startswith("sqlite")
                       else None))


def _storage(plan: Plan, storage: str):
    """The storage, opened; workers that start together on a new database race to create its
    tables, so that error is retried."""
    attempt = 0
    while True:
        try:
            return _connect(plan, storage)
        except ImportError as err:
            raise ConfigError(f"--storage {storage}: {err}; for PostgreSQL install the cluster "
                              f"extra: pip install 'cityseg[cluster]'") from None
        except Exception as err:  # noqa: BLE001  (SQLAlchemy's errors: a bad URL, a dead server)
            attempt += 1
            if any(m in str(err) for m in _CREATE_RACE) and attempt < 5:
                time.sleep(attempt)
                continue
            raise ConfigError(f"--storage {storage}: cannot open the Optuna storage: "
                              f"{str(err).splitlines()[0]}") from None


def _sampler(plan: Plan) -> optuna.samplers.BaseSampler:
    sweep = plan.config
    if sweep.grid is not None:
        return optuna.samplers.GridSampler({key: plan.choices(key) for key in sweep.grid})
    if sweep.search.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=sweep.search.seed)
    return optuna.samplers.RandomSampler(seed=sweep.search.seed)


def _pruner(plan: Plan) -> optuna.pruners.BasePruner:
    prune = plan.config.pruning
    if prune is None:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=prune.startup_trials,
                                       n_warmup_steps=prune.warmup_epochs)


def open_study(plan: Plan, storage: str) -> Study:
    """Join (or create) the sweep's Optuna study in `storage`."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # cityseg reports the trials itself
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sweep = plan.config
    direction = "maximize" if sweep.mode == "max" else "minimize"
    study = optuna.create_study(study_name=plan.sweep_id, storage=_storage(plan, storage),
                                sampler=_sampler(plan), pruner=_pruner(plan),
                                direction=direction, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ConfigError(f"{plan.path}: mode: {sweep.mode}, but study {plan.sweep_id} in "
                          f"{storage} was created to {study.direction.name.lower()}; rename the "
                          f"sweep to start a new study")
    return study


# ---------------------------------------------------------------- the points of trials


def distributions(plan: Plan) -> dict[str, BaseDistribution]:
    """What each swept key is drawn from: a grid's values and choices are categorical (encoded
    values), ranges are int or float as the plan's kinds say."""
    found: dict[str, BaseDistribution] = {}
    for key in plan.keys:
        spec = plan.config.search.params[key] if plan.config.search else None
        if spec is None or spec.choices is not None:
            found[key] = CategoricalDistribution(plan.choices(key))
        elif plan.kinds[key] == "int":
            found[key] = IntDistribution(int(spec.low), int(spec.high), log=spec.log,
                                         step=int(spec.step or 1))
        else:
            found[key] = FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)
    return found


def suggest(trial: Trial, plan: Plan) -> dict[str, Any]:
    """The swept values of the point this trial trains (decoded)."""
    values = {}
    for key, d in distributions(plan).items():
        if isinstance(d, CategoricalDistribution):
            values[key] = plan.decode(key, trial.suggest_categorical(key, d.choices))
        elif isinstance(d, IntDistribution):
            values[key] = trial.suggest_int(key, d.low, d.high, log=d.log, step=d.step)
        else:
            values[key] = trial.suggest_float(key, d.low, d.high, log=d.log, step=d.step)
    return values


def identity(trial: FrozenTrial) -> dict[str, Any] | None:
    """The point a trial holds, as its params; None in the moment between being asked for and
    suggesting its values (a queued one has them from the start)."""
    if trial.params:
        return dict(trial.params)
    return dict(trial.system_attrs.get("fixed_params", {})) or None


def _point_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def requeue(study: Study, plan: Plan, params: dict[str, Any],
            like: FrozenTrial | None = None) -> None:
    """Queue a point again (WAITING: taken before anything new), as Optuna's
    RetryHeartbeatStaleTrialCallback does; a grid point keeps the grid id of its earlier
    trial `like`, which GridSampler's bookkeeping needs."""
    attrs = {k: v for k, v in (like.system_attrs if like is not None else {}).items()
             if k in ("grid_id", "search_space")}
    study.add_trial(create_trial(state=TrialState.WAITING, params=params,
                                 distributions=distributions(plan),
                                 system_attrs={**attrs, "fixed_params": params}))


# ---------------------------------------------------------------- bookkeeping


def fail_stale_trials(study: Study) -> None:
    """Fail the trials of workers whose heartbeat stopped (they are queued again)."""
    _fail_stale_trials(study)


def _running(study: Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def pending(study: Study) -> int:
    """Trials that live workers are still training (a dead worker's are failed first)."""
    fail_stale_trials(study)
    return len(_running(study))


@dataclass(frozen=True)
class Ledger:
    """Where a study's trials stand, by point (their params)."""

    done: list[dict[str, Any]]  # COMPLETE or PRUNED
    busy: list[dict[str, Any] | None]  # RUNNING or WAITING (None: not yet suggested)
    failed: dict[str, FrozenTrial]  # a point -> one of its FAILed trials
    waiting: bool  # a queued trial is there to take
    running: int

    @property
    def finished(self) -> int:
        """Points done, each counted once."""
        return len({_point_key(p) for p in self.done})

    def failed_trial(self, params: dict[str, Any]) -> FrozenTrial | None:
        return self.failed.get(_point_key(params))


def ledger(study: Study) -> Ledger:
    """The study's trials now, a dead worker's trial failed (and queued again) first."""
    fail_stale_trials(study)
    trials = [(t, identity(t)) for t in study.get_trials(deepcopy=False)]
    return Ledger(
        done=[p for t, p in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)],
        busy=[p for t, p in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)],
        failed={_point_key(p): t for t, p in trials
                if t.state == TrialState.FAIL and p is not None},
        waiting=any(t.state == TrialState.WAITING for t, _ in trials),
        running=sum(t.state == TrialState.RUNNING for t, _ in trials))


def holder(study: Study, trial: Trial) -> int | None:
    """The number of an earlier running trial that holds the same point as this one, if any
    (Optuna's GridSampler may hand one point to two workers once the grid is exhausted)."""
    running = _running(study)
    mine = dict(trial.params)
    grid_id = next((t.system_attrs.get("grid_id") for t in running if t.number == trial.number),
                   None)

    def same_point(other: FrozenTrial) -> bool:
        # a grid trial has its grid id from the moment it is asked for (every worker's
        # GridSampler numbers the grid alike), its params only once it suggests them
        if grid_id is not None and "grid_id" in other.system_attrs:
            return other.system_attrs["grid_id"] == grid_id
        return identity(other) == mine

    return next((t.number for t in running if t.number < trial.number and same_point(t)), None)


def take_trial(study: Study, objective: Callable[[Trial], float], *,
               catch: tuple[type[Exception], ...]) -> None:
    """Run one trial: ask, call the objective, tell; an exception in `catch` FAILs the trial."""
    study.optimize(objective, n_trials=1, catch=catch, gc_after_trial=False)


def pruning_hook(trial: Trial, *, metric: str, epochs: int
                 ) -> Callable[[int, dict[str, float]], dict[str, str] | None]:
    """A child's epoch hook: report the metric, stop the child when Optuna prunes the trial."""

    def hook(epoch: int, metrics: dict[str, float]) -> dict[str, str] | None:
        trial.report(metrics[metric], epoch)
        # after the last epoch there is nothing left to save: the child is complete
        if epoch < epochs and trial.should_prune():
            return {"pruned": "true", "pruned_at_epoch": str(epoch)}
        return None

    return hook


# ---------------------------------------------------------------- plots


def plots(study: Study) -> dict[str, np.ndarray]:
    """Optuna's optimisation history and parameter importances, as images (the importances
    need two finished trials that differ)."""
    matplotlib.use("Agg")  # files only, no display
    images = {}
    for name, draw in (("history", optuna_plots.plot_optimization_history),
                       ("importances", optuna_plots.plot_param_importances)):
        with warnings.catch_warnings(), contextlib.suppress(ValueError, RuntimeError):
            warnings.simplefilter("ignore")
            figure = draw(study).figure
            figure.set_size_inches(7, 4.5)
            images[name] = viz.figure_image(figure)
        plt.close("all")
    return images
