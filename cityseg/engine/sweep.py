"""Sweeps: Optuna chooses the points, MLflow records them.

A sweep file names a base experiment, fixed `set` overrides, the metric to rank by, and either a
`grid:` (dotted key -> values, run through Optuna's GridSampler) or a `search:` (dotted key ->
range or choices, a sampler and a number of trials). Everything is validated before anything
runs.

The Optuna study (in `--storage`: SQLite next to the local MLflow store by default, PostgreSQL or
MySQL for many machines, a journal file on a shared filesystem) is the shared queue: every
`cityseg sweep` process that names the same sweep and storage is one more worker of the same
study, on this machine (`--jobs N`) or any other. Each trial trains one child MLflow run under
the sweep's one parent run. A point is identified by its experiment's config hash, so a point
already FINISHED is never trained again (Optuna's GridSampler may hand one point to two
workers), and an interrupted or crashed child is resumed in its own run. A worker killed outright
leaves a RUNNING trial whose Optuna heartbeat stops; once it is stale, Optuna fails it and queues
it again (RetryHeartbeatStaleTrialCallback), and the worker that takes it resumes the child.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cityseg import tracking
from cityseg.config import Experiment, load_experiment, read_yaml, to_yaml
from cityseg.engine import checkpoints
from cityseg.engine.resume import config_hash
from cityseg.errors import CitysegError, ConfigError, Interrupted
from cityseg.tracking import NOTE_TAG

# ---------------------------------------------------------------- the sweep file


class Range(BaseModel):
    """One searched parameter: a range (float or int, linear or log) or a list of choices."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float | None = Field(None, description="smallest value")
    high: float | None = Field(None, description="largest value")
    log: bool = Field(False, description="sample on a log scale (low > 0)")
    step: float | None = Field(None, gt=0, description="only multiples of step above low")
    type: Literal["float", "int"] | None = Field(
        None, description="default: the type of the base experiment's value at this key")
    choices: list[Any] | None = Field(None, description="values to choose from (instead of a "
                                                        "range)")

    @model_validator(mode="after")
    def _check(self) -> Range:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step:
                raise ValueError("give either choices or a range (low, high), not both")
            if not self.choices:
                raise ValueError("choices is empty: give at least one value")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (a range) or choices")
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) is greater than high ({self.high:g})")
        if self.low == self.high:
            raise ValueError(f"empty range: low and high are both {self.low:g}; put a fixed "
                             f"value under set: instead")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (low is {self.low:g})")
        if self.log and self.step:
            raise ValueError("step and log: true cannot be combined")
        return self


class Search(BaseModel):
    """A search: Optuna samples `trials` points from `params`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    params: dict[str, Range] = Field(min_length=1, description="dotted key -> range or choices")
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna's TPE (learns from the "
                                                                 "finished trials) or random")
    trials: int = Field(ge=1, description="trials that finish (pruned ones count), over every "
                                          "worker")
    seed: int | None = Field(None, description="the sampler's seed (default: random; workers "
                                               "with one seed would propose the same points)")


class Prune(BaseModel):
    """Stop hopeless children early: Optuna's median rule on the monitored metric."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pruner: Literal["median", "none"] = Field("median", description="median: stop a child whose "
                                              "metric is worse than the median of the finished "
                                              "children at the same epoch")
    startup_trials: int = Field(5, ge=0, description="finished children before any is pruned")
    warmup_epochs: int = Field(0, ge=0, description="epochs every child trains before it can "
                                                    "be pruned")


class SweepConfig(BaseModel):
    """A sweep file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[\w.-]+$", description="sweep name: the parent run's name")
    description: str | None = Field(None, description="what the sweep asks; the parent run's "
                                                      "description")
    base: str = Field(description="experiment file the children start from, relative to the "
                                  "sweep file")
    grid: dict[str, list[Any]] | None = Field(
        None, min_length=1, description="dotted key -> values; one child per combination")
    search: Search | None = Field(None, description="ranges or choices that Optuna samples")
    set: dict[str, Any] = Field({}, description="dotted key -> value applied to every child")
    metric: str = Field("val/dice", description="metric the children are ranked by")
    mode: Literal["max", "min"] = Field("max",
                                        description="whether a higher or lower metric is better")
    prune: Literal["median", "none"] | Prune = Field(
        "none", description="median (or a block with its settings) stops hopeless children")
    heartbeat_seconds: int = Field(
        180, ge=1, description="Optuna heartbeat of a running trial (RDB storages); a trial "
                               "silent for twice as long is failed and queued again. Keep "
                               "twice it above 300 s, when a child's run on another host counts "
                               "as crashed")

    @model_validator(mode="after")
    def _one_kind(self) -> SweepConfig:
        if (self.grid is None) == (self.search is None):
            raise ValueError("give either grid: or search:")
        return self

    @property
    def pruning(self) -> Prune | None:
        prune = Prune(pruner=self.prune) if isinstance(self.prune, str) else self.prune
        return None if prune.pruner == "none" else prune


@dataclass(frozen=True)
class SweepPoint:
    values: dict[str, Any]  # swept key -> value
    label: str  # the child's run name, e.g. pos_weight=4
    experiment: Experiment
    config_hash: str


def _override(key: str, value: Any) -> str:
    return f"{key}={_yaml(value)}"


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def label_of(values: dict[str, Any]) -> str:
    return ",".join(f"{key.rsplit('.', 1)[-1]}={_shown(value)}" for key, value in values.items())


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


@dataclass
class Plan:
    """A validated sweep: its file, config, base experiment, identity and (grid) points."""

    path: Path
    config: SweepConfig
    base: Experiment  # the base experiment with `set` applied
    sweep_id: str
    points: list[SweepPoint]  # a grid's every point; empty for a search
    kinds: dict[str, str] = field(default_factory=dict)  # searched key -> float | int | choice
    # Optuna's categorical values must be scalars: a list (e.g. an image size) goes as its YAML
    _encoded: dict[str, dict[Any, Any]] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return list(self.config.grid or self.config.search.params)

    def point(self, values: dict[str, Any]) -> SweepPoint:
        """The child for these swept values (validated)."""
        for point in self.points:
            if point.values == values:
                return point
        return _make_point(self.path, self.config, values)

    def encode(self, key: str, value: Any) -> Any:
        return value if _scalar(value) else _yaml(value)

    def decode(self, key: str, value: Any) -> Any:
        return self._encoded.get(key, {}).get(value, value)

    def choices(self, key: str) -> list[Any]:
        values = (self.config.grid[key] if self.config.grid is not None
                  else self.config.search.params[key].choices)
        return [self.encode(key, v) for v in values]

    def grid_space(self) -> dict[str, list[Any]]:
        """The grid as Optuna's GridSampler takes it: encoded values."""
        return {key: self.choices(key) for key in self.config.grid}

    def distribution(self, key: str):
        """The Optuna distribution a swept key is drawn from (a grid's values: categorical)."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        spec = self.config.search.params[key] if self.config.search else None
        if spec is None or spec.choices is not None:
            return CategoricalDistribution(self.choices(key))
        if self.kinds[key] == "int":
            return IntDistribution(int(spec.low), int(spec.high), log=spec.log,
                                   step=int(spec.step or 1))
        return FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)

    def requeue(self, study, params: dict[str, Any], like=None) -> None:
        """Queue a point again (WAITING: taken before anything new), as Optuna's
        RetryHeartbeatStaleTrialCallback does; a grid point keeps the grid id of its earlier
        trial `like`, which GridSampler's bookkeeping needs."""
        import optuna

        attrs = {k: v for k, v in (like.system_attrs if like is not None else {}).items()
                 if k in ("grid_id", "search_space")}
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params=params,
            distributions={key: self.distribution(key) for key in self.keys},
            system_attrs={**attrs, "fixed_params": params}))


def _make_point(path: Path, sweep: SweepConfig, values: dict[str, Any]) -> SweepPoint:
    overrides = [*(_override(k, v) for k, v in sweep.set.items()),
                 *(_override(k, v) for k, v in values.items())]
    exp = load_experiment(path.parent / sweep.base, overrides)
    identity = config_hash(exp.model_dump(mode="json"), resumable=False)
    return SweepPoint(values, label_of(values), exp, identity)


def _validation_error(path: Path, err: ValidationError) -> ConfigError:
    lines = [f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in err.errors()]
    return ConfigError(f"{path}: {len(lines)} error(s)\n  " + "\n  ".join(lines))


def _value_at(exp: Experiment, key: str) -> Any:
    node: Any = exp
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def load_sweep(path: str | Path) -> Plan:
    """Read and validate the sweep file, every grid point and every searched range's ends;
    ConfigError naming the field on any problem."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise _validation_error(path, err) from None
    swept = sweep.grid or sweep.search.params
    for key in (*swept, *sweep.set):
        if key in ("tracking.dir", "tracking.experiment", "tracking.uri"):
            raise ConfigError(f"{path}: {key}: a sweep's children share the base experiment's "
                              f"MLflow store and experiment; set it in the base experiment")
    for key, values in (sweep.grid or {}).items():
        if not values:
            raise ConfigError(f"{path}: grid.{key}: give at least one value")
    try:
        base = _make_point(path, sweep, {}).experiment
    except ConfigError as err:
        raise ConfigError(f"{path}: set: {err}") from None
    allowed = base.task.monitors
    if sweep.metric not in allowed:
        raise ConfigError(f"{path}: metric: {sweep.metric} is not logged by these runs; use one of "
                          f"{', '.join(m for m in allowed if not m.startswith('val/iou/'))}")
    points: list[SweepPoint] = []
    kinds: dict[str, str] = {}
    if sweep.grid is not None:
        for combo in itertools.product(*sweep.grid.values()):
            values = dict(zip(sweep.grid, combo, strict=True))
            try:
                points.append(_make_point(path, sweep, values))
            except ConfigError as err:
                raise ConfigError(f"{path}: grid point {label_of(values)}: {err}") from None
        hashes = json.dumps(sorted(p.config_hash for p in points))
    else:
        for key, spec in sweep.search.params.items():
            kinds[key] = _check_range(path, sweep, base, key, spec)
        identity = {"base": config_hash(base.model_dump(mode="json"), resumable=False),
                    "search": {k: v.model_dump(mode="json") for k, v in swept.items()},
                    "metric": sweep.metric, "mode": sweep.mode}
        hashes = json.dumps(identity, sort_keys=True)
    sid = f"{sweep.name}-{hashlib.sha256(hashes.encode()).hexdigest()[:8]}"
    plan = Plan(path, sweep, base, sid, points, kinds)
    for key in swept:
        values = sweep.grid[key] if sweep.grid is not None else (swept[key].choices or [])
        plan._encoded[key] = {plan.encode(key, v): v for v in values if not _scalar(v)}
    return plan


def _check_range(path: Path, sweep: SweepConfig, base: Experiment, key: str, spec: Range) -> str:
    """The kind of a searched parameter (float, int, choice); both ends (or every choice) must
    make a valid experiment."""
    field_name = f"search.params.{key}"
    if spec.choices is not None:
        kind, ends = "choice", spec.choices
    else:
        current = _value_at(base, key)
        kind = spec.type or ("int" if isinstance(current, int) and not isinstance(current, bool)
                             else "float")
        if kind == "int" and not all(float(v).is_integer() for v in (spec.low, spec.high,
                                                                     spec.step or 1)):
            raise ConfigError(f"{path}: {field_name}: {key} takes whole numbers; low, high and "
                              f"step must be integers (or set type: float)")
        cast = int if kind == "int" else float
        ends = [cast(spec.low), cast(spec.high)]
    for value in ends:
        try:
            _make_point(path, sweep, {key: value})
        except ConfigError as err:
            raise ConfigError(f"{path}: {field_name}: {key}={_shown(value)} is not a valid "
                              f"experiment: {err}") from None
    return kind


# ---------------------------------------------------------------- the study


def default_storage(plan: Plan) -> str:
    """A SQLite file next to the local MLflow store: one machine's sweeps."""
    root = plan.base.tracking.dir.resolve()
    return f"sqlite:///{root}/optuna.db"


# what a worker sees when another creates a new database's tables at the same moment
_CREATE_RACE = ("already exists", "UNIQUE constraint", "duplicate key", "IntegrityError")


def open_study(plan: Plan, storage: str):
    """Join (or create) the sweep's Optuna study. A URL (sqlite://, postgresql://, mysql://)
    is an RDB storage with heartbeats; a plain path is Optuna's journal file."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # cityseg reports the trials itself
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sweep = plan.config

    def connect():
        if "://" not in storage:
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            Path(storage).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(storage))
        if storage.startswith("sqlite:///"):
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return RDBStorage(
            storage, heartbeat_interval=sweep.heartbeat_seconds,
            grace_period=2 * sweep.heartbeat_seconds,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
            engine_kwargs=({"connect_args": {"timeout": 60}}
                           if storage.startswith("sqlite") else None))

    for attempt in range(5):
        try:
            store = connect()
            break
        except ImportError as err:
            raise ConfigError(f"--storage {storage}: {err}; for PostgreSQL install the cluster "
                              f"extra: pip install 'cityseg[cluster]'") from None
        except Exception as err:  # noqa: BLE001  (SQLAlchemy's errors: a bad URL, a dead server)
            # workers that start together on a new database race to create its tables
            if any(m in str(err) for m in _CREATE_RACE) and attempt < 4:
                time.sleep(1 + attempt)
                continue
            raise ConfigError(f"--storage {storage}: cannot open the Optuna storage: "
                              f"{str(err).splitlines()[0]}") from None
    if sweep.grid is not None:
        sampler = optuna.samplers.GridSampler(
            {key: plan.choices(key) for key in sweep.grid})
    elif sweep.search.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=sweep.search.seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=sweep.search.seed)
    prune = sweep.pruning
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=prune.startup_trials,
                                          n_warmup_steps=prune.warmup_epochs)
              if prune else optuna.pruners.NopPruner())
    direction = "maximize" if sweep.mode == "max" else "minimize"
    study = optuna.create_study(study_name=plan.sweep_id, storage=store, sampler=sampler,
                                pruner=pruner, direction=direction, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ConfigError(f"{plan.path}: mode: {sweep.mode}, but study {plan.sweep_id} in "
                          f"{storage} was created to {study.direction.name.lower()}; rename the "
                          f"sweep to start a new study")
    return study


class Duplicate(Exception):
    """Another live trial holds this point: this trial ends without training it."""


class ChildFailed(Exception):
    """A child's training failed; the trial FAILs and the sweep goes on."""


def _identity(plan: Plan, trial) -> dict[str, Any] | None:
    """The point a trial holds, as Optuna params; None in the moment between being asked for
    and suggesting its values (a queued one has them from the start)."""
    if trial.params:
        return dict(trial.params)
    return dict(trial.system_attrs.get("fixed_params", {})) or None


class Worker:
    """Trains the trials one `cityseg sweep` process takes from the study, one at a time."""

    def __init__(self, plan: Plan, study, *, parent_id: str, report) -> None:
        self.plan, self.study, self.parent_id, self.report = plan, study, parent_id, report
        base = plan.base
        self.tracker = tracking.Tracker(root=base.tracking.dir, experiment=base.tracking.experiment,
                                        uri=base.tracking.uri)
        self.failed: list[tuple[str, str]] = []  # (child, error) that failed in this worker
        # points this worker leaves alone: they failed here, or another worker holds them
        self.not_mine: list[dict[str, Any]] = []

    # -------------------------------------------------------------- the loop

    def work(self) -> list[tuple[str, str]]:
        """Take trials until the sweep has nothing left for this worker."""
        while self._enqueue_missing():
            self.study.optimize(self, n_trials=1, catch=(ChildFailed, Duplicate),
                                gc_after_trial=False)
            if self.plan.config.search and len(self.failed) >= self.plan.config.search.trials:
                self.report("stopping: every trial of this worker failed")
                break
        return self.failed

    def _enqueue_missing(self) -> bool:
        """Whether to take another trial. Queues the points Optuna will not hand out again by
        itself: a grid's points whose trial failed (an interrupted or failed child) and a
        search's interrupted children."""
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        fail_stale_trials(self.study)  # a dead worker's trial: failed, and queued again
        trials = self.study.get_trials(deepcopy=False)
        ident = [(t, _identity(self.plan, t)) for t in trials]
        done = [p for t, p in ident if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        busy = [p for t, p in ident if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if self.plan.config.grid is not None:
            wanted = [{k: self.plan.encode(k, v) for k, v in p.values.items()}
                      for p in self.plan.points]
            open_ = [p for p in wanted if p not in done and p not in self.not_mine]
            if not open_:
                return False
            free = [p for p in open_ if p not in busy]
            if not free and not waiting:
                self.report(f"{len(open_)} point(s) left, all being trained by other workers")
                return False
            tried = {json.dumps(p, sort_keys=True): t for t, p in ident
                     if t.state == TrialState.FAIL and p is not None}
            for params in free:  # GridSampler hands out only points without a finished trial
                failed = tried.get(json.dumps(params, sort_keys=True))
                if failed is not None:
                    self.plan.requeue(self.study, params, like=failed)
            return True
        search = self.plan.config.search
        for params in self._interrupted_children():
            if params not in done and params not in busy and params not in self.not_mine:
                self.plan.requeue(self.study, params)
                busy.append(params)
                waiting = True
        running = sum(t.state == TrialState.RUNNING for t in trials)
        finished = len({json.dumps(p, sort_keys=True) for p in done})  # a point counts once
        if finished >= search.trials:
            return False
        if finished + running >= search.trials and not waiting:
            self.report(f"{search.trials - finished} trial(s) left, being trained by other "
                        f"workers")
            return False
        return True

    def _interrupted_children(self) -> list[dict[str, Any]]:
        params = []
        for run in self.tracker.find_runs(f"tags.sweep_id = '{self.plan.sweep_id}' and "
                                          f"tags.sweep_role = 'child'"):
            if tracking.interrupted(run):
                values = child_values(self.plan, run)
                params.append({k: self.plan.encode(k, v) for k, v in values.items()})
        return params

    # -------------------------------------------------------------- one trial

    def _suggest(self, trial) -> dict[str, Any]:
        from optuna.distributions import CategoricalDistribution, IntDistribution

        values = {}
        for key in self.plan.keys:
            d = self.plan.distribution(key)
            if isinstance(d, CategoricalDistribution):
                values[key] = self.plan.decode(key, trial.suggest_categorical(key, d.choices))
            elif isinstance(d, IntDistribution):
                values[key] = trial.suggest_int(key, d.low, d.high, log=d.log, step=d.step)
            else:
                values[key] = trial.suggest_float(key, d.low, d.high, log=d.log, step=d.step)
        return values

    def __call__(self, trial) -> float:
        from optuna.trial import TrialState

        from cityseg.engine import runner

        plan, tracker = self.plan, self.tracker
        values = self._suggest(trial)
        point = plan.point(values)
        trial.set_user_attr("child", point.label)
        mine = dict(trial.params)
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        grid_id = next((t.system_attrs.get("grid_id") for t in running
                        if t.number == trial.number), None)

        def same_point(other) -> bool:
            # a grid trial has its grid id from the moment it is asked for (every worker's
            # GridSampler numbers the grid alike), its params only once it suggests them
            if grid_id is not None and "grid_id" in other.system_attrs:
                return other.system_attrs["grid_id"] == grid_id
            return _identity(plan, other) == mine

        owners = [t.number for t in running if t.number < trial.number and same_point(t)]
        if owners:
            trial.set_user_attr("duplicate_of_trial", owners[0])
            self.not_mine.append(mine)
            raise Duplicate(f"trial {owners[0]} is training {point.label}")
        earlier = tracker.find_runs(f"tags.sweep_id = '{plan.sweep_id}' and "
                                    f"tags.sweep_point = '{point.config_hash}'")
        finished = [r for r in earlier if r.info.status == "FINISHED"]
        if finished:
            run = finished[0]
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            self.report(f"{point.label}: already FINISHED ({run.info.run_id}), skipped")
            try:
                return self._outcome(trial, run.data.metrics, run.data.tags)
            except ChildFailed:
                self.not_mine.append(mine)  # nothing to train: never ask for it again here
                raise
        resume = None
        if earlier and earlier[0].info.status == "RUNNING" and not tracking.is_stale(earlier[0]):
            trial.set_user_attr("duplicate_of_run", earlier[0].info.run_id)
            self.not_mine.append(mine)
            raise Duplicate(f"run {earlier[0].info.run_id} is training {point.label}")
        if earlier and tracking.interrupted(earlier[0]):
            run_id = earlier[0].info.run_id
            if checkpoints.last_in_place(point.experiment.tracking.dir, run_id) is not None:
                resume = run_id
        tags = {"mlflow.parentRunId": self.parent_id, "sweep_id": plan.sweep_id,
                "sweep_role": "child", "sweep_point": point.config_hash,
                "optuna_study": plan.sweep_id, "optuna_trial": str(trial.number),
                **{f"sweep.{k}": _yaml(v) for k, v in values.items()}}
        self.report(f"{point.label}: " + (f"resuming {resume}" if resume else "training")
                    + f" (trial {trial.number})")
        try:
            hook = self._pruning(trial, point.experiment.trainer.epochs)
            result = runner.run(point.experiment, run_name=point.label, tags=tags,
                                resume=resume, epoch_hook=hook)
        except (Interrupted, KeyboardInterrupt):
            raise  # the person wants the whole sweep to stop
        except Exception as err:  # noqa: BLE001  (a failed child is reported, the others go on)
            self.failed.append((point.label, str(err)))
            self.not_mine.append(mine)
            self.report(f"{point.label}: FAILED: {err}")
            raise ChildFailed(str(err)) from err
        trial.set_user_attr("mlflow_run_id", result.run_id)
        run = tracker.get_run(result.run_id)
        value = self._outcome(trial, run.data.metrics, run.data.tags)
        self.report(f"{point.label}: FINISHED, {plan.config.metric} {value:.4f}")
        return value

    def _outcome(self, trial, metrics: dict[str, float], tags: dict[str, str]) -> float:
        """The trial's value, the child's last-epoch metric; a pruned child prunes the trial."""
        import optuna

        value = metrics.get(self.plan.config.metric)
        if tags.get("pruned") == "true":
            why = (f"{trial.user_attrs.get('child')}: pruned after epoch "
                   f"{tags.get('pruned_at_epoch')} ({self.plan.config.metric} {value:.4f})")
            self.report(why)
            raise optuna.TrialPruned(why)
        if value is None:
            raise ChildFailed(f"the child logged no {self.plan.config.metric}")
        return value

    def _pruning(self, trial, epochs: int):
        """The child's epoch hook: report the metric, stop the child when Optuna prunes it."""
        if self.plan.config.pruning is None:
            return None
        metric = self.plan.config.metric

        def hook(epoch: int, metrics: dict[str, float]) -> dict[str, str] | None:
            trial.report(metrics[metric], epoch)
            # after the last epoch there is nothing left to save: the child is complete
            if epoch < epochs and trial.should_prune():
                return {"pruned": "true", "pruned_at_epoch": str(epoch)}
            return None

        return hook


def child_values(plan: Plan, run) -> dict[str, Any]:
    """A child's swept values, from its sweep.<key> tags."""
    return {key: yaml.safe_load(run.data.tags[f"sweep.{key}"]) for key in plan.keys
            if f"sweep.{key}" in run.data.tags}


def _work(path: str, storage: str, parent_id: str, threads: int, number: int
          ) -> list[tuple[str, str]]:
    """One of `--jobs N` workers, in its own process: the same as a worker on another machine."""
    import torch

    torch.set_num_threads(threads)
    plan = load_sweep(path)
    return Worker(plan, open_study(plan, storage), parent_id=parent_id,
                  report=lambda line: print(f"  [worker {number}] {line}", flush=True)).work()


# ---------------------------------------------------------------- the parent run


def parent_run(tracker: tracking.Tracker, plan: Plan, tags: dict[str, str]) -> tuple[str, bool]:
    """The sweep's one parent run, and whether this call created it. Workers that start at once
    may each create one: all keep the oldest, and the others delete theirs."""
    query = f"tags.sweep_id = '{plan.sweep_id}' and tags.sweep_role = 'parent'"

    def oldest() -> str | None:
        found = tracker.find_runs(query)
        return min(found, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id \
            if found else None

    existing = oldest()
    if existing:
        return existing, False
    created = tracker.client.create_run(tracker.experiment_id, run_name=plan.config.name,
                                        tags=tracking.resolve_tags(tags)).info.run_id
    kept = oldest()
    if kept != created:
        tracker.client.delete_run(created)
    return kept, kept == created


def sweep_yaml(plan: Plan) -> str:
    """The sweep and its base experiment resolved, for the parent's artifacts."""
    child = "\n".join(f"# {line}" for line in to_yaml(plan.base).splitlines())
    text = yaml.safe_dump(plan.config.model_dump(mode="json", exclude_none=True),
                          sort_keys=False)
    return f"{text}\n# base experiment with set:\n{child}"


@dataclass
class SweepResult:
    sweep_id: str
    parent_id: str
    rows: list[dict[str, Any]]  # ranked: label, run_id, status, swept values, metrics
    best: dict[str, Any] | None
    failed: list[tuple[str, str]]  # (child, error) of the children that failed here
    url: str  # the parent run's page in the MLflow UI


def run_sweep(path: str | Path, *, jobs: int = 1, storage: str | None = None,
              report=print) -> SweepResult:
    """Join the sweep's study and parent run, train trials until none is left, and write the
    summary of every child so far on the parent run."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    plan = load_sweep(path)
    sweep, base = plan.config, plan.base
    storage = storage or default_storage(plan)
    study = open_study(plan, storage)
    tracker = tracking.Tracker(root=base.tracking.dir, experiment=base.tracking.experiment,
                               uri=base.tracking.uri)
    tags = {"sweep_id": plan.sweep_id, "sweep_role": "parent", "optuna_study": plan.sweep_id,
            **({NOTE_TAG: sweep.description} if sweep.description else {})}
    parent_id, created = parent_run(tracker, plan, tags)

    def pending() -> int:  # trials that other (live) workers are still training
        fail_stale_trials(study)
        return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    with tracker.session(reattach=parent_id, leave_running=lambda: pending() > 0):
        if created:
            size = len(plan.points) if sweep.grid is not None else sweep.search.trials
            tracker.log_params({"sweep.kind": "grid" if sweep.grid is not None else "search",
                                "sweep.space": json.dumps(sweep.model_dump(mode="json")[
                                    "grid" if sweep.grid is not None else "search"]),
                                "sweep.set": json.dumps(sweep.set), "sweep.base": sweep.base,
                                "sweep.metric": sweep.metric, "sweep.children": str(size),
                                "sweep.prune": json.dumps(sweep.model_dump(mode="json")[
                                    "prune"])})
            tracker.log_text(sweep_yaml(plan), "sweep.yaml")
            report(f"sweep {plan.sweep_id}: parent run {parent_id}, study in {storage}")
        else:
            report(f"sweep {plan.sweep_id}: joining parent run {parent_id}, study in {storage}")
        if jobs <= 1:
            failed = Worker(plan, study, parent_id=parent_id, report=report).work()
        else:
            failed = _run_workers(plan, storage, parent_id, jobs)
        rows = summary_rows(plan, tracker)
        best = next((r for r in rows if isinstance(r.get(sweep.metric), float)
                     and r["status"] == "FINISHED" and not r["pruned"]), None)
        left = pending()
        if left:  # the last worker to finish summarises everything
            report(f"{left} trial(s) still training in other workers: the last of them writes "
                   f"the summary and ends the parent run")
        else:
            _log_summary(tracker, plan, study, rows, best)
            tracker.set_tags({"children": str(len(rows)), "failed_children": str(
                sum(r["status"] != "FINISHED" for r in rows))})
    return SweepResult(plan.sweep_id, parent_id, rows, best, failed,
                       tracking.run_url(tracker.experiment_id, parent_id, uri=tracker.uri))


def _run_workers(plan: Plan, storage: str, parent_id: str, jobs: int) -> list[tuple[str, str]]:
    """`jobs` workers in separate processes on this machine, sharing the CPU threads."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    failed: list[tuple[str, str]] = []
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"))
    try:
        futures = [pool.submit(_work, str(plan.path), storage, parent_id, threads, n + 1)
                   for n in range(jobs)]
        for future in as_completed(futures):
            failed.extend(future.result())  # Interrupted in a worker stops the sweep
    finally:  # on Ctrl-C: every worker stops its child at a checkpoint
        pool.shutdown(wait=True, cancel_futures=True)
    return failed


# ---------------------------------------------------------------- the summary


SUMMARY_METRICS = ("val/dice", "val/iou", "val/precision", "val/recall", "val/miou",
                   "val/boundary_f1", "val/loss")


def summary_rows(plan: Plan, tracker: tracking.Tracker) -> list[dict[str, Any]]:
    """One row per point (its newest child), ranked: finished children by the metric, then
    pruned ones (their metric is from an earlier epoch), then those without it."""
    rows, seen = [], set()
    for run in tracker.find_runs(f"tags.sweep_id = '{plan.sweep_id}' and "
                                 f"tags.sweep_role = 'child'"):
        point = run.data.tags.get("sweep_point")
        if point in seen:
            continue
        seen.add(point)
        tags = run.data.tags
        rows.append({"child": run.info.run_name, "run_id": run.info.run_id,
                     "status": tracking.shown_status(run), "pruned": tags.get("pruned") == "true",
                     "epochs": len(tracker.client.get_metric_history(run.info.run_id,
                                                                     plan.config.metric)),
                     "trial": tags.get("optuna_trial", ""), **child_values(plan, run),
                     **run.data.metrics})
    metric, mode = plan.config.metric, plan.config.mode

    def order(row: dict[str, Any]) -> tuple:
        value = row.get(metric)
        if not isinstance(value, float):
            return (3, 0.0)
        return (1 if row["pruned"] else 0 if row["status"] == "FINISHED" else 2,
                -value if mode == "max" else value)

    return sorted(rows, key=order)


def _log_summary(tracker: tracking.Tracker, plan: Plan, study, rows: list[dict[str, Any]],
                 best: dict[str, Any] | None) -> None:
    import csv
    import io

    from cityseg import viz

    sweep, keys = plan.config, plan.keys
    metrics = [m for m in dict.fromkeys((sweep.metric, *SUMMARY_METRICS))
               if any(m in r for r in rows)]
    columns = ["rank", "child", "trial", *keys, "status", "pruned", "epochs", *metrics, "run_id"]
    table = [{"rank": rank, **{c: row.get(c, "") for c in columns[1:]}}
             for rank, row in enumerate(rows, start=1)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(table)
    tracker.log_text(buffer.getvalue(), "summary.csv")
    # the UI's artifact view shows it as a table; values as text where types mix
    tracker.log_table({c: [r[c] if isinstance(r[c], (int, float, bool)) and c in metrics
                           or c in ("rank", "epochs") else str(r[c]) for r in table]
                       for c in columns}, "summary.json")
    complete = [r for r in rows if r["status"] == "FINISHED" and not r["pruned"]]
    for key in keys:
        if key == "seed" or len({_yaml(r.get(key)) for r in complete}) < 2:
            continue
        image = viz.metrics_against(complete, key=key, scatter=sweep.search is not None,
                                    metrics=[m for m in metrics if m != "val/loss"])
        tracker.log_image(image, f"plots/{key.replace('.', '_')}.png")
    if sweep.search is not None:
        for name, image in optuna_plots(study).items():
            tracker.log_image(image, f"plots/optuna_{name}.png")
    if best is not None:
        tracker.set_tags({"best_child_run_id": best["run_id"], "best_child": best["child"],
                          f"best_{sweep.metric.replace('/', '_')}": f"{best[sweep.metric]:.4f}"})
        tracker.log_metrics({f"best/{sweep.metric}": best[sweep.metric]}, step=0)
    panel = comparison_panel(plan, rows)
    if panel is not None:
        tracker.log_image(panel, "predictions_by_child.png")


def optuna_plots(study) -> dict[str, Any]:
    """Optuna's optimisation history and parameter importances, as images (the importances
    need two finished trials that differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    from cityseg import viz

    images = {}
    for name, draw in (("history", plots.plot_optimization_history),
                       ("importances", plots.plot_param_importances)):
        with warnings.catch_warnings(), contextlib.suppress(ValueError, RuntimeError):
            warnings.simplefilter("ignore")
            axis = draw(study)
            figure = axis.figure
            figure.set_size_inches(7, 4.5)
            figure.tight_layout()
            images[name] = viz.figure_image(figure)
        plt.close("all")
    return images


PANEL_CHILDREN = 6  # the best ones: more columns would not be readable


def comparison_panel(plan: Plan, rows: list[dict[str, Any]]):
    """The same validation images predicted by the best complete (not pruned) children's final
    weights, side by side (best first)."""
    from cityseg import viz
    from cityseg.data.transforms import build_augmentations
    from cityseg.engine.predictor import Predictor
    from cityseg.registry import DATASETS, MODELS

    base = plan.base
    chosen = [r for r in rows if r["status"] == "FINISHED" and not r["pruned"]][:PANEL_CHILDREN]
    children = {r["child"]: plan.point({k: r[k] for k in plan.keys if k in r}).experiment
                for r in chosen}
    if (not children or base.tracking.num_samples == 0
            or any(exp.data != base.data for exp in children.values())):
        return None  # children saw different data: no common images to compare
    ctx = base.build_context()
    val = DATASETS.build(base.data, ctx, train_transform=build_augmentations([], ctx)).val
    found = val.first(base.tracking.num_samples)
    if found is None:  # an empty validation split
        return None
    images, masks = found
    columns = {}
    for row in chosen:
        # last.pt: the weights whose (last-epoch) metrics rank the children
        try:
            _, checkpoint = checkpoints.fetch(base.tracking.dir, row["run_id"], "last")
        except CitysegError:  # no checkpoint (yet) in this store
            continue
        child = children[row["child"]]
        model = MODELS.build(child.model, ctx)
        model.load_state_dict(checkpoint["model"])
        columns[row["child"]] = Predictor.for_experiment(child, model).predict(images).cpu().numpy()
    if not columns:
        return None
    return viz.comparison_panel(images.numpy(), masks.numpy(), columns, task=base.task)
