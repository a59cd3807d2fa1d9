"""Command line: `cityseg run|sweep|compare|evaluate|predict|validate|show|schema|list|data`.

The only place that prints user errors and chooses exit codes: 0 success, 2 bad input
(config, data, command line), 1 a run that failed while training.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cityseg.data.layouts import LAYOUTS
from cityseg.data.synthetic import MASK_ENCODINGS
from cityseg.errors import CitysegError

EXIT_USAGE = 2


def _add_tracking_uri(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow tracking server or database (beats MLFLOW_TRACKING_URI and "
                             "the experiment's tracking.uri; default: the local store)")


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (dotted key, YAML value); repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cityseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train an experiment and track it in MLflow")
    p.add_argument("experiment", nargs="?", help="experiment YAML file (or --from-run)")
    p.add_argument("--resume", metavar="RUN_ID|CHECKPOINT|auto",
                   help="continue a stopped run: its MLflow run id, a checkpoint file, or auto "
                        "(the newest unfinished run of the same experiment and config)")
    p.add_argument("--fallback-best", action="store_true",
                   help="with --resume: if the run's last.pt is corrupt, continue from its best.pt")
    p.add_argument("--from-run", metavar="RUN_ID",
                   help="re-run exactly the config an earlier run logged")
    p.add_argument("--runs", type=Path, default=Path("runs"),
                   help="tracking dir of --from-run (default runs)")
    _add_overrides(p)
    p = sub.add_parser("validate", help="check experiment files; exit 2 if any is invalid")
    p.add_argument("files", nargs="+", help="experiment YAML files")
    _add_overrides(p)
    p = sub.add_parser("show", help="print the fully resolved experiment as YAML")
    p.add_argument("experiment")
    _add_overrides(p)
    p = sub.add_parser("data", help="inspect or generate datasets")
    data = p.add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="report layout, counts, class frequencies and broken samples")
    p.add_argument("root", type=Path)
    p.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS))
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--workers", type=int, default=0,
                   help="decoding processes (0 = one per core, up to 8)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = data.add_parser("synth", help="write synthetic streets in any Cityscapes layout")
    p.add_argument("out", type=Path)
    p.add_argument("--layout", default="official", choices=LAYOUTS)
    p.add_argument("--mask", default="ids", choices=MASK_ENCODINGS,
                   help="mask encoding (pairs: always color)")
    p.add_argument("--bgr", action="store_true", help="swap red and blue in colour masks")
    p.add_argument("--jpeg", type=int, default=0, metavar="QUALITY",
                   help="save JPEG instead of PNG (folders, pairs)")
    p.add_argument("--num-train", type=int, default=16)
    p.add_argument("--num-val", type=int, default=4)
    p.add_argument("--size", type=int, nargs=2, default=[256, 512], metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("sweep",
                       help="train a sweep's children (a grid or an Optuna search) under one "
                            "parent run; run it on several machines to share the work")
    p.add_argument("sweep", help="sweep YAML file (experiments/sweeps/...)")
    p.add_argument("--jobs", type=int, default=1,
                   help="workers on this machine, each training one child at a time")
    p.add_argument("--storage", metavar="URL|PATH",
                   help="Optuna storage the workers share: sqlite:///FILE, postgresql://..., "
                        "mysql://..., or a journal file path on a shared filesystem "
                        "(default: sqlite next to the local MLflow store)")
    p = sub.add_parser("compare", help="table of runs from the MLflow store, sorted by a metric")
    p.add_argument("--experiment", help="MLflow experiment name (default: all)")
    p.add_argument("--sweep", help="only the children of this sweep id")
    p.add_argument("--metric", default="val/dice", help="sort key (default val/dice)")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="tracking dir (default runs)")
    p.add_argument("--limit", type=int, default=30, help="rows shown")
    for name, text in (("evaluate",
                        "metrics of a trained model on a split, logged as a new MLflow run"),
                       ("predict", "masks and overlays for your own images")):
        p = sub.add_parser(name, help=text)
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--run", help="MLflow run id (its best checkpoint)")
        source.add_argument("--checkpoint", type=Path, help="a checkpoint file")
        source.add_argument("--model", metavar="models:/NAME/VERSION|models:/NAME@ALIAS",
                            help="a registered model (its run's best checkpoint)")
        p.add_argument("--runs", type=Path, default=Path("runs"),
                       help="tracking dir (default runs)")
        p.add_argument("--device", default="auto")
        p.add_argument("--inference", choices=["whole", "slide"],
                       help="whole frame in one pass, or sliding windows of the training size "
                            "(default: the experiment's trainer.inference.mode)")
        p.add_argument("--overlap", type=float, help="slide: fraction of a window its neighbour "
                                                     "overlaps (default 1/3)")
        p.add_argument("--tta", choices=["none", "flip"],
                       help="flip: average with the mirror image's logits")
        if name == "evaluate":
            p.add_argument("--split", default="val", help="split to evaluate (default val)")
            p.add_argument("--data-root", type=Path,
                           help="dataset folder, if not the one trained on")
            p.add_argument("--full-resolution", action="store_true",
                           help="score against full-size labels, predicted exactly as predict "
                                "predicts them (logits upsampled bilinearly)")
            p.add_argument("--calibrate", action="store_true",
                           help="find the threshold that maximises Dice (binary models)")
            p.add_argument("--write-threshold", action="store_true",
                           help="with --calibrate: store that threshold in the checkpoint "
                                "for predict")
            p.add_argument("--no-log", action="store_true", help="do not record an MLflow run")
            _add_overrides(p)
        else:
            p.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
            p.add_argument("--out", type=Path, required=True, help="output folder")
            p.add_argument("--probabilities", action="store_true",
                           help="also write <name>_prob.png (binary)")
    p = sub.add_parser("promote", help="point an alias (champion, ...) of the registered model "
                                       "at the version a run registered")
    p.add_argument("run_id", help="the run whose registered model version gets the alias")
    p.add_argument("--alias", required=True, help="e.g. champion")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="tracking dir (default runs)")
    p = sub.add_parser("runs", help="look after the runs in the MLflow store")
    runs = p.add_subparsers(dest="runs_command", required=True)
    p = runs.add_parser("clean", help="mark crashed runs (RUNNING, but their process is gone) "
                                      "FAILED with a `crashed` tag; live runs are left alone")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="tracking dir (default runs)")
    p.add_argument("--experiment", help="MLflow experiment name (default: all)")
    p.add_argument("--dry-run", action="store_true", help="only list them")
    p = runs.add_parser("links", help="the MLflow UI page of each experiment's training runs")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="tracking dir (default runs)")
    sub.add_parser("schema", help="print the JSON Schema of experiment files")
    sub.add_parser("list", help="list the registered components")
    for name in ("run", "sweep", "compare", "evaluate", "predict", "promote"):
        _add_tracking_uri(sub.choices[name])
    for name in ("clean", "links"):
        _add_tracking_uri(runs.choices[name])
    return parser


def cmd_run(args: argparse.Namespace, out: Console) -> int:
    from cityseg.config import load_experiment

    if (args.experiment is None) == (args.from_run is None):
        raise CitysegError("run: give an experiment file or --from-run RUN_ID (one of them)")
    source = args.experiment
    if args.from_run:
        from cityseg.tracking import fetch_config

        source = fetch_config(args.runs, args.from_run)
    exp = load_experiment(source, args.overrides)  # fails before anything is written
    from cityseg.engine.display import RichDisplay
    from cityseg.engine.runner import run
    from cityseg.errors import Interrupted, TrainingDiverged

    out.print(f"[bold]{exp.name}[/]: {exp.data.name} data ({exp.data.task}), {exp.model.name}, "
              f"{exp.loss.name} loss, {exp.trainer.epochs} epochs")
    try:
        result = run(exp, display=RichDisplay(out), resume=args.resume,
                     fallback_best=args.fallback_best)
    except TrainingDiverged as err:
        print(f"error: run failed: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        name = signal.Signals(err.signum).name
        again = " ".join(["cityseg run", args.experiment or f"--from-run {args.from_run}",
                          *(f"--set {o}" for o in args.overrides), f"--resume {err.run_id}"])
        print(f"{name}: stopped at {err.where}; checkpoint saved, "
              f"MLflow run {err.run_id} marked KILLED.\n"
              f"resume with: {again}", file=sys.stderr)
        return 128 + err.signum
    if result.resumed_from:
        out.print(f"resumed after epoch {result.resumed_from}")
    out.print(f"best {exp.monitor} = {result.best_score:.4f} at epoch {result.best_epoch}; "
              f"run {result.run_id} in MLflow experiment '{exp.tracking.experiment}'")
    out.print(f"checkpoints: {result.checkpoints['best'].parent}")
    out.print(f"in the MLflow UI (make ui): {result.url}", markup=False)
    return 0


def cmd_validate(args: argparse.Namespace, out: Console) -> int:
    from cityseg.config import load_experiment

    failed = 0
    for path in args.files:
        try:
            load_experiment(path, args.overrides)
            out.print(f"{path}: ok")
        except CitysegError as err:
            failed += 1
            print(f"error: {err}", file=sys.stderr)
    return EXIT_USAGE if failed else 0


def cmd_show(args: argparse.Namespace, out: Console) -> int:
    from cityseg.config import load_experiment, to_yaml

    print(to_yaml(load_experiment(args.experiment, args.overrides)), end="")
    return 0


def cmd_schema(args: argparse.Namespace, out: Console) -> int:
    from cityseg.config import Experiment

    print(json.dumps(Experiment.model_json_schema(), indent=2))
    return 0


def cmd_list(args: argparse.Namespace, out: Console) -> int:
    from cityseg.config import REGISTRY_FIELDS
    from cityseg.models.encoders import ENCODERS

    for field, registry in REGISTRY_FIELDS.items():
        out.print(f"[bold]{field}[/] ({registry.kind}):")
        for name in registry.names():
            out.print(f"  {name:<22} {registry.get(name).description}")
    out.print("[bold]model.encoder[/] (unet; model.weights: none | imagenet | PATH):")
    out.print(f"  {'plain':<22} the original U-Net encoder (default)")
    for name, spec in ENCODERS.items():
        out.print(f"  {name:<22} {spec.description}")
    return 0


def _print_report(report: dict, out: Console) -> None:
    enc = report["mask_encoding"]
    out.print(f"root: {report['root']}\nlayout: {report['layout']} ({report['layout_how']})")
    order = f", channel order {enc['channel_order']}" if enc["kind"] == "color" else ""
    out.print(f"mask encoding: {enc['kind']}" + order + f" ({enc['how']})")
    table = Table("split", "images", "image sizes", "foreground", box=None)
    for split, info in report["splits"].items():
        sizes = ", ".join(f"{size} ({n})" for size, n in info["image_sizes"].items())
        table.add_row(split, str(info["images"]), sizes, f"{info['foreground_fraction']:.2%}")
    out.print(table)
    first = next(iter(report["splits"]))
    classes = Table("class", "pixels", title=f"class pixel frequencies ({first}, labelled pixels)",
                    box=None)
    for name, freq in sorted(report["class_frequencies"].items(), key=lambda kv: -kv[1]):
        classes.add_row(name, f"{freq:.2%}")
    out.print(classes)
    out.print(f"ignored (void) pixels: {report['ignored_fraction']:.2%}")
    out.print(f"foreground ({', '.join(report['foreground'])}): "
              f"{report['foreground_fraction']:.2%} of labelled pixels; "
              f"suggested loss.pos_weight (background/foreground): "
              f"{report['suggested_pos_weight']}")
    if report["broken"]:
        out.print(f"[red]{len(report['broken'])} broken sample(s):[/]")
        for item in report["broken"]:
            out.print(f"  {item['path']}: {item['reason']}", markup=False)
    else:
        out.print("broken samples: none")


def cmd_data(args: argparse.Namespace, out: Console) -> int:
    if args.data_command == "synth":
        from cityseg.data.synthetic import write_dataset

        if args.out.exists() and any(args.out.iterdir()):
            raise CitysegError(f"{args.out}: exists and is not empty; choose a new folder")
        try:
            write_dataset(args.out, num_train=args.num_train, num_val=args.num_val,
                          size=tuple(args.size), seed=args.seed, layout=args.layout,
                          mask=args.mask, bgr=args.bgr, jpeg_quality=args.jpeg)
        except ValueError as err:
            raise CitysegError(str(err)) from None
        out.print(f"wrote {args.num_train} train + {args.num_val} val scenes to {args.out} "
                  f"({args.layout} layout)")
        return 0
    from cityseg.data.check import check_dataset

    report = check_dataset(args.root, layout=args.layout, splits=tuple(args.splits),
                           workers=args.workers)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, out)
    return EXIT_USAGE if report["broken"] else 0


def cmd_sweep(args: argparse.Namespace, out: Console) -> int:
    from cityseg.engine.sweep import default_storage, load_sweep, run_sweep
    from cityseg.errors import Interrupted

    if args.jobs < 1:
        raise CitysegError("--jobs must be at least 1")
    plan = load_sweep(args.sweep)  # every grid point and range validated before anything runs
    sweep = plan.config
    size = (f"{len(plan.points)} grid points" if sweep.grid is not None
            else f"{sweep.search.trials} {sweep.search.sampler} trials")
    prune = sweep.pruning
    out.print(f"[bold]{sweep.name}[/]: {size}, ranked by {sweep.metric} ({sweep.mode}), "
              f"{args.jobs} worker(s) here" + (f", {prune.pruner} pruning" if prune else ""))
    from cityseg.tracking import is_local, tracking_uri

    if args.storage is None and not is_local(tracking_uri(plan.base.tracking.dir,
                                                          plan.base.tracking.uri)):
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
    shown = list(dict.fromkeys((sweep.metric, "val/iou", "val/precision", "val/recall")))
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
    from cityseg.tracking import search_runs, shown_status

    children = f"tags.sweep_id = '{args.sweep}' and tags.sweep_role = 'child'" if args.sweep else ""
    runs = search_runs(args.runs, experiment=args.experiment, filter_string=children)
    runs = [r for r in runs if r.data.tags.get("sweep_role") != "parent"]
    if not runs:
        out.print("no runs match")
        return 0
    lower_is_better = args.metric.endswith("loss")
    scored = sorted((r for r in runs if args.metric in r.data.metrics),
                    key=lambda r: r.data.metrics[args.metric], reverse=not lower_is_better)
    runs = (scored + [r for r in runs if args.metric not in r.data.metrics])[: args.limit]
    keys = sorted({k for r in runs for k in r.data.params})
    # params that differ between the runs that have them (older runs may lack newer params)
    varying = [k for k in keys
               if len({r.data.params[k] for r in runs if k in r.data.params}) > 1][:5]
    candidates = (args.metric, "val/dice", "val/iou", "val/miou", "val/boundary_f1")
    metrics = [m for m in dict.fromkeys(candidates) if any(m in r.data.metrics for r in runs)]
    table = Table(title=f"sorted by {args.metric}", box=None, header_style="bold")
    for header in ("run", "status", *varying, *metrics, "run id"):
        # long param values (paths) give way first; status, metrics and ids stay whole
        fixed = header in ("status", "run id", *metrics)
        table.add_column(header, no_wrap=True, min_width=max(len(header), 8) if fixed else None)
    for r in runs:
        table.add_row(r.info.run_name, shown_status(r),
                      *(r.data.params.get(k, "-") for k in varying),
                      *(f"{r.data.metrics[m]:.4f}" if m in r.data.metrics else "-"
                        for m in metrics),
                      r.info.run_id[:8])
    out.print(table)
    return 0


def _source_run(args: argparse.Namespace) -> str | None:
    """The run behind --run, or behind the registered model --model names."""
    if args.model is None:
        return args.run
    from cityseg.tracking import model_run

    return model_run(args.runs, args.model)


def cmd_promote(args: argparse.Namespace, out: Console) -> int:
    from cityseg.tracking import promote

    name, version = promote(args.runs, args.run_id, args.alias)
    out.print(f"models:/{name}@{args.alias} -> models:/{name}/{version} (run {args.run_id})",
              markup=False)
    return 0


def _inference_overrides(args: argparse.Namespace) -> list[str]:
    """--inference, --overlap and --tta as overrides of the trained experiment."""
    return [f"trainer.inference.{key}={value}"
            for key, value in (("mode", args.inference), ("overlap", args.overlap),
                               ("tta", args.tta)) if value is not None]


def cmd_evaluate(args: argparse.Namespace, out: Console) -> int:
    from cityseg.engine import checkpoints, inference

    overrides = [*args.overrides, *([f"data.root={args.data_root}"] if args.data_root else []),
                 *_inference_overrides(args)]
    run_id = _source_run(args)
    trained = inference.load_trained(run_id=run_id, checkpoint=args.checkpoint, runs=args.runs,
                                     overrides=overrides, device=args.device)
    if args.write_threshold and not args.calibrate:
        raise CitysegError("--write-threshold needs --calibrate")
    local = checkpoints.path_of(args.runs, run_id, "best") if run_id else None
    if args.write_threshold and local is not None and not local.is_file():
        raise CitysegError("--write-threshold needs a local checkpoint file; "
                           "use --checkpoint PATH")
    found, confusion = inference.evaluate(trained, split=args.split,
                                          full_resolution=args.full_resolution)
    resolution = ("full-resolution labels" if args.full_resolution
                  else f"{list(trained.exp.data.image_size)}")
    table = Table("metric", "value", title=f"{trained.exp.name} on {args.split} ({resolution}), "
                                           f"threshold {trained.threshold:g}", box=None)
    for key, value in found.items():
        table.add_row(key, f"{value:.4f}")
    out.print(table)
    calibration = None
    if args.calibrate:
        calibration = inference.calibrate(trained, split=args.split)
        c, best, half = calibration, calibration.best, calibration.at_half
        out.print(f"calibration on {args.split}: "
                  f"threshold 0.5 -> dice {c.dice[half]:.4f}, iou {c.iou[half]:.4f}; "
                  f"best threshold {c.thresholds[best]:.3f} -> "
                  f"dice {c.dice[best]:.4f}, iou {c.iou[best]:.4f}")
        if args.write_threshold:
            inference.write_threshold(trained, float(c.thresholds[best]))
            out.print(f"threshold {c.thresholds[best]:.3f} written into {trained.path}; "
                      f"predict will use it")
    if not args.no_log:
        run_id = inference.log_evaluation(trained, runs=args.runs, split=args.split,
                                          full_resolution=args.full_resolution, found=found,
                                          confusion=confusion, calibration=calibration)
        out.print(f"evaluation logged as MLflow run {run_id} (source run {trained.run_id})")
    return 0


def cmd_predict(args: argparse.Namespace, out: Console) -> int:
    from rich.progress import track

    from cityseg.engine import inference

    trained = inference.load_trained(run_id=_source_run(args), checkpoint=args.checkpoint,
                                     runs=args.runs, device=args.device,
                                     overrides=_inference_overrides(args))
    progress = ((lambda files: track(files, description="predicting", console=out))
                if out.is_terminal else (lambda f: f))
    written, skipped = inference.predict_files(trained, args.inputs, args.out,
                                               probabilities=args.probabilities,
                                               progress=progress)
    out.print(f"{len(written)} image(s) -> {args.out} (*_mask.png, *_overlay.png"
              f"{', *_prob.png' if args.probabilities and trained.task.thresholded else ''})")
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)
    return EXIT_USAGE if skipped else 0


def cmd_runs(args: argparse.Namespace, out: Console) -> int:
    from cityseg.tracking import clean_stale, experiment_links

    if args.runs_command == "links":
        for name, url in experiment_links(args.runs):
            out.print(f"{name}: {url}", markup=False)
        return 0

    stale = clean_stale(args.runs, experiment=args.experiment, dry_run=args.dry_run)
    verb = "would mark" if args.dry_run else "marked"
    for run, reason in stale:
        out.print(f"{run.info.run_id[:8]} {run.info.run_name}: {reason}; {verb} FAILED (crashed)",
                  markup=False)
    out.print(f"{len(stale)} crashed run(s) {verb} FAILED; live runs left alone. "
              f"`cityseg run EXP --resume auto` continues the newest one of an experiment.")
    return 0


COMMANDS = {"run": cmd_run, "runs": cmd_runs, "promote": cmd_promote, "evaluate": cmd_evaluate,
            "predict": cmd_predict,
            "data": cmd_data, "sweep": cmd_sweep, "compare": cmd_compare, "validate": cmd_validate,
            "show": cmd_show, "schema": cmd_schema, "list": cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    uri = getattr(args, "tracking_uri", None)
    if not uri:
        return _main(args)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    # MLflow's own convention, so sweep children and torchrun ranks see it as well
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        return _main(args)
    finally:  # a caller in the same process (tests, notebooks) keeps its own setting
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def _main(args: argparse.Namespace) -> int:
    out = Console(highlight=False)
    if not out.is_terminal:  # logs and pipes: wide enough that tables are not cut
        out = Console(highlight=False, width=140)
    # under torchrun, rank 0 speaks for every process (it also reports the others' failures)
    quiet = int(os.environ.get("RANK", "0")) != 0
    if quiet:
        out = Console(quiet=True)
    with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        try:
            return COMMANDS[args.command](args, out)
        except CitysegError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
