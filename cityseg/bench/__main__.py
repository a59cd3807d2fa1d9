"""`python -m cityseg.bench [--json] [--only training|inference]` (`make bench`): the training
side by side and its older tables, then the inference side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console

import cityseg.bench
from cityseg.bench.data import decode_vs_cache
from cityseg.bench.host import host
from cityseg.bench.inference import (
    ENGINES,
    MODES,
    bench_files,
    bench_inference,
    inference_experiment,
)
from cityseg.bench.report import (
    print_data,
    print_host,
    print_inference,
    print_side_by_side,
    print_steps,
)
from cityseg.bench.steps import step_speeds
from cityseg.bench.training import SCHEMA_VERSION, bench_side_by_side
from cityseg.data.layouts import read_photo
from cityseg.data.synthetic import ensure_dataset
from cityseg.runtime.device import cpu_has_native_bf16, resolve_device


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cityseg.bench",
                                     description=cityseg.bench.__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", choices=("training", "inference"),
                        help="run one part: the training side by side (with its older tables) "
                             "or the inference one; default both")
    parser.add_argument("--step-seconds", type=float, default=6.0,
                        help="seconds each timing of a bare training step lasts")
    parser.add_argument("--plain-steps", type=int, default=4,
                        help="timed steps of the plain loop (slow: fp32, PIL)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternations of cityseg end to end and the plain loop")
    parser.add_argument("--cityscapes", type=Path,
                        help="a Cityscapes copy (official layout) to train and infer on; "
                             "default: synthetic 2048x1024 frames")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--json", action="store_true",
                        help="print the report as JSON (docs/performance.md) and skip the "
                             "older training tables")
    parser.add_argument("--skip-steps", action="store_true",
                        help="skip the precision and layout table")
    # a full frame costs seconds on a CPU: the defaults keep `make bench` a few minutes longer
    parser.add_argument("--inference-frames", type=_positive, default=1,
                        help="timed frames of each inference cell per round (default 1)")
    parser.add_argument("--inference-repeats", type=_positive, default=1,
                        help="rounds over the inference cells, round robin (default 1); "
                             "latency percentiles pool frames x rounds")
    parser.add_argument("--inference-modes", nargs="+", choices=list(MODES),
                        default=list(MODES), help="inference modes to time (default all)")
    parser.add_argument("--inference-engines", nargs="+", choices=ENGINES,
                        default=list(ENGINES), help="engines to time (default all)")
    parser.add_argument("--predict-files", type=_positive, default=2,
                        help="full-size PNGs `predict` writes end to end (default 2)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    device = resolve_device(args.device)
    console = Console(highlight=False, stderr=args.json)
    machine = host(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    console.print(f"device: {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                  f"native CPU bf16: {cpu_has_native_bf16()}")
    print_host(machine, console)
    if args.cityscapes:
        root, source = args.cityscapes.resolve(), str(args.cityscapes)
    else:
        root, source = Path("runs/bench/synthetic-2048").resolve(), "synthetic 2048x1024 PNGs"
        # 6 steps an epoch: the per-epoch costs (a new loader iterator, its first batch) weigh
        # as in a real epoch of hundreds of steps only if there are several steps
        ensure_dataset(root, num_train=48, num_val=2, size=(1024, 2048), seed=0)
    report = {"schema": SCHEMA_VERSION}
    if args.only != "inference":
        report = bench_side_by_side(root, workers=args.workers, device=device,
                                    repeats=args.repeats, seconds=args.step_seconds,
                                    plain_steps=args.plain_steps)
        if not args.json:
            print_side_by_side(report, console)
            if not args.skip_steps:
                print_steps(step_speeds(device, args.step_seconds), console)
            print_data(decode_vs_cache(root, workers=args.workers), console, source=source)
    report.update(frames=source, host=machine)
    if args.only != "training":
        files = bench_files(root, max(args.inference_frames, args.predict_files))
        exp = inference_experiment(root, frame_size=read_photo(files[0]).shape[:2],
                                   device=str(device))
        report["inference"] = bench_inference(
            exp, files, frames=args.inference_frames, repeats=args.inference_repeats,
            predict_count=args.predict_files, out=Path("runs/bench/predict"),
            engines=tuple(dict.fromkeys(args.inference_engines)),
            modes=tuple(dict.fromkeys(args.inference_modes)))
        if not args.json:
            print_inference(report["inference"], console)
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
