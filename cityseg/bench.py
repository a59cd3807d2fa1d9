"""Benchmarks (`make bench`): training-step speed by precision and layout, and the data path.

Figures, not asserts: run it on the machine you care about and compare. Everything it needs
is generated (synthetic streets under runs/bench/); pass --cityscapes ROOT to time decoding
real 2048x1024 frames too.
"""

from __future__ import annotations

import argparse
import shutil
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


def time_steps(model_kw: dict, *, size: tuple[int, int], batch: int, device: torch.device,
               amp: torch.dtype | None, channels_last: bool, steps: int) -> float:
    """Training images per second of forward + backward + AdamW step on random data."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = UNet(**model_kw).to(device, memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = WeightedBCE(pos_weight=2.0, ignore_index=255).to(device)
    x = torch.randn(batch, 3, *size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 2, (batch, *size), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):  # warm-up: allocator, kernel selection
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


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


def bench_steps(device: torch.device, steps_arg: int, console: Console) -> None:
    """Training-step speed of the quickstart and baseline U-Nets by precision and memory layout."""
    table = Table(title="training step (forward + backward + AdamW), images/s")
    for column in ("model", "input", "batch", "fp32", "fp32 NHWC", "bf16 NHWC"):
        table.add_column(column, justify="right")
    on_cpu = device.type == "cpu"
    configs = [("quickstart d3 b16", dict(depth=3, base_channels=16), (96, 192), 16, steps_arg),
               ("baseline d4 b32", dict(depth=4, base_channels=32), (256, 512), 4 if on_cpu else 16,
                max(2, steps_arg // 4) if on_cpu else steps_arg)]
    for label, kw, size, batch, steps in configs:
        model_kw = dict(in_channels=3, out_channels=1, norm="batch", upsample="transpose",
                        dropout=0.0, **kw)
        speeds = [time_steps(model_kw, size=size, batch=batch, device=device, amp=amp,
                             channels_last=cl, steps=steps)
                  for amp, cl in ((None, False), (None, True), (torch.bfloat16, True))]
        table.add_row(label, f"{size[0]}x{size[1]}", str(batch), *(f"{s:.1f}" for s in speeds))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cityscapes", type=Path,
                        help="a Cityscapes copy (any layout) for the data path; "
                             "default: synthetic 2048x1024 frames")
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader workers for the data path")
    parser.add_argument("--skip-steps", action="store_true", help="only the data path")
    args = parser.parse_args()
    device = resolve_device(args.device)
    console = Console(highlight=False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    console.print(f"device: {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                  f"native CPU bf16: {cpu_has_native_bf16()}")

    if not args.skip_steps:
        bench_steps(device, args.steps, console)
    if args.cityscapes:
        bench_data(args.cityscapes, workers=args.workers, console=console,
                   source=str(args.cityscapes))
    else:
        root = Path("runs/bench/synthetic-2048")
        ensure_dataset(root, num_train=12, num_val=1, size=(1024, 2048), seed=0)
        bench_data(root, workers=args.workers, console=console, source="synthetic 2048x1024 PNGs")


if __name__ == "__main__":
    main()
