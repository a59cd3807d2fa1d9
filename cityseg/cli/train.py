"""Experiments: train one (`run`), check them (`validate`), read them (`show`, `schema`, `list`)."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from rich.console import Console

from cityseg.cli.parser import EXIT_USAGE
from cityseg.errors import CitysegError


def cmd_run(args: argparse.Namespace, out: Console) -> int:
    from cityseg.config import load_experiment

    if (args.experiment is None) == (args.from_run is None):
        raise CitysegError("run: give an experiment file or --from-run RUN_ID (one of them)")
    # the experiment is read and validated before anything is written
    if args.from_run:
        from cityseg.tracking import logged_config, run_id_in

        args.from_run = run_id_in(args.runs, args.from_run)
        with logged_config(args.runs, args.from_run) as logged:
            exp = load_experiment(logged, args.overrides, saved=True)
    else:
        exp = load_experiment(args.experiment, args.overrides)
    from cityseg.errors import Interrupted, TrainingDiverged
    from cityseg.train.display import RichDisplay
    from cityseg.train.runner import run

    out.print(f"[bold]{exp.name}[/]: {exp.data.name} data ({exp.data.task}), {exp.model.name}, "
              f"{exp.loss.name} loss, {exp.trainer.epochs} epochs")
    try:
        result = run(exp, display=RichDisplay(out), resume=args.resume,
                     fallback_best=args.fallback_best)
    # every rank stops or diverges together: rank 0 (the one whose console speaks) says so
    except TrainingDiverged as err:
        if not out.quiet:
            print(f"error: run failed: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        if out.quiet:
            return 128 + err.signum
        name = signal.Signals(err.signum).name
        again = " ".join(["cityseg run", args.experiment or f"--from-run {args.from_run}",
                          *(f"--set {o}" for o in args.overrides), f"--resume {err.run_id}"])
        print(f"{name}: stopped at {err.where}; checkpoint saved, "
              f"MLflow run {err.run_id} marked KILLED.\n"
              f"resume with: {again}", file=sys.stderr)
        return 128 + err.signum
    if result.resumed_at:
        out.print(f"resumed from {result.resumed_at}")
    out.print(f"best {exp.monitor} = {result.best_score:.4f} at epoch {result.best_epoch}; "
              f"run {result.run_id} in MLflow experiment '{exp.tracking.experiment}'")
    out.print(f"checkpoints: {result.checkpoints['best'].parent}")
    out.print(f"in the MLflow UI (make ui): {result.url}", markup=False)
    return 0


def cmd_validate(args: argparse.Namespace, out: Console) -> int:
    """Experiment files, and sweep files validated as `cityseg sweep` validates them (the
    sweep, its base and every child)."""
    from cityseg.config import load_experiment
    from cityseg.sweep.spec import is_sweep_file, load_sweep

    failed = 0
    for path in args.files:
        try:
            if not is_sweep_file(path):
                load_experiment(path, args.overrides)
                out.print(f"{path}: ok", markup=False)
                continue
            if args.overrides:
                raise CitysegError(f"{path}: a sweep file takes no --set; its `set:` changes "
                                   f"every child")
            plan = load_sweep(path)
            search = plan.config.search
            children = (f"{len(plan.points)} children" if search is None
                        else f"a search of {search.trials} trials")
            out.print(f"{path}: ok (sweep {plan.config.name}: {children}, ranked by "
                      f"{plan.config.metric}, {plan.config.mode})", markup=False)
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
