"""`python -m cityseg.bench [--json]` (`make bench`): the side by side, then the older tables."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console

import cityseg.bench
from cityseg.bench.data import decode_vs_cache
from cityseg.bench.report import print_data, print_side_by_side, print_steps
from cityseg.bench.steps import step_speeds
from cityseg.bench.training import bench_side_by_side
from cityseg.data.synthetic import ensure_dataset
from cityseg.engine.environment import cpu_has_native_bf16, resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cityseg.bench",
                                     description=cityseg.bench.__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--step-seconds", type=float, default=6.0,
                        help="seconds each timing of a bare training step lasts")
    parser.add_argument("--plain-steps", type=int, default=4,
                        help="timed steps of the plain loop (slow: fp32, PIL)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternations of cityseg end to end and the plain loop")
    parser.add_argument("--cityscapes", type=Path,
                        help="a Cityscapes copy (official layout) to train on; default: "
                             "synthetic 2048x1024 frames")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--json", action="store_true",
                        help="print the side-by-side report as JSON (README: Performance) and "
                             "skip the older tables")
    parser.add_argument("--skip-steps", action="store_true",
                        help="skip the precision and layout table")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    device = resolve_device(args.device)
    console = Console(highlight=False, stderr=args.json)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    console.print(f"device: {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                  f"native CPU bf16: {cpu_has_native_bf16()}")
    if args.cityscapes:
        root, source = args.cityscapes.resolve(), str(args.cityscapes)
    else:
        root, source = Path("runs/bench/synthetic-2048").resolve(), "synthetic 2048x1024 PNGs"
        # 6 steps an epoch: the per-epoch costs (a new loader iterator, its first batch) weigh
        # as in a real epoch of hundreds of steps only if there are several steps
        ensure_dataset(root, num_train=48, num_val=2, size=(1024, 2048), seed=0)
    report = bench_side_by_side(root, workers=args.workers, device=device, repeats=args.repeats,
                                seconds=args.step_seconds, plain_steps=args.plain_steps)
    report["frames"] = source
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print_side_by_side(report, console)
    if not args.skip_steps:
        print_steps(step_speeds(device, args.step_seconds), console)
    print_data(decode_vs_cache(root, workers=args.workers), console, source=source)


if __name__ == "__main__":
    main()
