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


# params that describe rather than configure (the optimizer's groups, with a warm-up's
# first learning rate): never a reason two runs differ
NOISE = ("optimizer.group.",)
PARAM_WIDTH = 22  # a param column's most characters: a value longer is cut with an ellipsis


def compare_table(runs: list, metrics: list[str], *, width: int,
                  settings: list[dict[str, str]] | None = None) -> Table:
    """Runs side by side in `width` columns: the run's name and the ranking metric first (never
    dropped), then the other headline metrics, the status, the run id's start (enough to name
    it), then the settings (default: the params) that differ between the runs as far as the
    width allows."""
    from cityseg import tracking

    settings = settings if settings is not None else [dict(r.data.params) for r in runs]

    table = Table(box=None, header_style="bold", pad_edge=False)
    names = [r.info.run_name or "-" for r in runs]
    statuses = [tracking.shown_status(r) for r in runs]  # liveness read once a run
    table.add_column("run", no_wrap=True, min_width=min(max(map(len, names)), 40))
    for m in metrics:
        table.add_column(m, no_wrap=True, justify="right", min_width=6)
    table.add_column("status", no_wrap=True)
    table.add_column("run id", no_wrap=True)
    # settings that differ between the runs that have them (older runs may lack newer keys)
    keys = sorted({k for s in settings for k in s if not k.startswith(NOISE)})
    varying = [k for k in keys if len({s[k] for s in settings if k in s}) > 1]
    # the short ones first (a swept weight, a seed): more of them fit than of long paths
    varying.sort(key=lambda k: max(len(s.get(k, "-")) for s in settings))
    used = (table.columns[0].min_width + 2 + sum(max(len(m), 6) + 2 for m in metrics)
            + max(map(len, statuses)) + 2 + 8)
    shown = []
    for key in varying:
        column = min(PARAM_WIDTH, max(len(key), *(len(s.get(key, "-")) for s in settings))) + 2
        if used + column > width:
            break
        shown.append(key)
        used += column
    for key in shown:
        table.add_column(key, no_wrap=True, overflow="ellipsis", max_width=PARAM_WIDTH)
    for r, name, status, setting in zip(runs, names, statuses, settings, strict=True):
        table.add_row(name, *(f"{r.data.metrics[m]:.4f}" if m in r.data.metrics else "-"
                              for m in metrics),
                      status, r.info.run_id[:8], *(setting.get(k, "-") for k in shown))
    if len(shown) < len(varying):
        table.caption = (f"{len(varying) - len(shown)} more differing setting(s) left out to fit "
                         f"{width} columns: {', '.join(varying[len(shown):][:6])}")
    return table


def cmd_sweep(args: argparse.Namespace, out: Console) -> int:
    from cityseg import tracking
    from cityseg.errors import Interrupted
    from cityseg.sweep import default_storage, load_sweep, run_sweep

    if args.jobs < 1:
        raise CitysegError("--jobs must be at least 1")
    # every grid point and range validated before anything runs; --set joins the file's set
    plan = load_sweep(args.sweep, args.overrides)
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
                  f"(docs/sweeps.md: Many machines)", markup=False)
    try:
        from cityseg.train.display import RichDisplay

        # one worker here: each child shows its bar and epoch rows under its line
        result = run_sweep(args.sweep, jobs=args.jobs,
                           storage=args.storage or default_storage(plan),
                           report=lambda line: out.print(f"  {line}", markup=False),
                           display=(lambda: RichDisplay(out)) if args.jobs == 1 else None,
                           overrides=args.overrides)
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
    if result.pooled:  # a grid over seeds: a row per point, its seeds pooled
        pooled = Table("rank", "point", "n", f"{sweep.metric} mean", "95% interval", "std",
                       "min", "max", box=None, title="seeds pooled (ranked by mean)")
        for rank, e in enumerate(result.pooled, start=1):
            pooled.add_row(str(rank), e["point"], str(e["n"]), f"{e['mean']:.4f}",
                           "-" if e["ci_low"] != e["ci_low"] else
                           f"{e['ci_low']:.4f}..{e['ci_high']:.4f}",
                           "-" if e["std"] != e["std"] else f"{e['std']:.4f}",
                           f"{e['min']:.4f}", f"{e['max']:.4f}")
        out.print(pooled)
        if result.separation:
            out.print(result.separation, markup=False)
    if result.best is not None:
        out.print(f"best: {result.best['child']} ({sweep.metric} {result.best[sweep.metric]:.4f}); "
                  f"parent run {result.parent_id}, sweep id {result.sweep_id}")
    out.print(f"in the MLflow UI (make ui): {result.url}", markup=False)
    for child, error in result.failed:
        print(f"error: child {child} failed: {error}", file=sys.stderr)
    return 1 if result.failed else 0


def cmd_compare(args: argparse.Namespace, out: Console) -> int:
    from cityseg import tracking
    from cityseg.cli.paired import cmd_compare_best_two, cmd_compare_pair, settings_of

    if args.best_two:
        if args.sweep is None or args.pair:
            raise CitysegError("--best-two pairs the two best points of a sweep: give --sweep "
                               "SWEEP_ID (and no run ids)")
        return cmd_compare_best_two(args, out)
    if args.pair:
        if len(args.pair) != 2:
            raise CitysegError(f"compare takes two runs to pair (A and B), got {len(args.pair)}: "
                               f"{' '.join(args.pair)}")
        return cmd_compare_pair(args, out)
    args.metric = args.metric or "val/dice"
    runs = tracking.search_runs(args.runs, experiment=args.experiment, sweep_id=args.sweep)
    runs = [r for r in runs if r.data.tags.get("sweep_role") != "parent"]
    if not runs:
        out.print("no runs match")
        return 0
    scored = sorted((r for r in runs if args.metric in r.data.metrics),
                    key=lambda r: r.data.metrics[args.metric],
                    reverse=not lower_is_better(args.metric))
    runs = (scored + [r for r in runs if args.metric not in r.data.metrics])[: args.limit]
    metrics = shown_metrics(args.metric, (m for r in runs for m in r.data.metrics))
    table = compare_table(runs, metrics, width=out.width,
                          settings=[settings_of(args.runs, r) for r in runs])
    table.title = f"sorted by {args.metric}"
    out.print(table)
    return 0
