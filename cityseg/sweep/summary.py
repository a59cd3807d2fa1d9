"""The sweep's summary: one row per point, ranked, and what the parent run shows of them.

The parent run gets summary.csv and summary.json (the table, ranked), the best child's tags
and metric, a plot of the metrics against each swept key, Optuna's plots for a search, and the
same validation images predicted by the best children side by side.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from cityseg import tracking, viz
from cityseg.data.datasets import split_dataset
from cityseg.data.tasks import LOGGED_METRICS
from cityseg.errors import CitysegError
from cityseg.infer.loading import load_trained
from cityseg.metrics import best_name, lower_is_better
from cityseg.sweep.paired import pair, pooled_record, region_metric, scored
from cityseg.sweep.seeds import pooled_rows, pools_seeds, separation
from cityseg.sweep.spec import Plan, yaml_value
from cityseg.sweep.study import Study, plots

PANEL_CHILDREN = 6  # the best ones: more columns would not be readable


# ---------------------------------------------------------------- rows and ranking


def summary_rows(plan: Plan, tracker: tracking.Tracker) -> list[dict[str, Any]]:
    """One row per point (its newest child), ranked: complete children by the metric, then
    pruned ones (their metric is from an earlier epoch), then those without it."""
    rows, seen = [], set()
    for run in tracking.sweep_children(tracker, plan.sweep_id):
        tags = run.data.tags
        if tags.get("sweep_point") in seen:
            continue
        seen.add(tags.get("sweep_point"))
        rows.append({"child": run.info.run_name, "run_id": run.info.run_id,
                     "status": tracking.shown_status(run), "pruned": tags.get("pruned") == "true",
                     "complete": tracking.is_complete(run),
                     "epochs": len(tracker.metric_history(run.info.run_id, plan.config.metric)),
                     "trial": tags.get("optuna_trial", ""), **plan.values_of(run),
                     **run.data.metrics})
    metric, mode = plan.config.metric, plan.config.mode

    def order(row: dict[str, Any]) -> tuple:
        value = row.get(metric)
        if not isinstance(value, float):
            return (3, 0.0)
        return (0 if row["complete"] else 1 if row["pruned"] else 2,
                -value if mode == "max" else value)

    return sorted(rows, key=order)


def best_of(rows: list[dict[str, Any]], metric: str,
            pooled: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The best complete child of ranked rows (None until one has the metric); with seeds
    pooled, the best seed of the best point (by mean)."""
    chosen = set(pooled[0]["run_ids"]) if pooled else None
    return next((r for r in rows if r["complete"] and isinstance(r.get(metric), float)
                 and (chosen is None or r["run_id"] in chosen)), None)


def pool(plan: Plan, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """A grid over seeds: one row per point, ranked by mean, and how sure its first place
    is; ([], "") for any other sweep."""
    if not pools_seeds(plan):
        return [], ""
    pooled = pooled_rows(plan, rows, _metrics(plan, rows))
    found = separation(plan, rows, pooled)
    return pooled, found.sentence(plan.config.metric, plan.config.mode) if found else ""


def _metrics(plan: Plan, rows: list[dict[str, Any]]) -> list[str]:
    """The summary's metric columns: the ranking metric first, then every logged one present."""
    return [m for m in dict.fromkeys((plan.config.metric, *LOGGED_METRICS))
            if any(m in r for r in rows)]


# ---------------------------------------------------------------- the parent run


def log_summary(tracker: tracking.Tracker, plan: Plan, study: Study, rows: list[dict[str, Any]],
                best: dict[str, Any] | None, *, report: Callable[[str], None],
                pooled: list[dict[str, Any]] | None = None, separated: str = "") -> None:
    """Everything the parent run shows of its children, once all of them are done."""
    sweep = plan.config
    metrics = _metrics(plan, rows)
    _log_table(tracker, plan, rows, metrics, pooled=pooled)
    if separated:
        tracker.set_tags({"best_point": pooled[0]["point"], "best_vs_runner_up": separated})
    _log_pairing(tracker, plan, rows, pooled)
    complete = [r for r in rows if r["complete"]]
    # a loss has its own scale: plotted with the scores it would flatten them
    scores = [m for m in metrics if not lower_is_better(m)]
    for key in plan.keys:
        if key == "seed" or len({yaml_value(r.get(key)) for r in complete}) < 2:
            continue
        image = viz.metrics_against(complete, key=key, scatter=sweep.search is not None,
                                    metrics=scores, ranked_by=sweep.metric,
                                    lower_better=lower_is_better(sweep.metric))
        tracker.log_image(image, f"plots/{key.replace('.', '_')}.png")
    if sweep.search is not None:
        for name, image in plots(study).items():
            tracker.log_image(image, f"plots/optuna_{name}.png")
    if best is not None:
        tracker.set_tags({"best_child_run_id": best["run_id"], "best_child": best["child"],
                          f"best_{sweep.metric.replace('/', '_')}": f"{best[sweep.metric]:.4f}"})
        tracker.log_metrics({best_name(sweep.metric): best[sweep.metric]}, step=0)
    panel = comparison_panel(plan, rows, report=report)
    if panel is not None:
        tracker.log_image(panel, "predictions_by_child.png")
    tracker.set_tags({"children": str(len(rows)),
                      "failed_children": str(sum(r["status"] != "FINISHED" for r in rows))})


def _log_pairing(tracker: tracking.Tracker, plan: Plan, rows: list[dict[str, Any]],
                 pooled: list[dict[str, Any]] | None) -> None:
    """The best point against the runner-up, paired frame by frame (`cityseg compare A B`, their
    seeds' counts summed): comparison.json and the verdict as a tag; nothing when either
    kept no per-frame counts."""
    metric = plan.config.metric
    if pooled:
        points = [(p["point"], p["run_ids"]) for p in pooled[:2]]
    else:
        points = [(r["child"], [r["run_id"]]) for r in rows
                  if r["complete"] and isinstance(r.get(metric), float)][:2]
    if len(points) < 2:
        return
    where = plan.base.tracking
    best, runner_up = (pooled_record([scored(where.dir, tracker.get_run(i), uri=where.uri)
                                      for i in ids], name) for name, ids in points)
    if best is None or runner_up is None:
        return
    try:  # B, the best: "B is better by"
        found = pair(runner_up, best, metric=region_metric(metric, best.classes))
    except CitysegError:  # e.g. no frame in common
        return
    tracker.log_text(json.dumps(found.as_dict(), indent=2), "comparison.json")
    tracker.set_tags({"best_vs_runner_up_frames": f"A = {runner_up.name}, B = {best.name}: "
                                                  f"{found.verdict()}"})


def _log_table(tracker: tracking.Tracker, plan: Plan, rows: list[dict[str, Any]],
               metrics: list[str], *, pooled: list[dict[str, Any]] | None = None) -> None:
    """summary.csv (a row per child), and summary.json for the UI's artifact view (a table:
    a row per point with its seeds pooled, else per child)."""
    columns = ["rank", "child", "trial", *plan.keys, "status", "pruned", "epochs", *metrics,
               "run_id"]
    table = [{"rank": rank, **{c: row.get(c, "") for c in columns[1:]}}
             for rank, row in enumerate(rows, start=1)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(table)
    tracker.log_text(buffer.getvalue(), "summary.csv")
    if pooled:  # one row per point: numbers as numbers, the rest (seeds, run ids) as text
        ranked = [{"rank": rank, **entry} for rank, entry in enumerate(pooled, start=1)]
        columns = list(dict.fromkeys(k for entry in ranked for k in entry))
        tracker.log_table({ui_column(c): [e.get(c) if isinstance(e.get(c), (int, float))
                                          else str(e.get(c, "")) for e in ranked]
                           for c in columns}, "summary.json")
        return
    # values as text where a column's types mix
    tracker.log_table({ui_column(c): [r[c] if isinstance(r[c], (int, float, bool))
                                      and c in metrics or c in ("rank", "epochs") else str(r[c])
                                      for r in table]
                       for c in columns}, "summary.json")


def ui_column(name: str) -> str:
    """A column name the MLflow UI's table view shows: it reads a dotted name as a path into
    the row (`loss.pos_weight` -> row["loss"]["pos_weight"]) and renders an empty column, so
    the dots of a swept key become slashes, as in MLflow's own metric names."""
    return name.replace(".", "/")


# ---------------------------------------------------------------- the comparison panel


def comparison_panel(plan: Plan, rows: list[dict[str, Any]], *,
                     report: Callable[[str], None]) -> np.ndarray | None:
    """The same validation images predicted by the best complete children's final weights,
    side by side (best first); None when they saw different data or nothing can be shown."""
    base = plan.base
    chosen = [r for r in rows if r["complete"]][:PANEL_CHILDREN]
    children = [plan.point({k: r[k] for k in plan.keys if k in r}).experiment for r in chosen]
    if (not chosen or base.tracking.num_samples == 0
            or any(exp.data != base.data for exp in children)):
        return None  # children saw different data: no common images to compare
    try:
        val, _ = split_dataset(base.data, base.data.validation_split)
    except CitysegError as err:  # e.g. the data is not on this machine: no panel, and said so
        report(f"comparison panel: left out: {err}")
        return None
    found = val.spread(base.tracking.num_samples)
    if found is None:  # an empty validation split
        return None
    images, masks = found
    columns = {}
    metric = plan.config.metric
    for rank, (row, child) in enumerate(zip(chosen, children, strict=True), start=1):
        # last.pt: the weights whose (last-epoch) metrics rank the children
        try:
            trained = load_trained(run_id=row["run_id"], checkpoint=None, runs=base.tracking.dir,
                                   device=child.trainer.device, which="last",
                                   uri=base.tracking.uri)
        except CitysegError as err:  # e.g. no checkpoint in this store: left out, and said so
            report(f"comparison panel: {row['child']} left out: {err}")
            continue
        # its place and score on its header: the column to pick is the first
        score = f" ({row[metric]:.3f})" if isinstance(row.get(metric), float) else ""
        columns[f"#{rank} {row['child']}{score}"] = trained.predictor.predict(images).cpu().numpy()
    if not columns:
        return None
    return viz.comparison_panel(images.numpy(), masks.numpy(), columns, task=base.task)
