"""The training loop: one story from batch to checkpoint.

Everything per step stays on the device: the loss is summed into a device tensor, predictions
go into a device confusion matrix, and the host synchronises once per epoch (plus a cheap
loss read for the progress bar at most twice a second).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cityseg.data.cityscapes import IGNORE_INDEX
from cityseg.engine.display import NullDisplay
from cityseg.metrics import BoundaryF1, ConfusionMatrix, boundary_f1, predict, scores

# ImageNet statistics: the usual choice, and harmless for a network trained from scratch.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PROGRESS_REFRESH_S = 0.5


@dataclass(frozen=True)
class TrainerSettings:
    task: str  # binary | multiclass
    num_classes: int  # of the confusion matrix: 2 for binary
    class_names: tuple[str, ...]
    epochs: int
    device: torch.device
    amp_dtype: torch.dtype | None  # None: plain fp32
    channels_last: bool
    grad_clip_norm: float
    threshold: float
    boundary_tolerance: int
    monitor: str
    checkpoint_dir: Path


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_score: float
    checkpoints: dict[str, Path]


EpochCallback = Callable[[int, dict[str, float], np.ndarray | None], None]


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    """Trains a segmentation model for a number of epochs and keeps best and last checkpoints."""

    def __init__(self, *, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, train_loader: DataLoader,
                 val_loader: DataLoader, settings: TrainerSettings, config: dict,
                 samples: tuple[torch.Tensor, torch.Tensor] | None = None,
                 on_epoch_end: EpochCallback | None = None, display=None) -> None:
        self.s = settings
        self.device = settings.device
        memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.memory_format = memory_format
        self.model = model.to(self.device, memory_format=memory_format)
        self.loss_fn = loss_fn.to(self.device)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.config = config  # the resolved experiment, saved inside every checkpoint
        self.samples = samples  # fixed validation images for the per-epoch panel
        self.on_epoch_end = on_epoch_end
        self.display = display or NullDisplay()
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1) * 255
        self.minimize = settings.monitor.endswith("loss")
        self.confusion: torch.Tensor | None = None  # of the last validation

    def _inputs(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 batch -> normalised float images (channels_last) and long masks on the device."""
        images = images.to(self.device, non_blocking=True)
        masks = masks.to(self.device, non_blocking=True).long()  # (B, H, W)
        x = (images.float() - self.mean) / self.std  # (B, 3, H, W)
        return x.contiguous(memory_format=self.memory_format), masks

    def _autocast(self):
        if self.s.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.s.amp_dtype)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        total_loss = torch.zeros((), device=self.device)
        seen, last_refresh, start = 0, 0.0, time.perf_counter()
        self.display.epoch_start(epoch, self.s.epochs, len(self.train_loader))
        for images, masks in self.train_loader:
            x, y = self._inputs(images, masks)
            with self._autocast():
                logits = self.model(x)
            loss = self.loss_fn(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.s.grad_clip_norm > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.s.grad_clip_norm)
            self.optimizer.step()
            self.scheduler.step()
            total_loss += loss.detach() * len(images)
            seen += len(images)
            now = time.perf_counter()
            shown = None
            if now - last_refresh > PROGRESS_REFRESH_S:  # a sync at most twice a second
                shown, last_refresh = loss.item(), now
            self.display.step(len(images), shown, seen / max(now - start, 1e-9))
        mean_loss = total_loss.item() / max(seen, 1)  # the epoch's synchronisation point
        elapsed = time.perf_counter() - start
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"training loss is {mean_loss} in epoch {epoch}; lower the "
                                     f"learning rate or check the data")
        return {"train/loss": mean_loss, "throughput/img_s": seen / elapsed,
                "lr": self.optimizer.param_groups[0]["lr"]}

    @torch.inference_mode()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        confusion = ConfusionMatrix(self.s.num_classes, ignore_index=IGNORE_INDEX, device=self.device)
        boundary = BoundaryF1(tolerance=self.s.boundary_tolerance, ignore_index=IGNORE_INDEX, device=self.device)
        total_loss = torch.zeros((), device=self.device)
        seen = 0
        for images, masks in self.val_loader:
            x, y = self._inputs(images, masks)
            with self._autocast():
                logits = self.model(x)
            total_loss += self.loss_fn(logits, y) * len(images)
            pred = self._predict(logits)
            confusion.update(pred, y)
            boundary.update(pred, y)
            seen += len(images)
        # the epoch's one device->host copy: loss sum, confusion counts and boundary counts together
        n = self.s.num_classes
        host = torch.cat([total_loss.double().view(1), confusion.counts.double().flatten(),
                          boundary.counts.double()]).cpu()  # float64 holds counts below 2**53 exactly
        counts = host[1 : 1 + n * n].long().view(n, n)
        self.confusion = counts  # kept for the end-of-run report
        found = scores(counts, task=self.s.task, class_names=self.s.class_names)
        found["boundary_f1"] = boundary_f1(host[1 + n * n :].long())
        return {"val/loss": host[0].item() / max(seen, 1), **{f"val/{k}": v for k, v in found.items()}}

    def _predict(self, logits: torch.Tensor) -> torch.Tensor:
        return predict(logits, task=self.s.task, threshold=self.s.threshold)

    @torch.inference_mode()
    def predict_samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(images, targets, predictions) of the fixed validation samples, as numpy arrays."""
        if self.samples is None:
            return None
        images, masks = self.samples
        self.model.eval()
        x, _ = self._inputs(images, masks)
        with self._autocast():
            pred = self._predict(self.model(x))
        return images.numpy(), masks.numpy(), pred.cpu().numpy()

    def _checkpoint(self, epoch: int, metrics: dict[str, float]) -> dict:
        return {"epoch": epoch, "metrics": metrics, "config": self.config,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def _improved(self, score: float, best: float) -> bool:
        return score < best if self.minimize else score > best

    def fit(self) -> FitResult:
        self.s.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        paths = {"last": self.s.checkpoint_dir / "last.pt", "best": self.s.checkpoint_dir / "best.pt"}
        history: list[dict[str, float]] = []
        best_score, best_epoch = (math.inf if self.minimize else -math.inf), 0
        try:
            for epoch in range(1, self.s.epochs + 1):
                metrics = {**self.train_epoch(epoch), **self.validate()}
                history.append(metrics)
                state = self._checkpoint(epoch, metrics)
                save_atomic(state, paths["last"])
                is_best = self._improved(metrics[self.s.monitor], best_score)
                if is_best:
                    best_score, best_epoch = metrics[self.s.monitor], epoch
                    save_atomic(state, paths["best"])
                self.display.epoch_end(epoch, metrics, is_best)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(epoch, metrics, self.predict_samples())
        finally:
            self.display.close()
        return FitResult(history, best_epoch, best_score, paths)
