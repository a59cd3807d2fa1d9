"""Datasets: `data check` (layout, counts, class frequencies, broken samples) and `data synth`."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from cityseg.cli.parser import EXIT_USAGE
from cityseg.errors import CitysegError


def cmd_data(args: argparse.Namespace, out: Console) -> int:
    if args.data_command == "synth":
        return _synth(args, out)
    from cityseg.data.check import check_dataset

    report = check_dataset(args.root, layout=args.layout, splits=tuple(args.splits),
                           workers=args.workers)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, out)
    return EXIT_USAGE if report["broken"] else 0


def _synth(args: argparse.Namespace, out: Console) -> int:
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
