"""Command line: cityseg run|sweep|compare|evaluate|predict|export|validate|show|schema|list|data.

The only place that prints user errors and chooses exit codes: 0 success, 2 bad input
(config, data, command line), 1 a run that failed while training. `parser.py` holds the
grammar; the commands live by subject: train.py (run, validate, show, schema, list), data.py,
sweeps.py (sweep, compare), paired.py (compare A B) and models.py (evaluate, predict,
export, promote, runs);
__main__.py makes `python -m cityseg.cli` work.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from rich.console import Console

from cityseg.cli.data import cmd_data
from cityseg.cli.models import cmd_evaluate, cmd_export, cmd_predict, cmd_promote, cmd_runs
from cityseg.cli.parser import EXIT_USAGE, build_parser
from cityseg.cli.sweeps import cmd_compare, cmd_sweep
from cityseg.cli.train import cmd_list, cmd_run, cmd_schema, cmd_show, cmd_validate
from cityseg.errors import CitysegError, RankFailed

__all__ = ["COMMANDS", "EXIT_USAGE", "build_parser", "main"]

COMMANDS = {"run": cmd_run, "runs": cmd_runs, "promote": cmd_promote, "evaluate": cmd_evaluate,
            "predict": cmd_predict, "export": cmd_export,
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
    if not out.is_terminal:  # logs and pipes: wide enough that tables are not cut (COLUMNS rules)
        out = Console(highlight=False, width=int(os.environ.get("COLUMNS") or 140))
    # under torchrun, rank 0 speaks for every process: it reports what all ranks agreed on
    # (a stop, a divergence, a rank's failure); another rank's stderr still carries the errors
    # only that rank knows, and every traceback
    rank = int(os.environ.get("RANK", "0"))
    if rank:
        out = Console(quiet=True)
    try:
        return COMMANDS[args.command](args, out)
    except CitysegError as err:
        if not rank:
            print(f"error: {err}", file=sys.stderr)
        elif not isinstance(err, RankFailed):  # RankFailed: rank 0 names the failing rank
            print(f"error: rank {rank}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)  # Stopped: SIGTERM or SIGHUP
        if not rank:
            print(f"{signal.Signals(signum).name}: stopped; files being written were removed, "
                  f"those finished are kept" if signum != signal.SIGINT else "interrupted",
                  file=sys.stderr)
        return 128 + signum
