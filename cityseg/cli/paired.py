"""`cityseg compare RUN_A RUN_B`: is B really better than A? (cityseg/sweep/paired.py)"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path, PurePosixPath

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from cityseg.errors import CitysegError
from cityseg.metrics import best_name, lower_is_better


def settings_of(root, run) -> dict[str, str]:
    """A run's whole config as flat keys ('model.depth': '4'): its logged config.yaml (its params
    are a few of them), with its params (loss.pos_weight_used); a run without a config.yaml has
    its params alone."""
    from cityseg import tracking
    from cityseg.config import flatten

    try:
        tree = yaml.safe_load(tracking.config_text(root, run.info.run_id))
    except (CitysegError, yaml.YAMLError):
        return dict(run.data.params)
    return {**flatten(tree), **run.data.params}


def differences(root, runs: list) -> dict[str, list[str]]:
    """The settings two runs differ in: key -> [A's, B's] ("-" where one lacks it)."""
    a, b = (settings_of(root, run) for run in runs)
    return {k: [a.get(k, "-"), b.get(k, "-")] for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)}


def cmd_compare_pair(args: argparse.Namespace, out: Console) -> int:
    """A against B, each one run or several (A1,A2,A3: the seeds of one setting, their counts
    summed frame by frame)."""
    from cityseg import tracking
    from cityseg.sweep.paired import scored

    store = tracking.open_store(args.runs)
    groups = [[store.client.get_run(tracking.full_run_id(store, given))
               for given in side.split(",") if given] for side in args.pair]
    if not all(groups):
        raise CitysegError(f"compare: a side names no run ({' '.join(args.pair)})")
    runs = [group[0] for group in groups]
    if all(len(group) == 1 for group in groups):
        records = [scored(args.runs, run) for run in runs]
        config = differences(args.runs, runs)
        missing = [run for run, record in zip(runs, records, strict=True) if record is None]
        if missing:  # older runs: the dataset-level numbers MLflow has, no pairing
            return _unpaired(args, out, runs, missing, config)
        return _report(args, out, records, runs, config)
    records, each = pooled_sides(args.runs, groups, [
        group[0].info.run_name or group[0].info.run_id[:8] for group in groups])
    config = {k: v for k, v in differences(args.runs, runs).items() if k != "seed"}
    return _report(args, out, records, runs, config, groups=each)


def cmd_compare_best_two(args: argparse.Namespace, out: Console) -> int:
    """A sweep's two best points, each one's seeds pooled (their counts summed frame by
    frame): A the runner-up, B the best."""
    from cityseg import tracking

    metric = args.metric or "val/dice"
    children = [r for r in tracking.search_runs(args.runs, experiment=args.experiment,
                                                sweep_id=args.sweep)
                if r.data.tags.get("sweep_role") == "child" and r.info.status == "FINISHED"
                and metric in r.data.metrics]
    points: dict[str, list] = {}
    for run in children:  # a point: its swept values but the seed
        label = ",".join(f"{k.removeprefix('sweep.')}={v}" for k, v in sorted(
            run.data.tags.items()) if k.startswith("sweep.") and k != "sweep.seed")
        points.setdefault(label or "all", []).append(run)
    if len(points) < 2:
        raise CitysegError(f"sweep {args.sweep}: {len(points)} point(s) with {metric} in "
                           f"{args.runs}: --best-two needs two")
    sign = 1 if lower_is_better(metric) else -1
    ranked = sorted(points.items(), key=lambda kv: sign * sum(
        r.data.metrics[metric] for r in kv[1]) / len(kv[1]))
    (best, best_runs), (second, second_runs) = ranked[:2]
    records, each = pooled_sides(args.runs, [second_runs, best_runs], [second, best])
    runs = [second_runs[0], best_runs[0]]
    config = {k: v for k, v in differences(args.runs, runs).items() if k != "seed"}
    return _report(args, out, records, runs, config, groups=each)


def pooled_sides(root, groups: list[list], labels: list[str]) -> tuple[list, list[list]]:
    """Each side's runs scored, and their counts summed frame by frame into one record named
    '<label> (n=<runs>)': (the sides' records, each side's runs' records). CitysegError naming
    a run that kept no per-frame counts."""
    from cityseg.sweep.paired import pooled_record, scored

    each = [[scored(root, run) for run in group] for group in groups]
    for group, found in zip(groups, each, strict=True):
        if None in found:
            raise CitysegError(f"run {group[found.index(None)].info.run_id[:8]} kept no "
                               f"per-frame counts (trained before cityseg kept them): runs "
                               f"are pooled by their frames' counts")
    return ([pooled_record(found, f"{label} (n={len(found)})")
             for label, found in zip(labels, each, strict=True)], each)


def seed_spread(groups: list[list], metric: str) -> dict[str, list[float]]:
    """Each side's runs' own values of the metric (their best epochs' per-frame counts summed),
    where a side pooled several runs: {"A": [...], "B": [...]}; the spread the seeds give,
    beside the pooled comparison."""
    from cityseg.metrics import region_scores

    key = metric.removeprefix("val/")
    return {side: [float(region_scores(r.counts.sum(0), r.classes)[key]) for r in records]
            for side, records in zip("AB", groups, strict=False) if len(records) > 1}


def _report(args: argparse.Namespace, out: Console, records: list, runs: list,
            config: dict[str, list[str]], groups: list[list] | None = None) -> int:
    """The paired comparison of A and B, printed (or as JSON), with the frames' picture."""
    from cityseg.sweep.paired import pair

    a, b = records
    found = pair(a, b, metric=args.metric)
    spread = seed_spread(groups or [], found.metric)
    if args.json:
        if args.out is not None or args.log:
            _write_panels(args, out, found, runs, config)
        print(json.dumps({**found.as_dict(config), **({"per_run": spread} if spread else {})},
                         indent=2))
        return 0
    out.print(f"A: {a.name} ({a.run_id[:8]}, epoch {a.epoch})   B: {b.name} ({b.run_id[:8]}, "
              f"epoch {b.epoch})   on the {found.frames} validation frames both were scored on",
              markup=False)
    table = Table("score", "A", "B", "B - A", "95% interval", box=None, header_style="bold")
    for d in [*found.scores, *found.classes]:
        table.add_row(d.name, f"{d.a:.4f}", f"{d.b:.4f}", f"{d.difference:+.4f}",
                      f"{d.ci[0]:+.4f}..{d.ci[1]:+.4f}" + (" *" if d.separable else ""))
    out.print(table)
    out.print("* the interval leaves out 0: more than the frames' noise", markup=False)
    for side, values in spread.items():
        out.print(f"{side}'s runs, {found.metric} each (best epoch): "
                  + ", ".join(f"{v:.4f}" for v in values)
                  + f"; mean {np.mean(values):.4f} +- {np.std(values, ddof=1):.4f} (std)",
                  markup=False)
    for title, listed in (("B loses most", found.losses), ("B wins most", found.wins)):
        if listed:
            out.print(f"{title} ({found.metric} per frame, B - A): " + ", ".join(
                f"{PurePosixPath(name).stem} {change:+.3f}" for name, change in listed),
                markup=False)
    for key, (value_a, value_b) in config.items():
        out.print(f"config {key}: A {value_a}, B {value_b}", markup=False)
    out.print(found.verdict(), markup=False)
    if args.out is not None or args.log:
        _write_panels(args, out, found, runs, config)
    return 0


def _write_panels(args: argparse.Namespace, out: Console, found, runs: list,
                  config: dict[str, list[str]]) -> None:
    """The frames B loses and wins most as a picture, with the comparison's JSON: into --out,
    and with --log into run B's artifacts."""
    from cityseg.infer.files import check_out, make_out, save_png
    from cityseg.runtime.files import written_whole
    from cityseg.sweep.paired import frames_panel
    from cityseg.tracking.queries import add_artifact

    # an evaluation run's model is its source run's
    source = {r.info.run_id: r.data.tags["source_run"] for r in runs
              if "source_run" in r.data.tags}
    panel = frames_panel(found, args.runs, source=source)
    with tempfile.TemporaryDirectory(prefix="cityseg-compare-") as folder:
        stem = f"compare_{found.a.run_id[:8]}_{found.b.run_id[:8]}"
        target = args.out if args.out is not None else Path(folder)
        check_out(target)
        make_out(target)
        written = [target / f"{stem}.json"]
        with written_whole(written[0]) as partial:
            partial.write_text(json.dumps(found.as_dict(config), indent=2))
        if panel is not None:
            save_png(panel, target / f"{stem}.png", written=1)
            written.append(target / f"{stem}.png")
        elif found.losses or found.wins:
            print("note: the frames' picture was left out: a model or the data is not on this "
                  "machine", file=sys.stderr)
        if args.log:
            for path in written:
                add_artifact(args.runs, found.b.run_id, path,
                                      f"compare/{found.a.run_id[:8]}")
    if not args.json:
        shown = args.out if args.out is not None else f"run {found.b.run_id[:8]}'s artifacts"
        out.print(f"the frames and the comparison: {shown}", markup=False)


def _unpaired(args: argparse.Namespace, out: Console, runs: list, missing: list,
              config: dict[str, list[str]]) -> int:
    metric = args.metric or "val/dice"
    # the best epoch's value where the run logged it (what a per-frame record holds)
    values = [run.data.metrics.get(best_name(metric), run.data.metrics.get(metric))
              for run in runs]
    if None in values:
        raise CitysegError(f"--metric {metric}: run {runs[values.index(None)].info.run_id[:8]} "
                           f"logged no such metric")
    note = (f"{', '.join(r.info.run_id[:8] for r in missing)} kept no per-frame counts "
            f"(trained before cityseg kept them): compared at the dataset level only, with no "
            f"interval")
    difference = values[1] - values[0]
    if args.json:
        print(json.dumps({"metric": metric, "a": {"run_id": runs[0].info.run_id,
                                                   "value": values[0]},
                          "b": {"run_id": runs[1].info.run_id, "value": values[1]},
                          "difference": difference, "ci": None, "frames": None, "note": note,
                          "config": {k: {"a": v[0], "b": v[1]} for k, v in config.items()}},
                         indent=2))
        return 0
    out.print(f"note: {note}", markup=False)
    out.print(f"{metric}: A {values[0]:.4f}, B {values[1]:.4f}, B - A {difference:+.4f}",
              markup=False)
    for key, (value_a, value_b) in config.items():
        out.print(f"config {key}: A {value_a}, B {value_b}", markup=False)
    return 0
