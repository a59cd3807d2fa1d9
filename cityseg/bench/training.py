"""Training end to end, side by side: cityseg as used against a plain PyTorch loop written the
way the original script trained, alternated, with the bare step timed in every repeat."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cityseg.bench.baseline import BASELINE_FILE, BASELINE_SHAPE, BASELINE_UNET
from cityseg.bench.data import loader_ceiling
from cityseg.bench.steps import StepTimer, matmul_peak, model_flops
from cityseg.config import Experiment, load_experiment
from cityseg.data.layouts import index_dataset
from cityseg.losses import WeightedBCE
from cityseg.models.unet import UNet

SCHEMA_VERSION = 1  # of --json; docs/performance.md documents it


def bench_experiment(root: Path, *, workers: int, device: str) -> Experiment:
    """The baseline experiment at the baseline shape on the bench frames: cityseg as used."""
    shape = BASELINE_SHAPE
    return load_experiment(BASELINE_FILE, [
        f"data.root={root}", "data.layout=official", f"data.image_size={shape['image_size']}",
        f"data.batch_size={shape['batch']}", f"data.num_workers={workers}",
        "data.cache_dir=runs/bench/cache-e2e", f"model.depth={shape['depth']}",
        f"model.base_channels={shape['base_channels']}", "trainer.epochs=2",
        f"trainer.device={device}", "trainer.checkpoint_minutes=0", "tracking.dir=runs/bench/runs",
        "tracking.log_model=false", "tracking.experiment=bench"])


def end_to_end(exp: Experiment) -> float:
    """Training images/s of cityseg's second epoch (the first warms up): real trainer, loader,
    cache, augmentations, validation, metrics and MLflow logging around it."""
    from cityseg.train.runner import run

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

        from cityseg.models.encoders import IMAGENET_MEAN, IMAGENET_STD

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
        x = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
        return x, torch.from_numpy(self.lut[np.asarray(mask)].astype(np.int64))


def plain_loop(root: Path, *, workers: int, device: torch.device, steps: int) -> float:
    """Training images/s of a plain loop the way the original script trained: fp32, NCHW,
    `loss.item()` after every step, same model, batch and frames as cityseg's."""
    from cityseg.data.cityscapes import id_to_train_id_lut
    from cityseg.data.tasks import TASKS

    shape = BASELINE_SHAPE
    index = index_dataset(root, splits=("train",))
    foreground = load_experiment(BASELINE_FILE).data.foreground
    lut = TASKS["binary"].lut(foreground)[id_to_train_id_lut()]
    dataset = PlainFrames(index.samples["train"], tuple(shape["image_size"]), lut)
    loader = DataLoader(dataset, batch_size=shape["batch"], shuffle=True, num_workers=workers,
                        drop_last=True, persistent_workers=workers > 0)
    torch.manual_seed(0)
    model = UNet(**BASELINE_UNET).to(device)
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


def _spread(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "runs": [round(v, 3) for v in values]}


def bench_side_by_side(root: Path, *, workers: int, device: torch.device, repeats: int,
                       seconds: float, plain_steps: int) -> dict:
    """cityseg end to end (as configured, and compiled) vs the plain loop, alternated, each
    repeat also timing the bare step (eager and compiled) so that every ratio compares figures
    taken minutes, not a run, apart; then FLOPs, MFU, the data ceiling, device augmentation."""
    from cityseg.runtime.device import resolve_precision

    exp = bench_experiment(root, workers=workers, device=str(device))
    compiled = exp.model_copy(update={"trainer": exp.trainer.model_copy(
        update={"compile": True})})
    amp = resolve_precision(exp.trainer.precision, device)
    steps = [StepTimer(BASELINE_UNET, size=tuple(BASELINE_SHAPE["image_size"]),
                       batch=BASELINE_SHAPE["batch"], device=device, amp=amp,
                       channels_last=exp.trainer.channels_last, compile=compile)
             for compile in (False, True)]
    ours, fused, plain, bare, bare_compiled = [], [], [], [], []
    for _ in range(repeats):
        ours.append(end_to_end(exp))
        fused.append(end_to_end(compiled))  # the first epoch compiles, the second is timed
        plain.append(plain_loop(root, workers=workers, device=device, steps=plain_steps))
        bare.append(steps[0].images_per_s(seconds))
        bare_compiled.append(steps[1].images_per_s(seconds))
    on_device = exp.model_copy(update={"data": exp.data.model_copy(
        update={"augment_on": "device"})})
    device_augment = end_to_end(on_device)
    flops = model_flops(device)
    peak = matmul_peak(device, amp)
    ceiling = loader_ceiling(exp)
    return side_by_side_report(
        exp, device=device, amp=amp, workers=workers, ours=ours, fused=fused, plain=plain,
        bare=statistics.median(bare), bare_compiled=statistics.median(bare_compiled),
        device_augment=device_augment, flops=flops, peak=peak, ceiling=ceiling)


def side_by_side_report(exp: Experiment, *, device: torch.device, amp: torch.dtype | None,
                        workers: int, ours: list[float], fused: list[float], plain: list[float],
                        bare: float, bare_compiled: float, device_augment: float,
                        flops: dict[str, float], peak: float, ceiling: float) -> dict:
    """The figures as the --json report (schema SCHEMA_VERSION): ratios, MFU, what bounds it."""
    e2e, e2e_compiled = _spread(ours), _spread(fused)
    per_image = flops["forward_backward"]
    return {
        "schema": SCHEMA_VERSION,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "precision": str(amp).removeprefix("torch.") if amp else "fp32",
        "channels_last": exp.trainer.channels_last, "shape": BASELINE_SHAPE, "workers": workers,
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
