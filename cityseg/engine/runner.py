"""run(experiment): config -> components -> trainer -> tracking.

Components are built (and data located or generated) before the MLflow run opens, so a
missing dataset fails without leaving an empty run behind. Once open, the run always ends:
FINISHED, FAILED if training raised, KILLED on Ctrl-C.
"""

from __future__ import annotations

import platform
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import cityseg
from cityseg import tracking, viz
from cityseg.config import Experiment, flatten, to_yaml
from cityseg.data.cityscapes import IGNORE_INDEX
from cityseg.data.transforms import build_augmentations
from cityseg.engine.trainer import FitResult, Trainer, TrainerSettings
from cityseg.errors import ConfigError
from cityseg.registry import DATASETS, LOSSES, MODELS, OPTIMIZERS, SCHEDULERS, BuildContext


@dataclass
class RunResult:
    run_id: str
    metrics: dict[str, float]  # the last epoch's
    best_epoch: int
    best_score: float
    checkpoints: dict[str, Path]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device: {name!r} asked for, but CUDA is not available on this machine")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def _loader(dataset: Dataset, *, batch_size: int, shuffle: bool, num_workers: int, seed: int,
            device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _tags(device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, str]:
    import torchvision

    return {"git_commit": _git_commit(), "cityseg_version": cityseg.__version__,
            "torch_version": torch.__version__, "torchvision_version": torchvision.__version__,
            "mlflow_version": tracking.mlflow_version(), "python_version": platform.python_version(),
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "precision": "bf16" if amp_dtype else "fp32"}


def run(exp: Experiment, *, display=None) -> RunResult:
    """Train the experiment and track it in MLflow; returns the final metrics."""
    seed_everything(exp.seed)
    device = resolve_device(exp.trainer.device)
    amp_dtype = resolve_precision(exp.trainer.precision, device)
    ctx = BuildContext(out_channels=1, ignore_index=IGNORE_INDEX, image_size=exp.data.image_size)

    splits = DATASETS.build(exp.data, ctx, train_transform=build_augmentations(exp.augment, ctx))
    loader_args = {"batch_size": exp.data.batch_size, "num_workers": exp.data.num_workers,
                   "seed": exp.seed, "device": device}
    train_loader = _loader(splits.train, shuffle=True, **loader_args)
    val_loader = _loader(splits.val, shuffle=False, **loader_args)
    sample_ids = range(min(exp.tracking.num_samples, len(splits.val)))
    samples = None
    if sample_ids:
        pairs = [splits.val[i] for i in sample_ids]
        samples = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))

    model = MODELS.build(exp.model, ctx)
    loss_fn = LOSSES.build(exp.loss, ctx)
    optimizer = OPTIMIZERS.build(exp.optimizer, model)
    scheduler = SCHEDULERS.build(exp.scheduler, optimizer, steps_per_epoch=len(train_loader),
                                 epochs=exp.trainer.epochs)

    tracker = tracking.Tracker(root=exp.tracking.dir, experiment=exp.tracking.experiment)
    run_id = tracker.start(run_name=exp.name, tags=_tags(device, amp_dtype))
    status = "FAILED"
    settings = TrainerSettings(
        epochs=exp.trainer.epochs, device=device, amp_dtype=amp_dtype,
        channels_last=exp.trainer.channels_last, grad_clip_norm=exp.trainer.grad_clip_norm,
        threshold=exp.trainer.threshold, monitor=exp.trainer.monitor,
        checkpoint_dir=exp.tracking.dir / "checkpoints" / run_id)

    def on_epoch_end(epoch: int, metrics: dict[str, float], sample_arrays) -> None:
        tracker.log_metrics(metrics, step=epoch)
        if sample_arrays is not None:
            tracker.log_image(viz.sample_panel(*sample_arrays), f"samples/epoch_{epoch:03d}.png")

    trainer = Trainer(model=model, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
                      train_loader=train_loader, val_loader=val_loader, settings=settings,
                      config=exp.model_dump(mode="json"), samples=samples,
                      on_epoch_end=on_epoch_end, display=display)
    result: FitResult | None = None
    try:
        tracker.log_params(flatten(exp.model_dump(mode="json")))
        tracker.log_text(to_yaml(exp), "config.yaml")
        tracker.set_tags({"train_images": str(len(splits.train)), "val_images": str(len(splits.val))})
        result = trainer.fit()
        tracker.set_tags({"best_epoch": str(result.best_epoch)})
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        for path in settings.checkpoint_dir.glob("*.pt"):  # whatever was saved, even on failure
            tracker.log_file(path, "checkpoints")
        tracker.end(status)
    return RunResult(run_id=run_id, metrics=result.history[-1], best_epoch=result.best_epoch,
                     best_score=result.best_score, checkpoints=result.checkpoints)
