"""The figures as tables and sentences (the --json report is the side-by-side dict itself)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_side_by_side(r: dict, console: Console) -> None:
    shape = r["shape"]
    table = Table(title=f"end to end, baseline shape ({shape['image_size'][0]}x"
                        f"{shape['image_size'][1]}, depth {shape['depth']}, base "
                        f"{shape['base_channels']}, batch {shape['batch']}), training images/s")
    for column in ("", "median", "min", "max"):
        table.add_column(column, justify="right")
    ours = f"cityseg ({r['precision']}, {'channels_last' if r['channels_last'] else 'NCHW'}"
    for label, v in ((f"{ours})", r["end_to_end"]["images_per_s"]),
                     (f"{ours}, trainer.compile)", r["compiled"]["end_to_end"]["images_per_s"]),
                     ("plain loop (PIL, fp32, NCHW, .item())", r["plain_loop"]["images_per_s"])):
        table.add_row(label, f"{v['median']:.2f}", f"{v['min']:.2f}", f"{v['max']:.2f}")
    console.print(table)
    flops, c = r["flops_per_image"], r["compiled"]
    console.print(
        f"cityseg is {r['speedup']:.1f}x the plain loop; it runs at "
        f"{r['end_to_end_vs_bare_step']:.0%} of the bare {r['precision']} step "
        f"({r['bare_step']['images_per_s']:.2f} images/s).\n"
        f"with trainer.compile: true, cityseg is {c['speedup']:.1f}x the plain loop, at "
        f"{c['end_to_end_vs_bare_step']:.0%} of the compiled bare step "
        f"({c['bare_step']['images_per_s']:.2f} images/s).\n"
        f"model: {flops['forward'] / 1e9:.1f} GFLOP forward, "
        f"{flops['forward_backward'] / 1e9:.1f} GFLOP forward + backward per image; matmul peak "
        f"{r['matmul_peak_flops'] / 1e12:.2f} TFLOP/s ({r['precision']}); MFU "
        f"{r['mfu']['bare_step']:.0%} (bare step), {r['mfu']['end_to_end']:.0%} (end to end); "
        f"compiled {c['mfu']['bare_step']:.0%} and {c['mfu']['end_to_end']:.0%}.\n"
        f"data path alone: {r['data_loader']['images_per_s']:.1f} images/s with "
        f"{r['workers']} workers against the step's {r['bare_step']['images_per_s']:.2f}: "
        + ("training is bound by the model (the data path keeps up)." if r["bound_by"] == "model"
           else "training is bound by the data path: the device waits for data.")
        + f"\naugmentations in {r['workers']} DataLoader workers: "
          f"{r['augment_on']['workers']:.2f} images/s end to end; on the training device "
          f"(data.augment_on: device): {r['augment_on']['device']:.2f}.")


def print_steps(rows: list[dict], console: Console) -> None:
    """steps.step_speeds as a table: a row per model, a column per precision and layout."""
    table = Table(title="training step (forward + backward + AdamW), images/s")
    for column in ("model", "input", "batch", "fp32", "fp32 NHWC", "bf16 NHWC"):
        table.add_column(column, justify="right")
    for row in rows:
        size = row["size"]
        table.add_row(row["model"], f"{size[0]}x{size[1]}", str(row["batch"]),
                      *(f"{s:.1f}" for s in row["images_per_s"]))
    console.print(table)


def print_data(d: dict, console: Console, *, source: str) -> None:
    """data.decode_vs_cache as a table."""
    table = Table(title=f"training data path: {source}, {d['frames']} frames -> 256x512, "
                        f"baseline augmentations, {d['workers']} workers")
    for column in ("", "images/s"):
        table.add_column(column, justify="right")
    table.add_row("decode PNGs every epoch", f"{d['decode']:.1f}")
    table.add_row(f"cache (built once in {d['cache_build_s']:.1f} s), epoch 2 on",
                  f"{d['cache']:.1f}")
    table.add_row("speed-up", f"{d['cache'] / d['decode']:.1f}x")
    console.print(table)
