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


def print_host(h: dict, console: Console) -> None:
    """host.host as one line: the figures below come from this machine."""
    from cityseg.bench.host import describe

    console.print(f"host: {describe(h)}")


ENGINE_LABELS = {"eager": "torch eager", "compiled": "torch.compile", "onnxruntime": "ONNX Runtime"}


def _speed(cell: dict) -> str:
    latency = cell["latency_ms"]
    return f"{cell['frames_per_s']:.3g} ({latency['p50'] / 1000:.1f}/{latency['p95'] / 1000:.1f} s)"


def print_inference(r: dict, console: Console) -> None:
    """inference.bench_inference as a table (an engine per row, a mode per column), MFU and
    predict's end to end against the bare forward pass."""
    height, width = r["frame_size"]
    table = Table(title=f"inference, {height}x{width} frames at batch 1, baseline network (depth "
                        f"{r['model']['depth']}, base {r['model']['base_channels']}); slide: "
                        f"{r['window'][0]}x{r['window'][1]} windows, overlap {r['overlap']:.2g}; "
                        f"frames/s (latency p50 / p95), {r['frames_per_cell']} timed frame(s) a "
                        f"cell")
    for column in ("engine", "precision", *r["modes"]):
        table.add_column(column, justify="right")
    notes = []
    for engine, found in r["engines"].items():
        if found["error"]:
            notes.append(f"{ENGINE_LABELS[engine]}: n/a, {found['error']}")
            table.add_row(ENGINE_LABELS[engine], "", *("n/a" for _ in r["modes"]))
            continue
        cells = found["modes"]
        precisions = sorted({cell["precision"] for cell in cells.values()})
        table.add_row(ENGINE_LABELS[engine], ", ".join(precisions),
                      *(_speed(cells[mode]) for mode in r["modes"]))
    console.print(table)
    if "onnxruntime" in r["engines"]:
        notes.append("ONNX Runtime: whole through the exported graph (cityseg export: resize, "
                     "normalise, network, upsample, mask, fp32); slide through the network alone, "
                     "exported to ONNX, in cityseg's window loop (the graph holds no window loop)")
    for note in notes:
        console.print(note)
    flops, peaks = r["flops_per_frame"], r["matmul_peak_flops"]
    bf16 = (f"{peaks['bf16'] / 1e12:.2f} TFLOP/s" if peaks["bf16"]
            else "not measured (no native bf16)")
    per_mode = ", ".join(f"{mode} {flops[mode] / 1e9:.0f} G ({flops[mode] / flops['whole']:.2f}x "
                         f"whole)" for mode in r["modes"])
    mfu = "; ".join(f"{engine} " + ", ".join(f"{mode} {cell['mfu']:.1%}"
                                             for mode, cell in found["modes"].items()
                                             if cell["mfu"] is not None)
                    for engine, found in r["engines"].items() if not found["error"])
    warmups = ", ".join(f"{ENGINE_LABELS[engine]} {found['warmup_s']:.0f} s"
                        for engine, found in r["engines"].items() if not found["error"])
    console.print(f"warm-up (untimed first call at each shape: kernel choice, compilation, "
                  f"export): {warmups}.")
    console.print(f"network FLOPs per frame: {per_mode}; matmul peak fp32 "
                  f"{peaks['fp32'] / 1e12:.2f} TFLOP/s, bf16 {bf16}.\n"
                  f"MFU (against the peak in each cell's precision): {mfu}.")
    p, bounds = r["predict"], {"decode": "PNG decoding", "model": "model",
                               "write": "writing (mask values, overlay, PNG encoding)"}
    split = p["split_s"]
    console.print(
        f"predict end to end ({p['files']} full-size PNG(s): decode, whole-frame inference, mask "
        f"and overlay PNGs): {p['s_per_frame']:.2f} s a frame ({p['frames_per_s']:.3g} "
        f"frames/s), {p['end_to_end_vs_bare_forward']:.0%} of the bare forward pass "
        f"({p['bare_forward_frames_per_s']:.3g} frames/s); timed apart: decode "
        f"{split['decode']:.2f} s, model {split['model']:.2f} s, write {split['write']:.2f} s "
        f"(sum {p['split_sum_s']:.2f} s): predict is bound by the {bounds[p['bound_by']]}.")
