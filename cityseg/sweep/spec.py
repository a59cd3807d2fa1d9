"""The sweep file: a base experiment, fixed `set` overrides, the metric to rank by, and either a
`grid:` (dotted key -> values) or a `search:` (dotted key -> range or choices); loaded and
validated, every grid point and both ends of every range, before anything runs."""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cityseg.config import (
    Experiment,
    config_hash,
    load_experiment,
    parse_override,
    read_yaml,
    validation_error,
)
from cityseg.errors import ConfigError
from cityseg.metrics import lower_is_better


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
    mode: Literal["max", "min"] = Field(
        "max", description="whether a higher or lower metric is better (default: min for a "
                           "loss, max for a score)")
    prune: Literal["median", "none"] | Prune = Field(
        "none", description="median (or a block with its settings) stops hopeless children")
    heartbeat_seconds: int = Field(
        180, ge=1, description="Optuna heartbeat of a running trial (RDB storages); a trial "
                               "silent for twice as long is failed and queued again. Keep "
                               "twice it above 300 s, when a child's run on another host counts "
                               "as crashed")

    @model_validator(mode="before")
    @classmethod
    def _mode_of_metric(cls, data: Any) -> Any:
        """A sweep that ranks by a loss minimises it unless it says otherwise."""
        if isinstance(data, dict) and "mode" not in data:
            metric = data["metric"] if "metric" in data else cls.model_fields["metric"].default
            data = {**data, "mode": "min" if lower_is_better(metric) else "max"}
        return data

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


def yaml_value(value: Any) -> str:
    """A value as one line of YAML: how overrides, tags and encoded choices write it."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def label_of(values: dict[str, Any]) -> str:
    return ",".join(f"{key.rsplit('.', 1)[-1]}={_shown(value)}" for key, value in values.items())


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def encode(value: Any) -> Any:
    """A swept value as Optuna stores it: its categorical values must be scalars, so a list
    (e.g. an image size) goes as its YAML."""
    return value if _scalar(value) else yaml_value(value)


@dataclass(frozen=True)
class Plan:
    """A validated sweep: its file, config, base experiment, identity and (grid) points."""

    path: Path
    config: SweepConfig
    base: Experiment  # the base experiment with `set` applied
    sweep_id: str
    points: list[SweepPoint]  # a grid's every point; empty for a search
    kinds: dict[str, str]  # searched key -> float | int | choice; empty for a grid

    @property
    def keys(self) -> list[str]:
        return list(self.config.grid or self.config.search.params)

    def point(self, values: dict[str, Any]) -> SweepPoint:
        """The child for these swept values (validated)."""
        for point in self.points:
            if point.values == values:
                return point
        return _make_point(self.path, self.config, values)

    def values(self, key: str) -> list[Any] | None:
        """A key's listed values (a grid's, or a search's choices); None for a range."""
        if self.config.grid is not None:
            return self.config.grid[key]
        return self.config.search.params[key].choices

    def choices(self, key: str) -> list[Any]:
        """A key's listed values, encoded."""
        return [encode(v) for v in self.values(key)]

    @cached_property
    def _decoded(self) -> dict[str, dict[Any, Any]]:
        """Per key, each encoded listed value -> the value (a range lists none)."""
        return {key: {encode(v): v for v in self.values(key) or [] if not _scalar(v)}
                for key in self.keys}

    def decode(self, key: str, value: Any) -> Any:
        """A value as Optuna stored it -> the swept value."""
        return self._decoded[key].get(value, value)

    def encoded(self, values: dict[str, Any]) -> dict[str, Any]:
        """Swept values -> the params of the Optuna trial that holds them."""
        return {key: encode(value) for key, value in values.items()}

    def tags(self, values: dict[str, Any]) -> dict[str, str]:
        """A child's swept values as its sweep.<key> tags."""
        return {f"sweep.{key}": yaml_value(value) for key, value in values.items()}

    def values_of(self, run) -> dict[str, Any]:
        """A child's swept values, from its sweep.<key> tags."""
        return {key: yaml.safe_load(run.data.tags[f"sweep.{key}"]) for key in self.keys
                if f"sweep.{key}" in run.data.tags}


def _make_point(path: Path, sweep: SweepConfig, values: dict[str, Any]) -> SweepPoint:
    overrides = [f"{key}={yaml_value(value)}" for key, value in (*sweep.set.items(),
                                                                  *values.items())]
    exp = load_experiment(path.parent / sweep.base, overrides)
    identity = config_hash(exp, resumable=False)
    return SweepPoint(values, label_of(values), exp, identity)


def _value_at(exp: Experiment, key: str, *, where: str) -> Any:
    """The experiment's value at a dotted key (list items by index); a ConfigError naming
    `where` when the experiment has no such key."""
    node: Any = exp.model_dump()
    for depth, part in enumerate(key.split(".")):
        parent = ".".join(key.split(".")[:depth]) or "the experiment"
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            close = difflib.get_close_matches(part, list(node) if isinstance(node, dict) else [],
                                              n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{where}: {parent} has no key {part}{hint}")
    return node


def is_sweep_file(path: str | Path) -> bool:
    """Whether a YAML file is a sweep (it has a `grid:` or a `search:`) rather than an
    experiment; a file that cannot be read is left to the experiment loader to report."""
    try:
        raw = read_yaml(Path(path))
    except ConfigError:
        return False
    return isinstance(raw, dict) and ("grid" in raw or "search" in raw)


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Plan:
    """Read and validate the sweep file, every grid point and every searched range's ends;
    ConfigError naming the field on any problem. `overrides` (`cityseg sweep --set KEY=VALUE`)
    join the file's `set`, after it: every child gets them, and the sweep is another one."""
    path = Path(path)
    raw = read_yaml(path)
    if overrides and isinstance(raw, dict):
        raw["set"] = {**(raw.get("set") or {}),
                      **{".".join(key): value for key, value in map(parse_override, overrides)}}
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise validation_error(err, raw, source=str(path), schema=SweepConfig) from None
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
    if sweep.grid is not None:
        points, kinds = _grid_points(path, sweep), {}
        identity = json.dumps(sorted(p.config_hash for p in points))
    else:
        points = []
        kinds = {key: _check_range(path, sweep, base, key, spec)
                 for key, spec in sweep.search.params.items()}
        identity = json.dumps({"base": config_hash(base, resumable=False),
                               "search": {k: v.model_dump(mode="json") for k, v in swept.items()},
                               "metric": sweep.metric, "mode": sweep.mode}, sort_keys=True)
    sweep_id = f"{sweep.name}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"
    return Plan(path=path, config=sweep, base=base, sweep_id=sweep_id, points=points,
                kinds=kinds)


def _grid_points(path: Path, sweep: SweepConfig) -> list[SweepPoint]:
    """Every combination of the grid, each a valid experiment."""
    points = []
    for combo in itertools.product(*sweep.grid.values()):
        values = dict(zip(sweep.grid, combo, strict=True))
        try:
            points.append(_make_point(path, sweep, values))
        except ConfigError as err:
            raise ConfigError(f"{path}: grid point {label_of(values)}: {err}") from None
    return points


def _check_range(path: Path, sweep: SweepConfig, base: Experiment, key: str, spec: Range) -> str:
    """The kind of a searched parameter (float, int, choice); both ends (or every choice) must
    make a valid experiment."""
    field_name = f"search.params.{key}"
    if spec.choices is not None:
        kind, ends = "choice", spec.choices
    else:
        kind = spec.type or _kind_of(_value_at(base, key, where=f"{path}: {field_name}"))
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


def _kind_of(current: Any) -> str:
    """A range's type when the file gives none: int where the experiment holds an int."""
    return "int" if isinstance(current, int) and not isinstance(current, bool) else "float"
