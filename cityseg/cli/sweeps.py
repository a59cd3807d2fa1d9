"""Many runs side by side: train a sweep (`sweep`), rank the runs of a store (`compare`)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterable

from rich.console import Console
from rich.table import Table

from cityseg.data.tasks import HEADLINE_METRICS
from cityseg.errors import CitysegError
from cityseg.metrics import lower_is_better


def shown_metrics(first: str, present: Iterable[str]) -> list[str]:
    """A table's metric columns: `first` (what it is ranked by), then the headline scores the
    runs have."""
    present = set(present)
    return [m for m in dict.fromkeys((first, *HEADLINE_METRICS)) if m in present]


def cmd_sweep(args: argparse.Namespace, out: Console) -> int:
    from cityseg import tracking
    from cityseg.errors import Interrupted
    from cityseg.sweep import default_storage, load_sweep, run_sweep

    if args.jobs < 1:
        raise CitysegError("--jobs must be at least 1")
    plan = load_sweep(args.sweep)  # every grid point and range validated before anything runs
    sweep = plan.config
    size = (f"{len(plan.points)} grid points" if sweep.grid is not None
            else f"{sweep.search.trials} {sweep.search.sampler} trials")
    prune = sweep.pruning
    out.print(f"[bold]{sweep.name}[/]: {size}, ranked by {sweep.metric} ({sweep.mode}), "
              f"{args.jobs} worker(s) here" + (f", {prune.pruner} pruning" if prune else ""))
    tracked = plan.base.tracking
    if args.storage is None and not tracking.is_local(tracking.tracking_uri(tracked.dir,
                                                                            tracked.uri)):
        out.print(f"note: the Optuna study is in {default_storage(plan)} on this machine; "
                  f"workers on other machines need a --storage they all reach "
                  f"(README: Many machines)", markup=False)
    try:
        result = run_sweep(args.sweep, jobs=args.jobs,
                           storage=args.storage or default_storage(plan),
                           report=lambda line: out.print(f"  {line}", markup=False))
    except Interrupted as err:
        print(f"{signal.Signals(err.signum).name}: sweep stopped; finished children are kept. "
              f"Run the same command again to train the rest.", file=sys.stderr)
        return 128 + err.signum
    present = (m for row in result.rows for m, value in row.items() if isinstance(value, float))
    shown = list(dict.fromkeys((sweep.metric, *shown_metrics(sweep.metric, present))))
    table = Table("rank", "child", "status", "epochs", *shown, "run id", box=None)
    for rank, row in enumerate(result.rows, start=1):
        status = "PRUNED" if row["pruned"] else row["status"]
        table.add_row(str(rank), row["child"], status, str(row["epochs"]),
                      *(f"{row[m]:.4f}" if isinstance(row.get(m), float) else "-" for m in shown),
                      row["run_id"][:8])
    out.print(table)
    if result.best is not None:
        out.print(f"best: {result.best['child']} ({sweep.metric} {result.best[sweep.metric]:.4f}); "
                  f"parent run {result.parent_id}, sweep id {result.sweep_id}")
    out.print(f"in the MLflow UI (make ui): {result.url}", markup=False)
    for child, error in result.failed:
        print(f"error: child {child} failed: {error}", file=sys.stderr)
    return 1 if result.failed else 0


def cmd_compare(args: argparse.Namespace, out: Console) -> int:
    from cityseg import tracking

    runs = tracking.search_runs(args.runs, experiment=args.experiment, sweep_id=args.sweep)
    runs = [r for r in runs if r.data.tags.get("sweep_role") != "parent"]
    if not runs:
        out.print("no runs match")
        return 0
    scored = sorted((r for r in runs if args.metric in r.data.metrics),
                    key=lambda r: r.data.metrics[args.metric],
                    reverse=not lower_is_better(args.metric))
    runs = (scored + [r for r in runs if args.metric not in r.data.metrics])[: args.limit]
    keys = sorted({k for r in runs for k in r.data.params})
    # params that differ between the runs that have them (older runs may lack newer params)
    varying = [k for k in keys
               if len({r.data.params[k] for r in runs if k in r.data.params}) > 1][:5]
    metrics = shown_metrics(args.metric, (m for r in runs for m in r.data.metrics))
    table = Table(title=f"sorted by {args.metric}", box=None, header_style="bold")
    for header in ("run", "status", *varying, *metrics, "run id"):
        # long param values (paths) give way first; status, metrics and ids stay whole
        fixed = header in ("status", "run id", *metrics)
        table.add_column(header, no_wrap=True, min_width=max(len(header), 8) if fixed else None)
    for r in runs:
        table.add_row(r.info.run_name, tracking.shown_status(r),
                      *(r.data.params.get(k, "-") for k in varying),
                      *(f"{r.data.metrics[m]:.4f}" if m in r.data.metrics else "-"
                        for m in metrics),
                      r.info.run_id[:8])
    out.print(table)
    return 0
