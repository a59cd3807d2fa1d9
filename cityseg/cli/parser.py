"""The command line's grammar: every command, its arguments and their help, and nothing it does.

The commands themselves live by subject in train.py, data.py, sweeps.py and models.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cityseg.data.layouts import LAYOUTS
from cityseg.data.synthetic import MASK_ENCODINGS

DESCRIPTION = ("Command line: "
               "`cityseg run|sweep|compare|evaluate|predict|export|promote|runs|validate|show|"
               "schema|list|data`.")

# Exit codes: 0 success, 2 bad input (config, data, command line: argparse's own code for a bad
# command line), 1 a run that failed while training, 128 + N stopped by signal N.
EXIT_USAGE = 2


def _add_tracking_uri(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow tracking server or database (beats MLFLOW_TRACKING_URI and "
                             "the experiment's tracking.uri; default: the local store)")


def _add_runs(parser: argparse.ArgumentParser, what: str = "tracking dir") -> None:
    parser.add_argument("--runs", type=Path, default=Path("runs"), help=f"{what} (default runs)")


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (dotted key, YAML value); repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cityseg", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_experiment_commands(sub)
    _add_data_commands(sub)
    _add_sweep_commands(sub)
    for name, text in (("evaluate",
                        "metrics of a trained model on a split, logged as a new MLflow run"),
                       ("predict", "masks and overlays for your own images")):
        _add_model_command(sub.add_parser(name, help=text), evaluate=name == "evaluate")
    _add_export_command(sub)
    runs = _add_store_commands(sub)
    sub.add_parser("schema", help="print the JSON Schema of experiment files")
    sub.add_parser("list", help="list the registered components")
    for name in ("run", "sweep", "compare", "evaluate", "predict", "export", "promote"):
        _add_tracking_uri(sub.choices[name])
    for name in ("clean", "links"):
        _add_tracking_uri(runs.choices[name])
    return parser


def _add_experiment_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="train an experiment and track it in MLflow")
    p.add_argument("experiment", nargs="?", help="experiment YAML file (or --from-run)")
    p.add_argument("--resume", metavar="RUN_ID|CHECKPOINT|auto",
                   help="continue a stopped run: its MLflow run id (or the id's start, as "
                        "tables print it), a checkpoint file, or auto "
                        "(the newest unfinished run of the same experiment and config)")
    p.add_argument("--fallback-best", action="store_true",
                   help="with --resume: if the run's last.pt is corrupt, continue from its best.pt")
    p.add_argument("--from-run", metavar="RUN_ID",
                   help="re-run exactly the config an earlier run logged (its id, or the "
                        "id's start)")
    _add_runs(p, "tracking dir of --from-run")
    _add_overrides(p)
    p = sub.add_parser("validate", help="check experiment files; exit 2 if any is invalid")
    p.add_argument("files", nargs="+", help="experiment YAML files")
    _add_overrides(p)
    p = sub.add_parser("show", help="print the fully resolved experiment as YAML")
    p.add_argument("experiment")
    _add_overrides(p)


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
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


def _add_sweep_commands(sub: argparse._SubParsersAction) -> None:
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
    _add_overrides(p)
    p = sub.add_parser("compare", help="table of runs from the MLflow store, sorted by a metric; "
                                       "with two run ids, is B really better than A?")
    p.add_argument("pair", nargs="*", metavar="RUN",
                   help="two run ids (or their starts): A and B, paired frame by frame on their "
                        "validation frames, with 95%% intervals; a side may be several runs "
                        "joined by commas (A1,A2,A3: one setting's seeds, pooled)")
    p.add_argument("--experiment", help="MLflow experiment name (default: all)")
    p.add_argument("--sweep", help="only the children of this sweep id")
    p.add_argument("--metric", help="sort key, or the score two runs are compared by (default "
                                    "val/dice; val/miou for multiclass pairs)")
    _add_runs(p)
    p.add_argument("--limit", type=int, default=30, help="rows shown")
    p.add_argument("--json", action="store_true",
                   help="with two runs: the comparison as one JSON object, for scripts")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="with two runs: write the frames B loses and wins most (input, ground "
                        "truth, A, B) and the comparison there")
    p.add_argument("--best-two", action="store_true",
                   help="with --sweep: pair its two best points, each one's seeds pooled (A "
                        "the runner-up, B the best)")
    p.add_argument("--log", action="store_true",
                   help="with two runs: log the same to run B, under compare/<A's id start>/")


def _add_model_source(p: argparse.ArgumentParser) -> None:
    """evaluate, predict and export: which trained model, and how it infers."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="MLflow run id, or its start as tables print it (the "
                                      "run's best checkpoint)")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint file")
    source.add_argument("--model", metavar="models:/NAME/VERSION|models:/NAME@ALIAS",
                        help="a registered model (its run's best checkpoint)")
    _add_runs(p)
    p.add_argument("--inference", choices=["whole", "slide"],
                   help="whole frame in one pass, or sliding windows of the training size "
                        "(default: the experiment's trainer.inference.mode)")
    p.add_argument("--overlap", type=float, help="slide: fraction of a window its neighbour "
                                                 "overlaps (default 1/3)")
    p.add_argument("--tta", choices=["none", "flip"],
                   help="flip: average with the mirror image's logits")


def _add_export_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="the model as one graph (ONNX or torch.export): uint8 "
                                      "photos in, masks and probabilities out, as predict")
    _add_model_source(p)
    p.add_argument("--format", choices=["onnx", "pt2"], default="onnx",
                   help="onnx (ONNX Runtime, TensorRT, ...) or pt2 (torch.export.load); "
                        "default onnx")
    p.add_argument("--out", type=Path,
                   help="file to write (default ./<experiment>-<run id>.onnx or .pt2)")
    p.add_argument("--log", action="store_true",
                   help="also store the file in the artifacts of the run (export/)")


def _add_model_command(p: argparse.ArgumentParser, *, evaluate: bool) -> None:
    """evaluate and predict: which trained model, and how it infers."""
    _add_model_source(p)
    p.add_argument("--device", default="auto")
    if not evaluate:
        p.add_argument("inputs", nargs="+", type=Path,
                       help="image files (.png, .jpg), video files (.mp4, .mov, .avi, .mkv, "
                            ".webm, ...) or folders of them")
        p.add_argument("--out", type=Path, required=True, help="output folder")
        p.add_argument("--probabilities", action="store_true",
                       help="also write <name>_prob.png (binary)")
        p.add_argument("--format", choices=["files", "cityscapes"], default="files",
                       help="files (the default): <name>_mask.png and <name>_overlay.png per "
                            "image; cityscapes: for the benchmark server, one <name>.png of "
                            "official label ids per frame and nothing else (19-class models)")
        p.add_argument("--zip", type=Path, metavar="FILE",
                       help="--format cityscapes: also pack the files into FILE for upload")
        p.add_argument("--masks", action="store_true",
                       help="videos: also write <name>_mask.mp4 (the mask in the task's colours)")
        p.add_argument("--engine", choices=["torch", "onnxruntime"],
                       help="torch (the default), or the exported graph run by ONNX Runtime "
                            "(whole-frame models; default with --onnx)")
        p.add_argument("--onnx", type=Path, metavar="FILE",
                       help="--engine onnxruntime: a file `cityseg export` wrote from this "
                            "model (default: exported now, in memory)")
        return
    p.add_argument("--split", default="val", help="split to evaluate (default val)")
    p.add_argument("--data-root", type=Path, help="dataset folder, if not the one trained on")
    p.add_argument("--full-resolution", action="store_true",
                   help="score against full-size labels, predicted exactly as predict "
                        "predicts them (logits upsampled bilinearly)")
    p.add_argument("--calibrate", action="store_true",
                   help="find the threshold that maximises Dice (binary models)")
    p.add_argument("--write-threshold", action="store_true",
                   help="with --calibrate: store that threshold in the checkpoint for predict")
    p.add_argument("--no-log", action="store_true", help="do not record an MLflow run")
    _add_overrides(p)


def _add_store_commands(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """promote and `runs clean|links`; returns the `runs` subcommands."""
    p = sub.add_parser("promote", help="point an alias (champion, ...) of the registered model "
                                       "at the version a run registered")
    p.add_argument("run_id", help="the run whose registered model version gets the alias")
    p.add_argument("--alias", required=True, help="e.g. champion")
    _add_runs(p)
    p = sub.add_parser("runs", help="look after the runs in the MLflow store")
    runs = p.add_subparsers(dest="runs_command", required=True)
    p = runs.add_parser("clean", help="mark crashed runs (RUNNING, but their process is gone) "
                                      "FAILED with a `crashed` tag; live runs are left alone")
    _add_runs(p)
    p.add_argument("--experiment", help="MLflow experiment name (default: all)")
    p.add_argument("--dry-run", action="store_true", help="only list them")
    p = runs.add_parser("links", help="the MLflow UI page of each experiment's training runs")
    _add_runs(p)
    p.add_argument("--port", type=int, help="the local UI's port (default $CITYSEG_UI_PORT, "
                                            "else 5000; `make ui PORT=N` sets it)")
    return runs
