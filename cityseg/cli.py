"""Command line: `cityseg run|validate|show|schema|list`.

The only place that prints user errors and chooses exit codes: 0 success, 2 bad input
(config, data, command line), 1 a run that failed while training.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rich.console import Console

from cityseg.errors import CitysegError

EXIT_USAGE = 2


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (dotted key, YAML value); repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cityseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train an experiment and track it in MLflow")
    p.add_argument("experiment", help="experiment YAML file")
    _add_overrides(p)
    p = sub.add_parser("validate", help="check experiment files; exit 2 if any is invalid")
    p.add_argument("files", nargs="+", help="experiment YAML files")
    _add_overrides(p)
    p = sub.add_parser("show", help="print the fully resolved experiment as YAML")
    p.add_argument("experiment")
    _add_overrides(p)
    sub.add_parser("schema", help="print the JSON Schema of experiment files")
    sub.add_parser("list", help="list the registered components")
    return parser


def cmd_run(args: argparse.Namespace, out: Console) -> int:
    from cityseg.config import load_experiment

    exp = load_experiment(args.experiment, args.overrides)  # fails before anything is written
    from cityseg.engine.display import RichDisplay
    from cityseg.engine.runner import run

    out.print(f"[bold]{exp.name}[/]: {exp.data.name} data, {exp.model.name} depth "
              f"{exp.model.depth}, {exp.loss.name} loss, {exp.trainer.epochs} epochs")
    try:
        result = run(exp, display=RichDisplay(out))
    except FloatingPointError as err:
        out.print(f"[red]run failed:[/] {err}")
        return 1
    out.print(f"best {exp.trainer.monitor} = {result.best_score:.4f} at epoch {result.best_epoch}; "
              f"run {result.run_id} in MLflow experiment '{exp.tracking.experiment}'")
    out.print(f"checkpoints: {result.checkpoints['best'].parent}   browse: make ui")
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

    for field, registry in REGISTRY_FIELDS.items():
        out.print(f"[bold]{field}[/] ({registry.kind}):")
        for name in registry.names():
            out.print(f"  {name:<22} {registry.get(name).description}")
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "show": cmd_show,
            "schema": cmd_schema, "list": cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Console(highlight=False)
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
