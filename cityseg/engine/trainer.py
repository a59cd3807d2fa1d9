"""The training loop: one story from batch to checkpoint.

Everything per step stays on the device: the loss is summed into a device tensor, a
non-finite loss is noted on the device with its step, predictions go into device confusion
counts, and the host reads them at the end of the epoch (plus a cheap loss read for the
progress bar at most twice a second). A checkpoint holds everything needed to continue
exactly: weights, optimizer, scheduler, gradient scaler, RNG states and the loop's position,
down to the batch when a signal stopped it mid-epoch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cityseg.data.cityscapes import IGNORE_INDEX
from cityseg.data.datasets import EpochSampler
from cityseg.engine.display import NullDisplay
from cityseg.errors import Interrupted, TrainingDiverged
from cityseg.metrics import BoundaryF1, ConfusionMatrix, boundary_f1, predict, scores
from cityseg.optim import Schedule

# ImageNet statistics: the usual choice, and harmless for a network trained from scratch.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PROGRESS_REFRESH_S = 0.5
CHECKPOINT_FORMAT = 1


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
    accumulate: int
    threshold: float
    boundary_tolerance: int
    monitor: str
    mode: str  # max | min
    patience: int  # 0: no early stopping
    min_delta: float
    checkpoint_dir: Path


@dataclass
class TrainState:
    """The loop's position and memory; saved in every checkpoint."""

    epoch: int = 1  # the epoch in progress, or the next one to run
    step_in_epoch: int = 0  # batches of `epoch` already trained (a run stopped mid-epoch)
    loss_sum: float = 0.0  # of those batches, for the epoch's mean train loss
    seen: int = 0
    best_score: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the last improvement, for early stopping
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_score: float
    checkpoints: dict[str, Path]
    stopped_early: bool


class StopFlag:
    """Set by a signal handler; the trainer stops at the next optimizer-step boundary."""

    def __init__(self) -> None:
        self.signum = 0


EpochCallback = Callable[[int, dict[str, float], tuple | None], None]


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename: a kill never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """Python, NumPy and torch RNG states in types `torch.load(weights_only=True)` accepts."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(py_state), gauss], "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_rest": [pos, has_gauss, cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@functools.lru_cache(maxsize=8)
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std (x 255) on the device, made once per device rather than per batch."""
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255)


def model_inputs(images: torch.Tensor, masks: torch.Tensor, *, device: torch.device,
                 channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batch -> normalised float images (channels_last if asked) and long masks on the device."""
    images = images.to(device, non_blocking=True)
    masks = masks.to(device, non_blocking=True).long()  # (B, H, W)
    mean, std = _normalisation(device)
    x = (images.float() - mean) / std  # (B, 3, H, W)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), masks


def autocast_for(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


class Trainer:
    """Trains a segmentation model and keeps best and last checkpoints."""

    def __init__(self, *, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: Schedule, train_loader: DataLoader, sampler: EpochSampler,
                 val_loader: DataLoader, settings: TrainerSettings, config: dict, run_id: str,
                 raw_model: nn.Module | None = None, samples: tuple[torch.Tensor, torch.Tensor] | None = None,
                 on_epoch_end: EpochCallback | None = None, display=None, stop: StopFlag | None = None) -> None:
        self.s = settings
        self.device = settings.device
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.raw_model = raw_model if raw_model is not None else model  # not torch.compile'd: its state_dict is plain
        self.loss_fn = loss_fn.to(self.device)
        self.optimizer, self.schedule = optimizer, schedule
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.amp_dtype == torch.float16)
        self.train_loader, self.sampler, self.val_loader = train_loader, sampler, val_loader
        self.config, self.run_id = config, run_id  # saved inside every checkpoint
        self.samples = samples  # fixed validation images for the per-epoch panel
        self.on_epoch_end = on_epoch_end
        self.display = display or NullDisplay()
        self.stop = stop or StopFlag()
        self.confusion: torch.Tensor | None = None  # of the last validation
        self.paths = {"last": settings.checkpoint_dir / "last.pt", "best": settings.checkpoint_dir / "best.pt"}

    # ------------------------------------------------------------------ pieces

    def _inputs(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model_inputs(images, masks, device=self.device, channels_last=self.s.channels_last)

    def _autocast(self):
        return autocast_for(self.device, self.s.amp_dtype)

    def _predict(self, logits: torch.Tensor) -> torch.Tensor:
        return predict(logits, task=self.s.task, threshold=self.s.threshold)

    def _optimizer_step(self) -> None:
        if self.s.grad_clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.s.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.after_step()

    def _checkpoint(self, state: TrainState, metrics: dict[str, float]) -> dict:
        return {"format": CHECKPOINT_FORMAT, "epoch": state.epoch - (state.step_in_epoch == 0),
                "metrics": metrics, "config": self.config, "run_id": self.run_id, "state": asdict(state),
                "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state()}

    def restore(self, checkpoint: dict) -> TrainState:
        """Load a checkpoint's weights, optimizer, scheduler, scaler and RNG states; its loop position."""
        self.raw_model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        return TrainState(**checkpoint["state"])

    def _diverged(self, epoch: int, step: int | None) -> TrainingDiverged:
        """step: the first batch (from 1) with a non-finite loss; None: the loss stayed finite
        but the weights did not (an overflowing update)."""
        last = self.paths["last"]
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        what = (f"training loss became NaN or infinite at epoch {epoch}, step {step} (batch {step} of that "
                f"epoch, counting from 1)" if step else f"model weights became NaN or infinite in epoch {epoch}")
        return TrainingDiverged(f"{what}; {kept}. Lower optimizer.lr, set trainer.grad_clip_norm, "
                                f"or check the data")

    # ------------------------------------------------------------------ loops

    def train_epoch(self, state: TrainState) -> dict[str, float]:
        epoch, first_batch = state.epoch, state.step_in_epoch
        batches = math.ceil(self.sampler.size / self.train_loader.batch_size)
        self.sampler.set_epoch(epoch, start=first_batch * self.train_loader.batch_size)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = torch.full((), state.loss_sum, dtype=torch.float64, device=self.device)
        first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)  # 1-based batch
        seen, last_refresh, start = state.seen, 0.0, time.perf_counter()
        self.display.epoch_start(epoch, self.s.epochs, batches, done=first_batch)
        for batch, (images, masks) in enumerate(self.train_loader, start=first_batch + 1):
            x, y = self._inputs(images, masks)
            with self._autocast():
                logits = self.model(x)
            loss = self.loss_fn(logits, y)
            group_start = (batch - 1) // self.s.accumulate * self.s.accumulate
            group_size = min(self.s.accumulate, batches - group_start)  # the last group may be short
            self.scaler.scale(loss / group_size).backward()
            at_step = batch % self.s.accumulate == 0 or batch == batches
            if at_step:
                self._optimizer_step()
            loss = loss.detach()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), batch, first_bad)
            total_loss += loss.double() * len(images)
            seen += len(images)
            now, shown = time.perf_counter(), None
            if now - last_refresh > PROGRESS_REFRESH_S:  # a sync at most twice a second
                shown, bad, last_refresh = loss.item(), first_bad.item(), now
                if bad > 0:
                    raise self._diverged(epoch, bad)
            self.display.step(len(images), shown, (seen - state.seen) / max(now - start, 1e-9))
            if self.stop.signum and at_step and batch < batches:
                if first_bad.item() > 0:
                    raise self._diverged(epoch, first_bad.item())
                state.step_in_epoch, state.loss_sum, state.seen = batch, total_loss.item(), seen
                save_atomic(self._checkpoint(state, {}), self.paths["last"])
                raise Interrupted(self.stop.signum, self.run_id, f"epoch {epoch}, batch {batch} of {batches}")
        finite = torch.stack([p.isfinite().all() for p in self.model.parameters()]).all().double()
        loss_sum, bad, weights_ok = torch.stack([total_loss, first_bad.double(), finite]).tolist()  # the epoch's sync
        if bad > 0:
            raise self._diverged(epoch, int(bad))
        if not weights_ok:  # a finite loss but an overflowing update: never checkpoint such weights
            raise self._diverged(epoch, None)
        elapsed = time.perf_counter() - start
        return {"train/loss": loss_sum / max(seen, 1), "throughput/img_s": (seen - state.seen) / elapsed,
                "lr": self.optimizer.param_groups[0]["lr"]}

    def validate(self) -> dict[str, float]:
        scores_, self.confusion = evaluate_batches(
            self.model, self.val_loader, prepare=self._inputs, autocast=self._autocast, threshold=self.s.threshold,
            loss_fn=self.loss_fn, num_classes=self.s.num_classes, class_names=self.s.class_names,
            task=self.s.task, tolerance=self.s.boundary_tolerance, device=self.device)
        return {f"val/{k}": v for k, v in scores_.items()}

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

    def _improved(self, score: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.s.mode == "min":
            return score < best - self.s.min_delta
        return score > best + self.s.min_delta

    def fit(self, state: TrainState | None = None) -> FitResult:
        """Train from `state` (a fresh one, or one restored from a checkpoint) to the last epoch."""
        state = state or TrainState()
        self.s.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        stopped_early = False
        try:
            while state.epoch <= self.s.epochs:
                epoch = state.epoch
                metrics = {**self.train_epoch(state), **self.validate()}
                state.history.append(metrics)
                is_best = self._improved(metrics[self.s.monitor], state.best_score)
                if is_best:
                    state.best_score, state.best_epoch, state.bad_epochs = metrics[self.s.monitor], epoch, 0
                else:
                    state.bad_epochs += 1
                self.schedule.after_epoch(metrics[self.s.monitor])
                state.epoch, state.step_in_epoch, state.loss_sum, state.seen = epoch + 1, 0, 0.0, 0
                checkpoint = self._checkpoint(state, metrics)
                save_atomic(checkpoint, self.paths["last"])
                if is_best:
                    save_atomic(checkpoint, self.paths["best"])
                self.display.epoch_end(epoch, metrics, is_best)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(epoch, metrics, self.predict_samples())
                if self.s.patience and state.bad_epochs >= self.s.patience:
                    stopped_early = True
                    self.display.message(f"early stop: {self.s.monitor} has not improved for "
                                         f"{state.bad_epochs} epochs (best {state.best_score:.4f} at epoch {state.best_epoch})")
                    break
                if self.stop.signum and state.epoch <= self.s.epochs:  # signalled during validation or logging
                    raise Interrupted(self.stop.signum, self.run_id, f"the end of epoch {epoch}")
        finally:
            self.display.close()
        return FitResult(state.history, state.best_epoch, state.best_score, self.paths, stopped_early)


@torch.inference_mode()
def evaluate_batches(model: nn.Module, batches, *, prepare, autocast, threshold: float, loss_fn: nn.Module | None,
                     num_classes: int, class_names: tuple[str, ...], task: str, tolerance: int,
                     device: torch.device) -> tuple[dict[str, float], torch.Tensor]:
    """Scores (and the confusion matrix) of a model over batches of (uint8 images, masks).

    Masks larger than the model's input (full-resolution evaluation) are scored against the
    prediction resized to their size with nearest neighbour; the loss is then not computed.
    Counts accumulate on the device; the host copies them once, at the end.
    """
    model.eval()
    confusion = ConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX, device=device)
    boundary = BoundaryF1(tolerance=tolerance, ignore_index=IGNORE_INDEX, device=device)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for images, masks in batches:
        x, y = prepare(images, masks)
        with autocast():
            logits = model(x)
        if loss_fn is not None:
            total_loss += loss_fn(logits, y).double() * len(images)
        pred = predict(logits, task=task, threshold=threshold)
        if pred.shape[-2:] != y.shape[-2:]:
            pred = F.interpolate(pred[:, None].float(), size=y.shape[-2:], mode="nearest")[:, 0].long()
        confusion.update(pred, y)
        boundary.update(pred, y)
        seen += len(images)
    n = num_classes
    host = torch.cat([total_loss.view(1), confusion.counts.double().flatten(),
                      boundary.counts.double()]).cpu()  # one copy; float64 holds counts below 2**53 exactly
    counts = host[1 : 1 + n * n].long().view(n, n)
    found = scores(counts, task=task, class_names=class_names)
    found["boundary_f1"] = boundary_f1(host[1 + n * n :].long())
    if loss_fn is not None:
        found = {"loss": host[0].item() / max(seen, 1), **found}
    return found, counts
