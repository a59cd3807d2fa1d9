"""Benchmarks (`make bench`): training-step speed by precision and layout, and the data path.

Figures, not asserts: run it on the machine you care about and compare. Everything it needs
is generated (synthetic streets under runs/bench/); pass --cityscapes ROOT to time decoding
real 2048x1024 frames too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cityseg.data.cityscapes import official_samples
from cityseg.data.datasets import DataParams, SegmentationDataset, task_lut
from cityseg.data.synthetic import ensure_dataset
from cityseg.engine.runner import cpu_has_native_bf16, resolve_device
from cityseg.losses import WeightedBCE
from cityseg.models.unet import UNet


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


def time_dataset(dataset: SegmentationDataset, count: int) -> float:
    """Samples per second through decode, label mapping and resize (one process)."""
    start = time.perf_counter()
    for i in range(count):
        dataset[i % len(dataset)]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cityscapes", type=Path, help="official-layout root to time real PNG decoding")
    args = parser.parse_args()
    device = resolve_device(args.device)
    console = Console(highlight=False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    console.print(f"device: {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                  f"native CPU bf16: {cpu_has_native_bf16()}")

    table = Table(title="training step (forward + backward + AdamW), images/s")
    for column in ("model", "input", "batch", "fp32", "fp32 NHWC", "bf16 NHWC"):
        table.add_column(column, justify="right")
    on_cpu = device.type == "cpu"
    configs = [("quickstart d3 b16", dict(depth=3, base_channels=16), (96, 192), 16, args.steps),
               ("baseline d4 b32", dict(depth=4, base_channels=32), (256, 512), 4 if on_cpu else 16,
                max(2, args.steps // 4) if on_cpu else args.steps)]
    for label, kw, size, batch, steps in configs:
        model_kw = dict(in_channels=3, out_channels=1, norm="batch", upsample="transpose", dropout=0.0, **kw)
        speeds = [time_steps(model_kw, size=size, batch=batch, device=device, amp=amp,
                             channels_last=cl, steps=steps)
                  for amp, cl in ((None, False), (None, True), (torch.bfloat16, True))]
        table.add_row(label, f"{size[0]}x{size[1]}", str(batch), *(f"{s:.1f}" for s in speeds))
    console.print(table)

    table = Table(title="data path (decode + label map + resize, one process), samples/s")
    for column in ("source", "files", "output", "samples/s"):
        table.add_column(column, justify="right")
    root = Path("runs/bench/synthetic")
    ensure_dataset(root, num_train=32, num_val=1, size=(128, 256), seed=0)
    lut = task_lut(DataParams())
    synth = SegmentationDataset(official_samples(root, "train"), size=(96, 192), lut=lut, transform=None)
    table.add_row("synthetic PNG", "128x256", "96x192", f"{time_dataset(synth, 64):.1f}")
    if args.cityscapes:
        real = SegmentationDataset(official_samples(args.cityscapes, "train"), size=(256, 512), lut=lut, transform=None)
        table.add_row("Cityscapes PNG", "1024x2048", "256x512", f"{time_dataset(real, 12):.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
