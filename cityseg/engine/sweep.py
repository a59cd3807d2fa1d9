"""Sweeps: one parent MLflow run, one child run per grid point, a ranked summary at the end.

A sweep file names a base experiment, a grid of dotted keys to lists of values, fixed `set`
overrides, and the metric to rank by. Every grid point is validated before the first child
starts. A sweep is identified by its name and the config hashes of its points, so running it
again reattaches to the same parent and skips the children that already FINISHED.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cityseg import tracking
from cityseg.config import Experiment, load_experiment, read_yaml, to_yaml
from cityseg.engine import checkpoints
from cityseg.engine.resume import config_hash
from cityseg.errors import ConfigError, Interrupted
from cityseg.tracking import NOTE_TAG


class SweepConfig(BaseModel):
    """A sweep file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[\w.-]+$", description="sweep name: the parent run's name")
    description: str | None = Field(None, description="what the sweep asks; the parent run's "
                                                      "description")
    base: str = Field(description="experiment file the children start from, relative to the "
                                  "sweep file")
    grid: dict[str, list[Any]] = Field(
        min_length=1, description="dotted key -> values; one child per combination")
    set: dict[str, Any] = Field({}, description="dotted key -> value applied to every child")
    metric: str = Field("val/dice", description="metric the children are ranked by")
    mode: Literal["max", "min"] = Field("max",
                                        description="whether a higher or lower metric is better")


@dataclass(frozen=True)
class SweepPoint:
    values: dict[str, Any]  # swept key -> value
    label: str  # the child's run name, e.g. pos_weight=4
    experiment: Experiment
    config_hash: str


def _override(key: str, value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return f"{key}={text}"


def label_of(values: dict[str, Any]) -> str:
    return ",".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in values.items())


def load_sweep(path: str | Path) -> tuple[SweepConfig, list[SweepPoint]]:
    """Read and validate the sweep file and every grid point; ConfigError on any problem."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as err:
        lines = [f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}"
                 for e in err.errors()]
        raise ConfigError(f"{path}: {len(lines)} error(s)\n  " + "\n  ".join(lines)) from None
    for key in (*sweep.grid, *sweep.set):
        if key in ("tracking.dir", "tracking.experiment"):
            raise ConfigError(f"{path}: {key}: a sweep's children share the base experiment's "
                              f"MLflow store and experiment; set it in the base experiment")
    for key, values in sweep.grid.items():
        if not values:
            raise ConfigError(f"{path}: grid.{key}: give at least one value")
    fixed = [_override(k, v) for k, v in sweep.set.items()]
    points = []
    for combo in itertools.product(*sweep.grid.values()):
        values = dict(zip(sweep.grid, combo, strict=True))
        overrides = [*fixed, *(_override(k, v) for k, v in values.items())]
        try:
            exp = load_experiment(path.parent / sweep.base, overrides)
        except ConfigError as err:
            raise ConfigError(f"{path}: grid point {label_of(values)}: {err}") from None
        identity = config_hash(exp.model_dump(mode="json"), resumable=False)
        points.append(SweepPoint(values, label_of(values), exp, identity))
    allowed = points[0].experiment.task.monitors
    if sweep.metric not in allowed:
        raise ConfigError(f"{path}: metric: {sweep.metric} is not logged by these runs; use one of "
                          f"{', '.join(m for m in allowed if not m.startswith('val/iou/'))}")
    return sweep, points


def sweep_id(sweep: SweepConfig, points: list[SweepPoint]) -> str:
    hashes = json.dumps(sorted(p.config_hash for p in points))
    digest = hashlib.sha256(hashes.encode()).hexdigest()[:8]
    return f"{sweep.name}-{digest}"


def _child(config: dict, label: str, tags: dict[str, str], resume: str | None, threads: int) -> str:
    """Run (or resume) one child in a worker process; returns its run id."""
    import torch

    from cityseg.engine.runner import run

    torch.set_num_threads(threads)
    return run(Experiment.model_validate(config), run_name=label, tags=tags, resume=resume).run_id


@dataclass
class ChildOutcome:
    point: SweepPoint
    run_id: str | None
    status: str  # FINISHED (now or earlier), FAILED
    skipped: bool
    error: str = ""


def run_children(points: list[SweepPoint], *, parent_id: str, sid: str, jobs: int, tracker,
                 report) -> list[ChildOutcome]:
    """Run every point that has no FINISHED child yet, `jobs` at a time; failures do not stop
    the rest."""
    outcomes, todo, resume = [], [], {}
    for point in points:
        earlier = tracker.find_runs(f"tags.sweep_id = '{sid}' and "
                                    f"tags.sweep_point = '{point.config_hash}'")
        done = [r for r in earlier if r.info.status == "FINISHED"]
        if done:
            outcomes.append(ChildOutcome(point, done[0].info.run_id, "FINISHED", skipped=True))
            report(f"{point.label}: already FINISHED ({done[0].info.run_id}), skipped")
            continue
        todo.append(point)
        # interrupted or crashed: continue from its checkpoint
        if earlier and tracking.interrupted(earlier[0]):
            run_id = earlier[0].info.run_id
            if checkpoints.path_of(point.experiment.tracking.dir, run_id, "last").is_file():
                resume[point.label] = run_id

    def tags_of(point: SweepPoint) -> dict[str, str]:
        return {"mlflow.parentRunId": parent_id, "sweep_id": sid, "sweep_role": "child",
                "sweep_point": point.config_hash,
                **{f"sweep.{k}": str(v) for k, v in point.values.items()}}

    if jobs <= 1:
        from cityseg.engine.runner import run

        for point in todo:
            again = resume.get(point.label)
            report(f"{point.label}: " + (f"resuming {again}" if again else "training"))
            try:
                result = run(point.experiment, run_name=point.label, tags=tags_of(point),
                             resume=again)
                outcomes.append(ChildOutcome(point, result.run_id, "FINISHED", skipped=False))
            except Interrupted:
                raise  # the person wants the whole sweep to stop
            except Exception as err:  # noqa: BLE001  (a failed child is reported, the others go on)
                outcomes.append(ChildOutcome(point, None, "FAILED", skipped=False, error=str(err)))
            report(f"{point.label}: {outcomes[-1].status}")
        return outcomes
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"))
    try:
        futures = {pool.submit(_child, p.experiment.model_dump(mode="json"), p.label, tags_of(p),
                               resume.get(p.label), threads): p for p in todo}
        for future in as_completed(futures):
            point = futures[future]
            try:
                outcomes.append(ChildOutcome(point, future.result(), "FINISHED", skipped=False))
            except Interrupted:
                raise
            except Exception as err:  # noqa: BLE001  (a failed child is reported, the others go on)
                outcomes.append(ChildOutcome(point, None, "FAILED", skipped=False, error=str(err)))
            report(f"{point.label}: {outcomes[-1].status}")
    finally:  # on Ctrl-C: children not yet started never start
        pool.shutdown(wait=True, cancel_futures=True)
    return outcomes


def sweep_yaml(sweep: SweepConfig, points: list[SweepPoint]) -> str:
    """The sweep and its first resolved child, for the parent's artifacts."""
    child = "\n".join(f"# {line}" for line in to_yaml(points[0].experiment).splitlines())
    text = yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False)
    return f"{text}\n# first child:\n{child}"


@dataclass
class SweepResult:
    sweep_id: str
    parent_id: str
    rows: list[dict[str, Any]]  # ranked: label, run_id, status, swept values, metrics
    best: dict[str, Any] | None
    failed: list[ChildOutcome]
    url: str  # the parent run's page in the MLflow UI


def _rank(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    scored = [r for r in rows if isinstance(r.get(metric), float)]
    unscored = [r for r in rows if r not in scored]
    return sorted(scored, key=lambda r: r[metric], reverse=mode == "max") + unscored


def run_sweep(path: str | Path, *, jobs: int = 1, report=print) -> SweepResult:
    """Validate every point, run the missing children, and summarise them on the parent run."""
    from cityseg import viz

    sweep, points = load_sweep(path)
    base = points[0].experiment
    sid = sweep_id(sweep, points)
    tracker = tracking.Tracker(root=base.tracking.dir, experiment=base.tracking.experiment,
                               uri=base.tracking.uri)
    parents = tracker.find_runs(f"tags.sweep_id = '{sid}' and tags.sweep_role = 'parent'")
    existing = parents[0].info.run_id if parents else None
    tags = {"sweep_id": sid, "sweep_role": "parent",
            **({NOTE_TAG: sweep.description} if sweep.description else {})}
    with tracker.session(run_name=sweep.name, tags=tags, reattach=existing) as parent_id:
        if existing:
            report(f"sweep {sid}: continuing parent run {parent_id}")
        else:
            tracker.log_params({"sweep.grid": json.dumps(sweep.grid),
                                "sweep.set": json.dumps(sweep.set), "sweep.base": sweep.base,
                                "sweep.metric": sweep.metric, "sweep.children": str(len(points))})
            tracker.log_text(sweep_yaml(sweep, points), "sweep.yaml")
            report(f"sweep {sid}: parent run {parent_id}, {len(points)} children")
        outcomes = run_children(points, parent_id=parent_id, sid=sid, jobs=jobs, tracker=tracker,
                                report=report)
        rows = []
        for outcome in outcomes:
            run_id, status = outcome.run_id, outcome.status
            if run_id is None:  # failed: its run, if it opened one (a crashed one stays RUNNING)
                found = tracker.find_runs(f"tags.sweep_id = '{sid}' and "
                                          f"tags.sweep_point = '{outcome.point.config_hash}'")
                if found:
                    run_id, status = found[0].info.run_id, tracking.shown_status(found[0])
            row: dict[str, Any] = {"child": outcome.point.label, "run_id": run_id or "",
                                   "status": status, **outcome.point.values}
            if run_id:
                row.update(tracker.get_run(run_id).data.metrics)
            rows.append(row)
        rows = _rank(rows, sweep.metric, sweep.mode)
        best = rows[0] if rows and isinstance(rows[0].get(sweep.metric), float) else None
        _log_summary(tracker, sweep, points, rows, best, viz)
        failed = [o for o in outcomes if o.status != "FINISHED"]
        tracker.set_tags({"failed_children": str(len(failed))})
    return SweepResult(sid, parent_id, rows, best, failed,
                       tracking.run_url(tracker.experiment_id, parent_id, uri=tracker.uri))


SUMMARY_METRICS = ("val/dice", "val/iou", "val/precision", "val/recall", "val/miou",
                   "val/boundary_f1", "val/loss")


def _log_summary(tracker, sweep: SweepConfig, points: list[SweepPoint], rows: list[dict[str, Any]],
                 best: dict[str, Any] | None, viz) -> None:
    import csv
    import io

    keys = list(sweep.grid)
    metrics = [m for m in dict.fromkeys((sweep.metric, *SUMMARY_METRICS))
               if any(m in r for r in rows)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer,
                            fieldnames=["rank", "child", *keys, "status", *metrics, "run_id"],
                            extrasaction="ignore")
    writer.writeheader()
    for rank, row in enumerate(rows, start=1):
        writer.writerow({"rank": rank, **row})
    tracker.log_text(buffer.getvalue(), "summary.csv")
    for key in keys:
        if key == "seed" or len(sweep.grid[key]) < 2:
            continue
        image = viz.metrics_against(rows, key=key, metrics=[m for m in metrics if m != "val/loss"])
        tracker.log_image(image, f"plots/{key.replace('.', '_')}.png")
    if best is not None:
        tracker.set_tags({"best_child_run_id": best["run_id"], "best_child": best["child"],
                          f"best_{sweep.metric.replace('/', '_')}": f"{best[sweep.metric]:.4f}"})
        tracker.log_metrics({f"best/{sweep.metric}": best[sweep.metric]}, step=0)
    panel = comparison_panel(points, rows)
    if panel is not None:
        tracker.log_image(panel, "predictions_by_child.png")


def comparison_panel(points: list[SweepPoint], rows: list[dict[str, Any]]):
    """The same validation images predicted by every finished child's final weights, side by
    side (best first)."""
    from cityseg import viz
    from cityseg.data.transforms import build_augmentations
    from cityseg.engine.predictor import Predictor
    from cityseg.registry import DATASETS, MODELS

    base = points[0].experiment
    if any(p.experiment.data != base.data for p in points) or base.tracking.num_samples == 0:
        return None  # children saw different data: no common images to compare
    ctx = base.build_context()
    val = DATASETS.build(base.data, ctx, train_transform=build_augmentations([], ctx)).val
    found = val.first(base.tracking.num_samples)
    if found is None:  # an empty validation split
        return None
    images, masks = found
    targets = masks.numpy()
    by_label = {p.label: p for p in points}
    columns = {}
    for row in rows:
        # last.pt: the weights whose (last-epoch) metrics rank the children
        checkpoint = (checkpoints.path_of(base.tracking.dir, row["run_id"], "last")
                      if row["run_id"] else None)
        if checkpoint is None or not checkpoint.is_file():
            continue
        child = by_label[row["child"]].experiment
        model = MODELS.build(child.model, ctx)
        model.load_state_dict(checkpoints.load(checkpoint)["model"])
        predictor = Predictor.for_experiment(child, model)
        columns[row["child"]] = predictor.predict(images).cpu().numpy()
    if not columns:
        return None
    return viz.comparison_panel(images.numpy(), targets, columns, task=base.task)
