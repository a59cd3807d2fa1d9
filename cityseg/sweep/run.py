"""Sweeps: Optuna chooses the points, MLflow records them. Read this file first.

A sweep file (spec.py) names a base experiment, fixed `set` overrides, the metric to rank by, and
either a grid (every combination of some values) or a search (Optuna samples ranges or choices);
it is validated whole, every grid point and both ends of every range, before anything runs. The
Optuna study (study.py, in `--storage`) is the shared queue: every `cityseg sweep` process that
names the same sweep and storage is one more worker (worker.py) of the same study, on this
machine (`--jobs N`) or any other. Each trial trains one child MLflow run under the sweep's one
parent run, which `run_sweep` creates or joins. A point is identified by its experiment's config
hash, so a point already FINISHED is never trained again and an interrupted or crashed child is
resumed in its own run. The last worker to finish writes the summary (summary.py) on the parent
run and ends it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import yaml

from cityseg import tracking
from cityseg.config import to_yaml
from cityseg.data.loader import SWEEP_JOBS_ENV, available_cpus
from cityseg.sweep.spec import Plan, load_sweep
from cityseg.sweep.study import default_storage, open_study, pending
from cityseg.sweep.summary import best_of, log_summary, pool, summary_rows
from cityseg.sweep.worker import Worker


@dataclass
class SweepResult:
    sweep_id: str
    parent_id: str
    rows: list[dict[str, Any]]  # ranked: label, run_id, status, swept values, metrics
    best: dict[str, Any] | None
    failed: list[tuple[str, str]]  # (child, error) of the children that failed here
    url: str  # the parent run's page in the MLflow UI
    pooled: list[dict[str, Any]] = field(default_factory=list)  # a grid over seeds: per point
    separation: str = ""  # how sure the first place is (seeds pooled)


def run_sweep(path: str | Path, *, jobs: int = 1, storage: str | None = None,
              report: Callable[[str], None] = print,
              display: Callable[[], Any] | None = None,
              overrides: list[str] | tuple[str, ...] = ()) -> SweepResult:
    """Join the sweep's study and parent run, train trials until none is left, and write the
    summary of every child so far on the parent run. `display()` makes each child's display
    (its bar and epoch rows, as `cityseg run` shows them) when the children train here;
    `overrides` (--set) join the sweep file's `set`."""
    plan = load_sweep(path, overrides)
    storage = storage or default_storage(plan)
    study = open_study(plan, storage)
    tracker = open_tracker(plan)
    parent_id, created = parent_run(tracker, plan)
    # the parent stays RUNNING while other (live) workers still train its children
    with tracker.session(reattach=parent_id, leave_running=lambda: pending(study) > 0):
        if created:
            _log_sweep(tracker, plan)
            report(f"sweep {plan.sweep_id}: parent run {parent_id}, study in {storage}")
        else:
            report(f"sweep {plan.sweep_id}: joining parent run {parent_id}, study in {storage}")
        if jobs <= 1:
            failed = Worker(plan, study, tracker=tracker, parent_id=parent_id,
                            report=report, display=display).work()
        else:
            failed = _run_workers(plan, storage, parent_id, jobs, list(overrides))
        rows = summary_rows(plan, tracker)
        pooled, separated = pool(plan, rows)
        best = best_of(rows, plan.config.metric, pooled)
        left = pending(study)
        if left:  # the last worker to finish summarises everything
            report(f"{left} trial(s) still training in other workers: the last of them writes "
                   f"the summary and ends the parent run")
        else:
            log_summary(tracker, plan, study, rows, best, report=report, pooled=pooled,
                        separated=separated)
    return SweepResult(plan.sweep_id, parent_id, rows, best, failed,
                       tracking.run_url(tracker.experiment_id, parent_id, uri=tracker.uri),
                       pooled, separated)


def open_tracker(plan: Plan) -> tracking.Tracker:
    """The base experiment's tracker: the parent and every child live there."""
    settings = plan.base.tracking
    return tracking.open(settings.dir, experiment=settings.experiment, uri=settings.uri,
                         outage_minutes=settings.outage_minutes)


# ---------------------------------------------------------------- the parent run


def parent_run(tracker: tracking.Tracker, plan: Plan) -> tuple[str, bool]:
    """The sweep's one parent run, and whether this call created it. Workers that start at once
    may each create one: all keep the oldest, and the others delete theirs."""

    def oldest() -> str | None:
        found = tracking.sweep_parents(tracker, plan.sweep_id)
        return min(found, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id \
            if found else None

    existing = oldest()
    if existing:
        return existing, False
    sweep = plan.config
    tags = {"sweep_id": plan.sweep_id, "sweep_role": "parent", "optuna_study": plan.sweep_id,
            **({tracking.NOTE_TAG: sweep.description} if sweep.description else {})}
    created = tracker.create_run(run_name=sweep.name, tags=tags)
    kept = oldest()
    if kept != created:
        tracker.delete_run(created)
    return kept, kept == created


def _log_sweep(tracker: tracking.Tracker, plan: Plan) -> None:
    """What the sweep is, on its new parent run: params and the resolved sweep.yaml."""
    sweep = plan.config
    kind = "grid" if sweep.grid is not None else "search"
    dumped = sweep.model_dump(mode="json")
    size = len(plan.points) if sweep.grid is not None else sweep.search.trials
    tracker.log_params({"sweep.kind": kind, "sweep.space": json.dumps(dumped[kind]),
                        "sweep.set": json.dumps(sweep.set), "sweep.base": sweep.base,
                        "sweep.metric": sweep.metric, "sweep.children": str(size),
                        "sweep.prune": json.dumps(dumped["prune"])})
    tracker.log_text(sweep_yaml(plan), "sweep.yaml")


def sweep_yaml(plan: Plan) -> str:
    """The sweep and its base experiment resolved, for the parent's artifacts."""
    child = "\n".join(f"# {line}" for line in to_yaml(plan.base).splitlines())
    text = yaml.safe_dump(plan.config.model_dump(mode="json", exclude_none=True),
                          sort_keys=False)
    return f"{text}\n# base experiment with set:\n{child}"


# ---------------------------------------------------------------- workers on this machine


def _run_workers(plan: Plan, storage: str, parent_id: str, jobs: int,
                 overrides: list[str]) -> list[tuple[str, str]]:
    """`jobs` workers in separate processes on this machine, sharing the CPU threads."""
    threads = max(1, available_cpus() // jobs)
    failed: list[tuple[str, str]] = []
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"))
    try:
        futures = [pool.submit(_work, str(plan.path), storage, parent_id, threads, jobs, n + 1,
                               overrides) for n in range(jobs)]
        for future in as_completed(futures):
            failed.extend(future.result())  # Interrupted in a worker stops the sweep
    finally:  # on Ctrl-C: every worker stops its child at a checkpoint
        pool.shutdown(wait=True, cancel_futures=True)
    return failed


def _work(path: str, storage: str, parent_id: str, threads: int, jobs: int, number: int,
          overrides: list[str]) -> list[tuple[str, str]]:
    """One of `--jobs N` workers, in its own process: the same as a worker on another machine."""
    torch.set_num_threads(threads)
    os.environ[SWEEP_JOBS_ENV] = str(jobs)  # data.num_workers: auto takes this worker's share
    plan = load_sweep(path, overrides)
    return Worker(plan, open_study(plan, storage), tracker=open_tracker(plan),
                  parent_id=parent_id,
                  report=lambda line: print(f"  [worker {number}] {line}", flush=True)).work()
