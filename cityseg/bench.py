"""Benchmarks (`make bench`, `python -m cityseg.bench [--json]`): is cityseg fast, and why?

One run, on the same frames, model, batch and machine:
- end to end: cityseg's real trainer and data path (decode cache, augmentations in workers,
  metrics, MLflow logging), as configured and with trainer.compile, against a plain PyTorch
  loop written the way the original script trained (PIL decode and PIL transforms in
  __getitem__, fp32, NCHW, a .item() every step), alternated, with the median and spread of
  each and their ratio;
- the bare training step (random tensors, bf16 + channels_last; eager and compiled) the
  trainer should approach, timed in every repeat beside the end-to-end runs;
- model FLOPs per image (torch's flop counter), the device's measured matmul peak in the same
  precision, and the model FLOP utilisation (MFU) of the bare step and of the end-to-end run;
- the data path's ceiling: images/s the DataLoader alone delivers, and which one bounds training;
- end to end with the augmentations batched on the training device (data.augment_on: device).
Then the older tables: training step by precision and layout, and decoding vs the cache.

Figures, not asserts. Everything it needs is generated (synthetic 2048x1024 streets under
runs/bench/); --cityscapes ROOT uses real frames.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from cityseg.config import load_experiment
from cityseg.data.cache import load_or_build
from cityseg.data.datasets import (
    CachedReader,
    DataParams,
    DiskReader,
    SegmentationDataset,
    task_lut,
)
from cityseg.data.layouts import index_dataset
from cityseg.data.synthetic import ensure_dataset
from cityseg.data.transforms import build_augmentations
from cityseg.engine.environment import cpu_has_native_bf16, resolve_device
from cityseg.losses import WeightedBCE
from cityseg.models.unet import UNet
from cityseg.registry import BuildContext


class StepTimer:
    """Forward + backward + AdamW on random data at one shape, precision and layout: built
    (and torch.compile'd if asked) once, warmed up, then timed as often as wanted."""

    def __init__(self, model_kw: dict, *, size: tuple[int, int], batch: int,
                 device: torch.device, amp: torch.dtype | None, channels_last: bool,
                 compile: bool = False) -> None:
        torch.manual_seed(0)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = UNet(**model_kw).to(device, memory_format=memory_format)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.model = torch.compile(model) if compile else model
        self.loss_fn = WeightedBCE(pos_weight=2.0, ignore_index=255).to(device)
        self.x = torch.randn(batch, 3, *size, device=device).contiguous(
            memory_format=memory_format)
        self.y = torch.randint(0, 2, (batch, *size), device=device)
        self.amp, self.device = amp, device
        for _ in range(2):  # warm-up: allocator, kernel selection, compilation
            self._step()

    def _step(self) -> None:
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            logits = self.model(self.x)
        loss = self.loss_fn(logits, self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def images_per_s(self, seconds: float) -> float:
        """Training images per second over at least `seconds` (and at least 2 steps)."""
        self._sync()
        steps, start = 0, time.perf_counter()
        while steps < 2 or time.perf_counter() - start < seconds:
            self._step()
            self._sync()
            steps += 1
        return steps * len(self.x) / (time.perf_counter() - start)


def time_loader(dataset: SegmentationDataset, *, workers: int, epochs: int) -> float:
    """Images per second through a DataLoader (decode or cache read, task labels, augmentation)."""
    loader = DataLoader(dataset, batch_size=4, num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:  # warm-up epoch: worker start, page cache
        break
    start = time.perf_counter()
    for _ in range(epochs):
        for _ in loader:
            pass
    return epochs * len(dataset) / (time.perf_counter() - start)


def bench_data(root: Path, *, workers: int, console: Console, source: str) -> None:
    """2048x1024 PNGs to 256x512 with the baseline augmentations: decoding each time vs
    the cache."""
    size = (256, 512)
    index = index_dataset(root, splits=("train",))
    samples = index.samples["train"]
    ctx = BuildContext(task="binary", out_channels=1, ignore_index=255, image_size=size)
    baseline = load_experiment(Path(__file__).parents[1] / "experiments" / "baseline.yaml")
    augment = build_augmentations(baseline.augment, ctx)
    lut = task_lut(DataParams())
    args = {"layout": index.layout, "encoding": index.encoding, "size": size}
    disk = SegmentationDataset(DiskReader(samples, **args), lut=lut, transform=augment)
    uncached = time_loader(disk, workers=workers, epochs=1)
    cache_dir = Path("runs/bench/cache")
    shutil.rmtree(cache_dir, ignore_errors=True)
    start = time.perf_counter()
    decoded = load_or_build(samples, cache_dir=cache_dir, workers=max(1, workers), **args)
    build_s = time.perf_counter() - start
    cached = time_loader(SegmentationDataset(CachedReader(decoded), lut=lut, transform=augment),
                         workers=workers, epochs=3)
    table = Table(title=f"training data path: {source}, {len(samples)} frames -> 256x512, "
                        f"baseline augmentations, {workers} workers")
    for column in ("", "images/s"):
        table.add_column(column, justify="right")
    table.add_row("decode PNGs every epoch", f"{uncached:.1f}")
    table.add_row(f"cache (built once in {build_s:.1f} s), epoch 2 on", f"{cached:.1f}")
    table.add_row("speed-up", f"{cached / uncached:.1f}x")
    console.print(table)


def bench_steps(device: torch.device, seconds: float, console: Console) -> None:
    """Training-step speed of the quickstart and baseline U-Nets by precision and memory layout."""
    table = Table(title="training step (forward + backward + AdamW), images/s")
    for column in ("model", "input", "batch", "fp32", "fp32 NHWC", "bf16 NHWC"):
        table.add_column(column, justify="right")
    on_cpu = device.type == "cpu"
    configs = [("quickstart d3 b16", dict(depth=3, base_channels=16), (96, 192), 16),
               ("baseline d4 b32", dict(depth=4, base_channels=32), (256, 512),
                4 if on_cpu else 16)]
    for label, kw, size, batch in configs:
        model_kw = dict(in_channels=3, out_channels=1, norm="batch", upsample="transpose",
                        dropout=0.0, **kw)
        speeds = [StepTimer(model_kw, size=size, batch=batch, device=device, amp=amp,
                            channels_last=cl).images_per_s(seconds)
                  for amp, cl in ((None, False), (None, True), (torch.bfloat16, True))]
        table.add_row(label, f"{size[0]}x{size[1]}", str(batch), *(f"{s:.1f}" for s in speeds))
    console.print(table)


# ---------------------------------------------------------------- end to end, side by side

BASELINE_SHAPE = {"image_size": [256, 512], "depth": 4, "base_channels": 32, "batch": 8}
SCHEMA_VERSION = 1  # of --json; README "Performance" documents it


def bench_experiment(root: Path, *, workers: int, device: str):
    """The baseline experiment at the baseline shape on the bench frames: cityseg as used."""
    shape = BASELINE_SHAPE
    return load_experiment(Path(__file__).parents[1] / "experiments" / "baseline.yaml", [
        f"data.root={root}", "data.layout=official", f"data.image_size={shape['image_size']}",
        f"data.batch_size={shape['batch']}", f"data.num_workers={workers}",
        "data.cache_dir=runs/bench/cache-e2e", f"model.depth={shape['depth']}",
        f"model.base_channels={shape['base_channels']}", "trainer.epochs=2",
        f"trainer.device={device}", "trainer.checkpoint_minutes=0", "tracking.dir=runs/bench/runs",
        "tracking.log_model=false", "tracking.experiment=bench"])


def end_to_end(exp) -> float:
    """Training images/s of cityseg's second epoch (the first warms up): real trainer, loader,
    cache, augmentations, validation, metrics and MLflow logging around it."""
    from cityseg.engine.runner import run

    return run(exp).metrics["throughput/img_s"]


class PlainFrames(torch.utils.data.Dataset):
    """The original script's data path: PIL decode and PIL transforms in __getitem__."""

    def __init__(self, samples, size: tuple[int, int], lut) -> None:
        from torchvision import transforms

        self.samples, self.size, self.lut = samples, size, lut
        self.jitter = transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        import random

        import numpy as np
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        from cityseg.engine.predictor import MEAN, STD

        image = Image.open(self.samples[i].image).convert("RGB")
        mask = Image.open(self.samples[i].mask)
        if random.random() < 0.5:
            image, mask = TF.hflip(image), TF.hflip(mask)
        angle = random.uniform(-10, 10)
        image = TF.rotate(image, angle, interpolation=InterpolationMode.BILINEAR)
        mask = TF.rotate(mask, angle, interpolation=InterpolationMode.NEAREST, fill=0)
        image = self.jitter(image)
        image = TF.resize(image, list(self.size), InterpolationMode.BILINEAR)
        mask = TF.resize(mask, list(self.size), InterpolationMode.NEAREST)
        x = TF.normalize(TF.to_tensor(image), MEAN, STD)
        return x, torch.from_numpy(self.lut[np.asarray(mask)].astype(np.int64))


def plain_loop(root: Path, *, workers: int, device: torch.device, steps: int) -> float:
    """Training images/s of a plain loop the way the original script trained: fp32, NCHW,
    `loss.item()` after every step, same model, batch and frames as cityseg's."""
    from cityseg.data.cityscapes import id_to_train_id_lut
    from cityseg.data.tasks import TASKS

    shape = BASELINE_SHAPE
    index = index_dataset(root, splits=("train",))
    foreground = load_experiment(Path(__file__).parents[1] / "experiments" /
                                 "baseline.yaml").data.foreground
    lut = TASKS["binary"].lut(foreground)[id_to_train_id_lut()]
    dataset = PlainFrames(index.samples["train"], tuple(shape["image_size"]), lut)
    loader = DataLoader(dataset, batch_size=shape["batch"], shuffle=True, num_workers=workers,
                        drop_last=True, persistent_workers=workers > 0)
    torch.manual_seed(0)
    model = UNet(in_channels=3, out_channels=1, depth=shape["depth"],
                 base_channels=shape["base_channels"], norm="batch", upsample="transpose",
                 dropout=0.0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = WeightedBCE(pos_weight=5.0, ignore_index=255).to(device)

    def batches():
        while True:
            yield from loader

    seen, start, total = 0, 0.0, 0.0
    for n, (x, y) in enumerate(batches()):
        if n == 1:  # the first step warms up: worker start, allocator, kernel choice
            seen, start = 0, time.perf_counter()
        if n == steps + 1:
            break
        loss = loss_fn(model(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item()  # what the script printed: a host sync every step
        seen += len(x)
    return seen / (time.perf_counter() - start)


def model_flops(device: torch.device) -> dict[str, float]:
    """FLOPs per image of the baseline U-Net, forward and forward + backward, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = BASELINE_SHAPE
    model = UNet(in_channels=3, out_channels=1, depth=shape["depth"],
                 base_channels=shape["base_channels"], norm="batch", upsample="transpose",
                 dropout=0.0).to(device)
    x = torch.randn(2, 3, *shape["image_size"], device=device)
    with FlopCounterMode(display=False) as forward:
        model(x)
    with FlopCounterMode(display=False) as both:
        model(x).sum().backward()
    return {"forward": forward.get_total_flops() / len(x),
            "forward_backward": both.get_total_flops() / len(x)}


def matmul_peak(device: torch.device, dtype: torch.dtype | None, n: int = 2048,
                seconds: float = 2.0) -> float:
    """Measured FLOP/s of a square matmul in the training precision (the device's practical
    peak for the work a convolution becomes)."""
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    for _ in range(2):
        a @ b
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return done * 2 * n**3 / (time.perf_counter() - start)


def loader_ceiling(exp) -> float:
    """Images/s the training DataLoader alone delivers (cache, augmentations, workers)."""
    from cityseg.engine.display import NullDisplay
    from cityseg.engine.runner import build_data

    splits = build_data(exp, NullDisplay())
    loader = DataLoader(splits.train, batch_size=exp.data.batch_size, shuffle=True,
                        num_workers=exp.data.num_workers,
                        persistent_workers=exp.data.num_workers > 0)
    for _ in loader:  # warm-up epoch: worker start
        pass
    start, seen = time.perf_counter(), 0
    for _ in range(3):
        for images, _ in loader:
            seen += len(images)
    return seen / (time.perf_counter() - start)


def _spread(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "runs": [round(v, 3) for v in values]}


def bench_side_by_side(root: Path, *, workers: int, device: torch.device, repeats: int,
                       seconds: float, plain_steps: int, console: Console | None) -> dict:
    """cityseg end to end (as configured, and compiled) vs the plain loop, alternated, each
    repeat also timing the bare step (eager and compiled) so that every ratio compares figures
    taken minutes, not a run, apart; then FLOPs, MFU, the data ceiling, device augmentation."""
    from cityseg.engine.environment import resolve_precision

    exp = bench_experiment(root, workers=workers, device=str(device))
    compiled = exp.model_copy(update={"trainer": exp.trainer.model_copy(
        update={"compile": True})})
    amp = resolve_precision(exp.trainer.precision, device)
    shape = BASELINE_SHAPE
    model_kw = dict(in_channels=3, out_channels=1, norm="batch", upsample="transpose",
                    dropout=0.0, depth=shape["depth"], base_channels=shape["base_channels"])
    steps = [StepTimer(model_kw, size=tuple(shape["image_size"]), batch=shape["batch"],
                       device=device, amp=amp, channels_last=exp.trainer.channels_last,
                       compile=compile) for compile in (False, True)]
    ours, fused, plain, bare, bare_compiled = [], [], [], [], []
    for _ in range(repeats):
        ours.append(end_to_end(exp))
        fused.append(end_to_end(compiled))  # the first epoch compiles, the second is timed
        plain.append(plain_loop(root, workers=workers, device=device, steps=plain_steps))
        bare.append(steps[0].images_per_s(seconds))
        bare_compiled.append(steps[1].images_per_s(seconds))
    bare, bare_compiled = statistics.median(bare), statistics.median(bare_compiled)
    on_device = exp.model_copy(update={"data": exp.data.model_copy(
        update={"augment_on": "device"})})
    device_augment = end_to_end(on_device)
    flops = model_flops(device)
    peak = matmul_peak(device, amp)
    ceiling = loader_ceiling(exp)
    e2e, e2e_compiled = _spread(ours), _spread(fused)
    per_image = flops["forward_backward"]
    report = {
        "schema": SCHEMA_VERSION,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "precision": str(amp).removeprefix("torch.") if amp else "fp32",
        "channels_last": exp.trainer.channels_last, "shape": shape, "workers": workers,
        "end_to_end": {"images_per_s": e2e},
        "plain_loop": {"images_per_s": _spread(plain)},
        "speedup": e2e["median"] / statistics.median(plain),
        "bare_step": {"images_per_s": bare},
        "end_to_end_vs_bare_step": e2e["median"] / bare,
        "flops_per_image": flops,
        "matmul_peak_flops": peak,
        "mfu": {"bare_step": bare * per_image / peak,
                "end_to_end": e2e["median"] * per_image / peak},
        "data_loader": {"images_per_s": ceiling},
        "augment_on": {"workers": e2e["median"], "device": device_augment},
        "bound_by": "data" if ceiling < bare else "model",
        "compiled": {  # the same with trainer.compile: true (torch.compile)
            "end_to_end": {"images_per_s": e2e_compiled},
            "speedup": e2e_compiled["median"] / statistics.median(plain),
            "bare_step": {"images_per_s": bare_compiled},
            "end_to_end_vs_bare_step": e2e_compiled["median"] / bare_compiled,
            "mfu": {"bare_step": bare_compiled * per_image / peak,
                    "end_to_end": e2e_compiled["median"] * per_image / peak}},
    }
    if console is not None:
        print_side_by_side(report, console)
    return report


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    args = parser.parse_args()
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
                                seconds=args.step_seconds, plain_steps=args.plain_steps,
                                console=None if args.json else console)
    report["frames"] = source
    if args.json:
        print(json.dumps(report, indent=2))
        return
    if not args.skip_steps:
        bench_steps(device, args.step_seconds, console)
    bench_data(root, workers=args.workers, console=console, source=source)


if __name__ == "__main__":
    main()
