"""Trained models: score one (`evaluate`), use one (`predict`), take one elsewhere (`export`),
name one (`promote`), and look after the runs they come from (`runs clean|links`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from cityseg.cli.parser import EXIT_USAGE
from cityseg.errors import CitysegError
from cityseg.runtime.process import stops_raise

if TYPE_CHECKING:
    from cityseg.infer.loading import Trained


def _source_run(args: argparse.Namespace) -> str | None:
    """The run behind --run, or behind the registered model --model names."""
    if args.model is None:
        if args.run is None:
            return None
        from cityseg.tracking import NoStore, run_id_in

        try:
            return run_id_in(args.runs, args.run)
        except NoStore:  # what follows says what is missing, in its own terms
            return args.run
    from cityseg.tracking import model_run

    return model_run(args.runs, args.model)


def _load(args: argparse.Namespace, run_id: str | None, *, device: str,
          overrides: list[str]) -> Trained:
    """The trained model (--run / --model, else --checkpoint), its note said as a warning."""
    from cityseg.infer import loading

    trained = loading.load_trained(run_id=run_id, checkpoint=args.checkpoint, runs=args.runs,
                                   overrides=overrides, device=device)
    if trained.note:
        print(f"warning: {trained.note}", file=sys.stderr)
    return trained


def _inference_overrides(args: argparse.Namespace) -> list[str]:
    """--inference, --overlap and --tta as overrides of the trained experiment."""
    return [f"trainer.inference.{key}={value}"
            for key, value in (("mode", args.inference), ("overlap", args.overlap),
                               ("tta", args.tta)) if value is not None]


def _check_write_threshold(args: argparse.Namespace, run_id: str | None) -> None:
    """--write-threshold rewrites a checkpoint file: refused before any model is loaded."""
    if not args.write_threshold:
        return
    if not args.calibrate:
        raise CitysegError("--write-threshold needs --calibrate")
    from cityseg import checkpoints

    if run_id is not None and not checkpoints.path_of(args.runs, run_id, "best").is_file():
        raise CitysegError("--write-threshold needs a local checkpoint file; "
                           "use --checkpoint PATH")


def cmd_evaluate(args: argparse.Namespace, out: Console) -> int:
    from cityseg.infer import evaluation

    overrides = [*args.overrides, *([f"data.root={args.data_root}"] if args.data_root else []),
                 *_inference_overrides(args)]
    run_id = _source_run(args)
    _check_write_threshold(args, run_id)
    trained = _load(args, run_id, device=args.device, overrides=overrides)
    per_frame: dict = {}  # each frame's counts: `cityseg compare` pairs two evaluations
    found, confusion = evaluation.evaluate(trained, split=args.split,
                                           full_resolution=args.full_resolution,
                                           per_frame=per_frame)
    resolution = ("full-resolution labels" if args.full_resolution
                  else f"{list(trained.exp.data.image_size)}")
    # the title on its own line: a table two columns wide would wrap it into ragged lines
    out.print(f"{trained.exp.name} on {args.split} ({resolution}), threshold "
              f"{trained.threshold:g}", markup=False)
    table = Table("metric", "value", box=None)
    for key, value in found.items():
        table.add_row(key, f"{value:.4f}")
    out.print(table)
    calibration = None
    if args.calibrate:
        calibration = evaluation.calibrate(trained, split=args.split)
        c, best, half = calibration, calibration.best, calibration.at_half
        out.print(f"calibration on {args.split}: "
                  f"threshold 0.5 -> dice {c.dice[half]:.4f}, iou {c.iou[half]:.4f}; "
                  f"best threshold {c.thresholds[best]:.3f} -> "
                  f"dice {c.dice[best]:.4f}, iou {c.iou[best]:.4f}")
        if args.write_threshold:
            evaluation.write_threshold(trained, float(c.thresholds[best]))
            out.print(f"threshold {c.thresholds[best]:.3f} written into {trained.path}; "
                      f"predict will use it")
    if not args.no_log:
        run_id = evaluation.log_evaluation(trained, runs=args.runs, split=args.split,
                                           full_resolution=args.full_resolution, found=found,
                                           confusion=confusion, calibration=calibration,
                                           per_frame=per_frame)
        out.print(f"evaluation logged as MLflow run {run_id} (source run {trained.run_id})")
    return 0


def cmd_predict(args: argparse.Namespace, out: Console) -> int:
    from cityseg.infer import files, submission

    if args.zip is not None and args.format != "cityscapes":
        raise CitysegError("--zip packs the files of --format cityscapes; add --format cityscapes")
    if args.probabilities and args.format == "cityscapes":
        raise CitysegError("--probabilities is for --format files: the benchmark folder holds "
                           "the predictions only")
    files.check_out(args.out)
    engine = _engine(args)
    trained = _load(args, _source_run(args), device=args.device,
                    overrides=_inference_overrides(args))
    if engine == "onnxruntime":  # predict asks its predictor only predict_photo
        from cityseg.deploy.onnx_engine import engine_for

        trained = dataclasses.replace(trained, predictor=engine_for(trained, args.onnx))
    with (files.progress_bar(out) if out.is_terminal else contextlib.nullcontext() as progress,
          stops_raise()):
        if args.format == "cityscapes":
            written, skipped = submission.benchmark_files(trained, args.inputs, args.out,
                                                          zip_to=args.zip, progress=progress)
        else:
            written, skipped = files.predict_files(trained, args.inputs, args.out,
                                                   probabilities=args.probabilities,
                                                   masks=args.masks, progress=progress)
    out.print(_predicted(args, trained, written, skipped), markup=False)
    for line in skipped:
        print(line if line.startswith(files.INCOMPLETE) else f"skipped: {line}", file=sys.stderr)
    left = sum(not line.startswith(files.INCOMPLETE) for line in skipped)
    if left:  # exit 2, as for any bad input, once the readable images are written
        print(f"{left} input(s) skipped", file=sys.stderr)
    return EXIT_USAGE if skipped else 0


def _predicted(args: argparse.Namespace, trained, written: list, skipped: list[str]) -> str:
    """What predict wrote, in one line."""
    if args.format == "cityscapes":
        zipped = ("" if args.zip is None else f"; zipped into {args.zip}" if not skipped
                  else "; no zip: the server needs a prediction for every frame")
        return f"{len(written)} frame(s) -> {args.out} (<frame>.png, label ids){zipped}"
    videos = sum(path.suffix == ".mp4" for path in written)
    images = len(written) - videos
    prob = ", *_prob.png" if args.probabilities and trained.task.thresholded else ""
    parts = []
    if images or not videos:
        parts.append(f"{images} image(s) (*_mask.png, *_overlay.png{prob})")
    if videos:
        parts.append(f"{videos} video(s) (*_overlay.mp4{', *_mask.mp4' if args.masks else ''})")
    return f"{' and '.join(parts)} -> {args.out}"


def _engine(args: argparse.Namespace) -> str:
    """--engine: onnxruntime when --onnx names a file, else torch; --onnx with torch refused."""
    if args.onnx is not None and args.engine == "torch":
        raise CitysegError("--onnx FILE is run by --engine onnxruntime, not torch")
    return args.engine or ("onnxruntime" if args.onnx is not None else "torch")


def cmd_export(args: argparse.Namespace, out: Console) -> int:
    from cityseg.deploy import export

    if args.out is not None:
        export.check_out_file(args.out)
    if args.format == "onnx":
        export.onnx_modules()  # a missing extra is said before the model is loaded
    # traced on the CPU in fp32, whatever device it trained on
    trained = _load(args, _source_run(args), device="cpu", overrides=_inference_overrides(args))
    path = export.export(trained, fmt=args.format,
                         out=args.out or export.default_out(trained, args.format, args.runs))
    out.print(f"{path}: {trained.exp.name} (run {trained.run_id}, {trained.task.name}, "
              f"{trained.exp.trainer.inference.describe()}); image uint8 (N, 3, H, W) -> mask, "
              f"probabilities", markup=False)
    if args.log:
        out.print(f"stored with the run: {export.log_export(trained, path, runs=args.runs)}",
                  markup=False)
    return 0


def cmd_promote(args: argparse.Namespace, out: Console) -> int:
    from cityseg.tracking import promote

    name, version = promote(args.runs, args.run_id, args.alias)
    out.print(f"models:/{name}@{args.alias} -> models:/{name}/{version} (run {args.run_id})",
              markup=False)
    return 0


def cmd_runs(args: argparse.Namespace, out: Console) -> int:
    from cityseg.tracking import clean_stale, experiment_links

    if args.runs_command == "links":
        for name, url in experiment_links(args.runs, port=args.port):
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
